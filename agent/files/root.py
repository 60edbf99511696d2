"""A directory that path lookups cannot leave: the target's root (``/proc/PID/root``) or an export.

``/proc/PID/root`` is a magic link: opening a path *through* it reaches the target's files, but an
absolute symlink met on the way resolves against the *agent's* root, and ``..`` can climb past
it. So every lookup starts from an ``O_PATH`` fd of the root and stays beneath it:

* ``openat2(rootfd, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` (Linux >= 5.6): the kernel
  treats the fd as ``/`` for the whole lookup, absolute symlinks and ``..`` included, and refuses
  /proc magic links (a target's ``/proc/1/root`` would lead straight out again).
* When openat2 is missing (ENOSYS), a userspace walk does the same one component at a time
  (``O_PATH | O_NOFOLLOW``, readlink, absolute links restart at the root, ``..`` clamped at it).
  It has a race window between steps (a link swapped in between) that openat2 does not.

Operations on a path's last component (lstat, readlink, unlink, mkdir, rename) resolve its
*parent* and then use the ``*at`` system calls on the name with the symlink not followed, so a
link is acted on as a link, never as what it points to. Attributes are changed through an fd of
the object itself for the same reason.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from contextlib import contextmanager
from typing import Iterator

from podtwin.agent.files.paths import Walk, normalise

_SYS_OPENAT2 = 437          # the same number on every architecture (the unified syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2_in_root(rootfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    """One openat2 lookup of ``path`` with ``rootfd`` as its ``/``; raises OSError (ENOSYS on
    kernels older than 5.6)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,   # the kernel wants 0 otherwise
                   _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(rootfd), ctypes.c_char_p(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


@functools.cache
def have_openat2() -> bool:
    """Whether this kernel has openat2 (probed once, on ``/``)."""
    root = os.open("/", _DIR_FLAGS)
    try:
        os.close(openat2_in_root(root, b".", os.O_PATH))
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return False
        raise
    finally:
        os.close(root)
    return True


class TargetRoot:
    """An open root directory; every path given to it is looked up beneath it.

    ``userspace``: use the fallback resolver even where openat2 exists (tests run both)."""

    def __init__(self, fd: int, userspace: bool = False) -> None:
        self.fd = fd
        self.userspace = userspace

    @classmethod
    def at(cls, path: str | bytes, userspace: bool | None = None) -> "TargetRoot":
        """The root at ``path``, a path of the agent's own (``/proc/PID/root``); ``userspace``
        None: the fallback only where the kernel lacks openat2."""
        return cls(os.open(path, _DIR_FLAGS), (not have_openat2()) if userspace is None else userspace)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "TargetRoot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------------------------
    def open(self, path: bytes, flags: int, mode: int = 0o666) -> int:
        """An fd of ``path`` opened with ``flags``, symlinks followed but only beneath the root."""
        if not self.userspace:
            return openat2_in_root(self.fd, path, flags, mode)
        if flags & os.O_CREAT:
            try:
                found = self._walk(path, follow_last=True)
            except FileNotFoundError:
                with self.parent(path) as (parent, name):
                    # a dangling link as the name would be followed out by the kernel: O_NOFOLLOW
                    return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=parent)
            if flags & os.O_EXCL:
                os.close(found)
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            flags &= ~os.O_CREAT
        else:
            found = self._walk(path, follow_last=True)
        try:
            return self._reopen(found, flags)
        finally:
            os.close(found)

    def subroot(self, path: bytes) -> "TargetRoot":
        """The directory at ``path`` as a root of its own."""
        return TargetRoot(self.open(path, _DIR_FLAGS), self.userspace)

    @contextmanager
    def parent(self, path: bytes) -> Iterator[tuple[int, str | bytes]]:
        """(an fd of the directory ``path`` is in, its last name) for the ``*at`` calls;
        for the root itself, (the root's fd, ``"."``)."""
        head, _, name = normalise(path).rpartition(b"/")
        if not name:
            yield self.fd, "."
            return
        fd = self.open(head or b"/", _DIR_FLAGS)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _reopen(self, fd: int, flags: int) -> int:
        """An O_PATH fd opened again with real ``flags``, through the agent's own /proc (a magic
        link to the very object the walk found: no path is looked up again)."""
        if flags & os.O_PATH:
            if flags & os.O_DIRECTORY and not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            return os.dup(fd)
        return os.open(f"/proc/self/fd/{fd}", flags & ~os.O_NOFOLLOW)

    def _walk(self, path: bytes, follow_last: bool) -> int:
        """The userspace lookup: an O_PATH fd of ``path`` beneath the root."""
        walk = Walk(path)
        dirs = [os.dup(self.fd)]   # the directories walked; dirs[0] is the root, never popped
        try:
            while (name := walk.next()) is not None:
                if name == b"..":
                    if len(dirs) > 1:
                        os.close(dirs.pop())
                    continue
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dirs[-1])
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode) and (follow_last or not walk.last):
                    os.close(fd)
                    if walk.follow(os.readlink(name, dir_fd=dirs[-1])):
                        while len(dirs) > 1:
                            os.close(dirs.pop())
                    continue
                if not walk.last and not stat.S_ISDIR(mode):
                    os.close(fd)
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                dirs.append(fd)
            return dirs.pop() if len(dirs) > 1 else os.dup(dirs[0])
        finally:
            for fd in dirs:
                os.close(fd)

    # -- operations -----------------------------------------------------------------------------
    def lstat(self, path: bytes) -> os.stat_result:
        with self.parent(path) as (parent, name):
            return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def stat(self, path: bytes) -> os.stat_result:
        fd = self.open(path, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        """A symlink's text as written in the target (not resolved: the client resolves it)."""
        with self.parent(path) as (parent, name):
            return os.fsencode(os.readlink(name, dir_fd=parent))

    def listdir(self, path: bytes) -> list[tuple[bytes, os.stat_result]]:
        """A directory's entries with their lstat, read through an fd of the directory."""
        fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as entries:
                return [(os.fsencode(entry.name), entry.stat(follow_symlinks=False)) for entry in entries]
        finally:
            os.close(fd)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        fd = self.open(path, os.O_PATH)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: bytes, mode: int) -> None:
        with self.parent(path) as (parent, name):
            os.mkdir(name, mode, dir_fd=parent)

    def unlink(self, path: bytes) -> None:
        with self.parent(path) as (parent, name):
            os.unlink(name, dir_fd=parent)

    def rmdir(self, path: bytes) -> None:
        with self.parent(path) as (parent, name):
            os.rmdir(name, dir_fd=parent)

    def rename(self, old: bytes, new: bytes, replace: bool) -> None:
        """``replace`` False: fail with EEXIST if ``new`` exists (SFTP's own rename)."""
        with self.parent(old) as (old_dir, old_name), self.parent(new) as (new_dir, new_name):
            if not replace:
                try:
                    os.stat(new_name, dir_fd=new_dir, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), new)
            os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)

    def set_attrs(self, path: bytes, size: int | None = None, mode: int | None = None,
                  owner: tuple[int, int] | None = None, times: tuple[float, float] | None = None) -> None:
        """Change what is given, through an fd of the object itself (never a name the kernel
        would look up again). O_NONBLOCK: a FIFO must not hang the open."""
        fd = self.open(path, (os.O_WRONLY if size is not None else os.O_RDONLY) | os.O_NONBLOCK)
        try:
            set_fd_attrs(fd, size, mode, owner, times)
        finally:
            os.close(fd)


def set_fd_attrs(fd: int, size: int | None = None, mode: int | None = None,
                 owner: tuple[int, int] | None = None, times: tuple[float, float] | None = None) -> None:
    if size is not None:
        os.ftruncate(fd, size)
    if owner is not None:
        os.fchown(fd, *owner)
    if mode is not None:
        os.fchmod(fd, stat.S_IMODE(mode))
    if times is not None:
        os.utime(fd, times)


# file systems whose calls answer from memory or a local disk (statfs f_type): tmpfs (ConfigMaps,
# Secrets, tokens), ramfs, overlayfs (a container's own files), ext2/3/4, xfs, btrfs, zfs
LOCAL_FS_TYPES = frozenset({0x01021994, 0x858458F6, 0x794C7630, 0xEF53, 0x58465342, 0x9123683E, 0x2FC12FC1})


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def is_local(fd: int) -> bool:
    """Whether ``fd``'s file system is a local one (``LOCAL_FS_TYPES``); False when unknown."""
    buf = _Statfs()
    if _libc.fstatfs(ctypes.c_int(fd), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in LOCAL_FS_TYPES
