"""The path logic of the agent's file server, without a single system call.

* ``normalise``: a client's path as the one absolute, lexical path the server reasons about.
* ``ExportMap``: which export a path falls in (the allowlist), and which names lead from ``/``
  down to the exports (the synthetic directories a client may list on its way there).
* ``Walk``: the bookkeeping of the userspace resolver (``root.py``'s fallback for kernels
  without openat2): the components still to walk, symlink targets spliced in, the link budget.

Pure so the rules can be tested on their own, and so the one module that makes system calls
(``root.py``) holds only what the kernel must do.
"""
from __future__ import annotations

import errno
import os
import posixpath
from collections import deque
from dataclasses import dataclass

MAX_SYMLINKS = 40   # what the kernel allows in one lookup (MAXSYMLINKS) before ELOOP


def normalise(path: bytes) -> bytes:
    """``path`` made absolute (relative paths start at ``/``, the SFTP session's only working
    directory) with ``.``, ``..`` and repeated slashes folded lexically, ``..`` clamped at ``/``.

    Lexical on purpose: the allowlist is decided on the name the client asked for; symlinks are
    then followed by the resolver, inside the export's root."""
    if b"\0" in path:
        raise OSError(errno.EINVAL, "NUL in a path")
    folded = posixpath.normpath(b"/" + path)
    return b"/" + folded.lstrip(b"/")   # normpath keeps a leading '//' (POSIX allows it): not here


def split(path: bytes) -> list[bytes]:
    """The components of a normalised path: ``/a/b`` -> ``[a, b]``, ``/`` -> ``[]``."""
    return [part for part in path.split(b"/") if part]


def is_within(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top.rstrip(b"/") + b"/")


@dataclass(frozen=True)
class Export:
    """One exported path (normalised, absolute, not ``/``): ``path`` as the client names it,
    ``source`` where it is in the target (the same unless mapped); ``write`` the default for the
    paths in it, ``writable`` whether any may be written."""
    path: bytes
    write: bool = False
    writable: bool = False
    source: bytes = b""

    @property
    def target(self) -> bytes:
        return self.source or self.path


@dataclass(frozen=True)
class Placed:
    """Where a client path falls: its export, and the path below the export (``b""`` for the
    export itself)."""
    export: Export
    below: bytes

    @property
    def target(self) -> bytes:
        """The path as the target names it (the export's source, then ``below``)."""
        return self.export.target + (b"/" + self.below if self.below else b"")


class ExportMap:
    """The allowlist: a path is served only if it is an export or lies below one; the nearest
    (longest) export wins, so a writable ``/data/uploads`` can sit inside a read-only ``/data``."""

    def __init__(self, exports: list[Export]) -> None:
        self.exports = sorted(exports, key=lambda e: len(e.path), reverse=True)

    def place(self, path: bytes) -> Placed | None:
        """The export ``path`` (normalised) falls in, or None: outside every export."""
        for export in self.exports:
            if is_within(path, export.path):
                return Placed(export, path[len(export.path):].lstrip(b"/"))
        return None

    def way_to_exports(self, path: bytes) -> list[bytes] | None:
        """If ``path`` is a proper ancestor of some export (``/``, ``/etc`` for ``/etc/config``),
        the names in it that lead on towards the exports, sorted; otherwise None."""
        names = {split(export.path)[len(split(path))] for export in self.exports
                 if export.path != path and is_within(export.path, path)}
        return sorted(names) if names else None


class Walk:
    """The components a userspace lookup still has to step through, beneath a root.

    The resolver asks ``next()`` for the next name, and when that name turns out to be a symlink
    it hands the link's text to ``follow``: a relative target is spliced in where the link was,
    an absolute one restarts the walk at the root (``follow`` returns True: the resolver drops the
    directories it walked). ``..`` is returned as is: the resolver clamps it at the root, which it
    alone knows. More than ``MAX_SYMLINKS`` links in one lookup is ELOOP, as in the kernel."""

    def __init__(self, path: bytes) -> None:
        self.pending: deque[bytes] = deque(self._parts(path))
        self.links = 0

    @staticmethod
    def _parts(path: bytes) -> list[bytes]:
        return [part for part in path.split(b"/") if part and part != b"."]

    def next(self) -> bytes | None:
        return self.pending.popleft() if self.pending else None

    @property
    def last(self) -> bool:
        """Whether the name ``next()`` returned was the final component."""
        return not self.pending

    def follow(self, target: bytes) -> bool:
        self.links += 1
        if self.links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        if not target:
            raise OSError(errno.ENOENT, "empty symlink")
        self.pending.extendleft(reversed(self._parts(target)))
        return target.startswith(b"/")
