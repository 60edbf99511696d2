"""Which of the target's paths a session mounts, from mirrord's ``feature.fs`` keys.

mirrord decides per ``open`` call (it hooks them); podtwin mounts whole trees (one FUSE mount,
bound at the real paths) and leaves the per-file part to the agent's file server
(``agent/files/rules.py``). So each key is applied where it can be, and said once where its
grain is coarser than mirrord's:

* ``mode``: ``read``/``write`` mount the target's volume mounts (read-only / as writable as the
  target has them); ``localwithoverrides`` mounts only what the lists below name; ``local`` nothing.
* ``read_only``/``read_write``: per file, in the agent. A regex whose start names a path
  literally (``^/app/config/.*``, ``^/srv/app\\.yaml$``) also brings that path over when it lies
  outside the target's mounts. System directories (``/etc``, ``/usr``, ...) are never mounted
  whole: they would replace the image's own.
* ``not_found``: per file, in the agent; a regex that matches a mount's own path drops the mount.
* ``local``: per mount: a regex that matches a mount's path drops it; files inside a mount that
  it matches stay the target's (said once).
* ``mapping``: per directory: a regex whose start names a directory literally mounts the
  target's replacement path there.

Pure logic: the inputs are the config and the target's mounts, the outputs the exports and the
notices to print.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from podtwin.runner.config.models import FsConfig

# never mounted whole from a target: they hold the image's own system (its libraries, users,
# certificates, devices). A directory inside one of them can be named.
SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                         "/run", "/sbin", "/sys", "/tmp", "/usr", "/var"})
_META = set(".[](){}*+?|^$")
_QUANTIFIERS = set("*?{+")
# what may follow a literal path and still name exactly it (a file, or a directory and its tree)
_WHOLE = re.compile(r"^(?:\$|\(/\|\$\)|\(/\.\*\)\?\$?|/\?\$|/\.\*|/\.\+|/\.\*\$|/|\(\$\|/\)|\(/\|\$\)\.\*)?$")


@dataclass(frozen=True)
class Export:
    path: str                   # where the app sees it
    write: bool = False         # its paths' default
    writable: bool = False      # whether any of its paths may be written
    source: str | None = None   # where it is in the target, when mapped


@dataclass
class FsPlan:
    exports: list[Export] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def literal_path(pattern: str) -> str | None:
    """The path a regex names literally at its start: ``^/app/config/.*`` -> ``/app/config``,
    ``^/srv/app\\.yaml$`` -> ``/srv/app.yaml``, ``^/data/cache-.*`` -> ``/data``; None when its
    literal start is not an absolute path below ``/`` (``.*\\.json$``, ``^/.*``)."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    literal, i = [], 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt.isalnum():   # \d, \w, \b, \1 ...: a class or an assertion, not a character
                break
            literal.append(nxt)
            i += 2
            continue
        if char == "." and body[i + 1:i + 2] not in _QUANTIFIERS:
            literal.append(char)   # `config.json`: a lone dot in a name is the name's own dot
            i += 1
            continue
        if char in _META:
            break
        literal.append(char)
        i += 1
    rest = body[i:]
    if rest and rest[0] in _QUANTIFIERS and literal:
        if literal[-1] == "/":   # `^/app/config/?$`, `/*`: an optional slash still names the directory
            literal.pop()
            rest = "$" if rest[1:] in ("", "$") else "/" + rest
        else:
            literal.pop()   # the last character is optional or repeated: not part of the name
            rest = "?" + rest
    text = "".join(literal)
    if not text.startswith("/"):
        return None
    if rest and not _WHOLE.match(rest) and not text.endswith("/"):
        text = posixpath.dirname(text)   # ^/etc/app.*\.yaml names /etc only
    path = posixpath.normpath(text)
    return None if path in ("/", "//") else path


def _names_exactly(pattern: str, path: str) -> bool:
    """Whether ``pattern`` names ``path`` itself (and its tree), not just something inside it."""
    regex = re.compile(pattern, re.IGNORECASE)
    return bool(regex.search(path) or regex.search(path + "/"))


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _search(patterns: list[str], path: str) -> str | None:
    """The first pattern that matches ``path`` as a file or as a directory (``path/``)."""
    for pattern in patterns:
        regex = re.compile(pattern, re.IGNORECASE)
        if regex.search(path) or regex.search(path + "/"):
            return pattern
    return None


def python_template(replacement: str) -> str:
    """A mirrord (Rust regex) replacement as Python's: ``$1``, ``${1}``, ``$name``, ``${name}``
    -> ``\\g<...>``; ``$$`` -> ``$``; a backslash is literal in Rust's."""
    out, i = [], 0
    while i < len(replacement):
        char = replacement[i]
        if char == "\\":
            out.append("\\\\")
        elif char == "$":
            if replacement.startswith("$$", i):
                out.append("$")
                i += 2
                continue
            m = re.compile(r"\{(\w+)\}|(\w+)").match(replacement, i + 1)
            if m:
                out.append(f"\\g<{m.group(1) or m.group(2)}>")
                i = m.end()
                continue
            out.append("$")
        else:
            out.append(char)
        i += 1
    return "".join(out)


