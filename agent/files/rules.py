"""mirrord's ``feature.fs`` lists, decided per file by the agent's file server.

The runner mounts whole directories (a FUSE mount per tree, bound at the real paths); within
them, each path the app touches is decided here, as mirrord decides each ``open``:

1. ``not_found``: the path does not exist (lookups, listings and opens say so);
2. ``read_write``: writes go to the target (where the target's mount takes writes at all);
3. ``read_only``: writes are refused;
4. otherwise the export's default (``feature.fs.mode``: ``write`` writes, ``read`` does not).

Regexes are searched case-insensitively in the path as the target names it (after
``feature.fs.mapping``), as mirrord does. Pure: no file is touched here.
"""
from __future__ import annotations

import os
import re

from podtwin.agent.link.wire import FsExports, ProtocolError


def _compile(kind: str, patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ProtocolError(f"feature.fs.{kind}: {pattern!r} is not a valid regex ({exc})") from None
    return compiled


class PathRules:
    def __init__(self, exports: FsExports) -> None:
        self.not_found = _compile("not_found", exports.not_found)
        self.read_write = _compile("read_write", exports.read_write)
        self.read_only = _compile("read_only", exports.read_only)

    @staticmethod
    def _any(patterns: list[re.Pattern[str]], path: bytes) -> bool:
        text = os.fsdecode(path)
        return any(p.search(text) for p in patterns)

    def hidden(self, path: bytes) -> bool:
        """Whether ``path`` (as the target names it) is to look absent."""
        return self._any(self.not_found, path)

    def may_write(self, path: bytes, default: bool, writable: bool) -> bool:
        """Whether ``path`` may be changed: ``default`` is its export's (the mode), ``writable``
        whether the export takes writes at all."""
        if not writable:
            return False
        if self._any(self.read_write, path):
            return True
        if self._any(self.read_only, path):
            return False
        return default