def map_path(pattern: str, replacement: str, path: str) -> str | None:
    """``path`` (a directory: tried as ``path/`` first) rewritten by one mapping, normalised;
    None when the mapping does not match it or its replacement names a group it lacks."""
    regex = re.compile(pattern, re.IGNORECASE)
    for candidate in (path + "/", path):
        if regex.search(candidate):
            try:
                mapped = regex.sub(python_template(replacement), candidate, count=1)
            except (re.error, IndexError):   # `$1` with no group 1
                return None
            return posixpath.normpath(mapped) if mapped.startswith("/") else None
    return None


def plan_files(fs: FsConfig, mounts: tuple[tuple[str, bool], ...]) -> FsPlan:
    """The exports for ``mounts`` (the target's volume mounts: (path, writable)) under ``fs``."""
    plan = FsPlan()
    lists = {key: getattr(fs, key) for key in ("read_only", "read_write", "local", "not_found", "mapping")}
    if fs.mode == "local":
        named = [key for key, value in lists.items() if value]
        if named:
            plan.notices.append(f"feature.fs.mode is local: nothing of the target is mounted, so "
                                f"feature.fs.{', '.join(named)} has nothing to apply to (as in mirrord)")
        return plan
    exports: dict[str, Export] = {}
    dropped: list[str] = []
    if fs.mode in ("read", "write"):
        for path, writable in sorted(mounts):
            if (rule := _search(fs.local, path)) is not None:
                plan.notices.append(f"{path} stays the image's own (feature.fs.local {rule!r})")
                continue
            if (rule := _search(fs.not_found, path)) is not None:
                plan.notices.append(f"{path} is not mounted (feature.fs.not_found {rule!r})")
                dropped.append(path)
                continue
            may_write = writable and (fs.mode == "write" or bool(fs.read_write))
            exports[path] = Export(path, write=may_write and fs.mode == "write", writable=may_write)
    mounted = list(exports)

    def named_path(key: str, pattern: str) -> str | None:
        """The path a pattern brings over (None: nothing to add; a notice says why if needed)."""
        path = literal_path(pattern)
        if path is None:
            where = f"inside the mounted paths ({', '.join(mounted)})" if mounted else "to no path: nothing is mounted"
            plan.notices.append(f"feature.fs.{key} {pattern!r} names no directory, so podtwin cannot mount "
                                f"for it; it applies per file {where}")
            return None
        if any(_within(path, top) for top in exports):
            return None   # inside a mount: the agent applies it per file
        if path in SYSTEM_DIRS:
            plan.notices.append(f"feature.fs.{key} {pattern!r} names {path}, which podtwin does not mount "
                                f"whole (it would replace the image's own); name a directory inside it")
            return None
        return path

    for key in ("read_write", "read_only"):
        for pattern in lists[key]:
            path = named_path(key, pattern)
            if path is not None:
                write = key == "read_write"
                exports[path] = Export(path, write=write, writable=write)
                if not _names_exactly(pattern, path):
                    plan.notices.append(f"feature.fs.{key} {pattern!r}: podtwin mounts {path} whole (the "
                                        "directory the regex's literal start lies in)")
    for pattern, replacement in fs.mapping.items():
        path = literal_path(pattern)
        source = None if path is None else map_path(pattern, replacement, path)
        if path is None or source is None or source == "/":
            plan.notices.append(f"feature.fs.mapping {pattern!r}: podtwin maps whole directories, and this "
                                f"one names none it can mount (or its replacement does not fit it); not applied")
            continue
        if path in SYSTEM_DIRS or source in SYSTEM_DIRS:
            plan.notices.append(f"feature.fs.mapping {pattern!r}: {path} -> {source} would replace a system "
                                f"directory whole; not applied")
            continue
        writable = fs.mode == "write" or bool(_search(fs.read_write, source))
        exports[path] = Export(path, write=fs.mode == "write", writable=writable, source=source)
        plan.notices.append(f"{path} shows the target's {source} (feature.fs.mapping, per directory)")
    for pattern in lists["local"]:
        path = literal_path(pattern)
        inside = [top for top in exports if path is None or _within(path, top)]
        if inside and (path is None or path not in exports):
            plan.notices.append(f"feature.fs.local {pattern!r} applies per mount: files it matches inside "
                                f"{', '.join(inside)} stay the target's")
    for pattern in lists["not_found"]:
        path = literal_path(pattern)
        if path is not None and not any(_within(path, top) for top in [*exports, *dropped]):
            plan.notices.append(f"feature.fs.not_found {pattern!r}: {path} is not mounted from the target, "
                                f"so the image's own files there stay visible")
    plan.exports = sorted(exports.values(), key=lambda e: e.path)
    return plan
