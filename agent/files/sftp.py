"""The agent's SFTP server: the target's exported files, at their real paths, over the link.

A client (later: sshfs in the sidecar) opens an ``sftp`` session channel on the link with the
exports it wants in the channel's environment (``wire.FS_EXPORTS_ENV``, ``wire.FsExports``).
The server then answers for those paths only:

* A path inside an export is looked up with the export as its root (``root.TargetRoot``, itself
  opened inside the target's root, ``/proc/PID/root``): symlinks in an export are followed only
  while they stay in it. A relative link works as in the target; an absolute one resolves
  beneath the export, never elsewhere in the target or in the agent. ``readlink`` hands out the
  link's text unchanged, for the client to resolve in its own view of the exports.
* ``/`` and every directory between it and an export (``/etc`` for ``/etc/config``) are shown as
  synthetic read-only directories (mode 0555, owned by 0:0) that list only the names leading on
  to the exports, so one mount of ``/`` can reach them all. Nothing else of the target is
  listed or read: any other path is "no such file".
* Exports are read-only unless marked ``write``: every change to a read-only path (open for
  writing, setstat, mkdir, remove, rmdir, rename) is "permission denied", and so is removing or
  renaming an export itself. ``feature.fs``'s lists decide per path (``rules.PathRules``):
  ``not_found`` paths are absent, ``read_write`` ones writable where the export takes writes,
  ``read_only`` ones not. An export's ``source`` (``feature.fs.mapping``) is where its files are
  in the target. Symlinks, hard links and lsetstat are not offered.
* Owners and modes are the target's numbers, unchanged (``ls -l`` shows numeric ids: the
  agent's own user names would be the wrong ones).

asyncssh's ``chroot`` is not used: it realpaths ``/proc/PID/root`` to ``/`` and would serve the
agent's own files. Every blocking file operation runs in a worker thread, so a slow or hung
volume (NFS) stalls only its own request, not the agent's event loop.
"""
from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import asyncssh
from asyncssh import SFTPAttrs, SFTPName, SFTPNoSuchFile, SFTPPermissionDenied

from podtwin.agent.files.paths import Export, ExportMap, Placed, normalise
from podtwin.agent.files.root import TargetRoot, is_local, set_fd_attrs
from podtwin.agent.files.rules import PathRules
from podtwin.agent.link.wire import FsExports

T = TypeVar("T")

# the synthetic directories on the way to the exports
_WAY = SFTPAttrs(permissions=stat.S_IFDIR | 0o555, uid=0, gid=0, size=0, nlink=2)


class OpenFile:
    """A file the client opened: its fd, and whether its export takes changes."""

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.writable = writable


class TargetSFTPServer(asyncssh.SFTPServer):
    """One sftp channel's server: ``root`` is the target's root (this server closes it on exit),
    ``exports`` what the client asked to be served."""

    def __init__(self, chan: asyncssh.SSHServerChannel, root: TargetRoot, exports: FsExports) -> None:
        super().__init__(chan)
        self.root = root
        self.exports = ExportMap([Export(os.fsencode(e.path), e.write, e.writable, os.fsencode(e.source or ""))
                                  for e in exports.exports])
        self.rules = PathRules(exports)
        self._roots: dict[bytes, tuple[TargetRoot, bytes, bool]] = {}

    def map_path(self, path: bytes) -> bytes:
        """asyncssh's own operations map paths in the agent's file system: every one this class
        does not override (open56, symlink, link, lsetstat) is refused here."""
        raise SFTPPermissionDenied("not offered by this server")

    def format_user(self, uid: int | None) -> str:
        return "" if uid is None else str(uid)

    def format_group(self, gid: int | None) -> str:
        return "" if gid is None else str(gid)

    # -- where a path falls -----------------------------------------------------------------------
    def _place(self, path: bytes, write: bool = False) -> Placed | None:
        """The export ``path`` is in; None for a directory on the way to the exports (only when
        not writing). Anything else is refused here, before any file is touched."""
        placed = self.exports.place(path)
        if placed is None:
            if self.exports.way_to_exports(path) is None:
                raise SFTPNoSuchFile("not exported")
            if write:
                raise SFTPPermissionDenied("read-only: the way to the exports")
            return None
        if self.rules.hidden(placed.target):
            raise SFTPNoSuchFile("not found (feature.fs.not_found)")
        if write and not self.rules.may_write(placed.target, placed.export.write, placed.export.writable):
            raise SFTPPermissionDenied("read-only (feature.fs)")
        return placed

    def _export_root(self, export: Export) -> tuple[TargetRoot, bytes, bool]:
        """The root the export's lookups start from, opened once per channel: (root, the name
        prefix of a file export in its parent directory, whether its file system is local)."""
        known = self._roots.get(export.target)
        if known is not None and os.fstat(known[0].fd).st_nlink == 0:
            # the directory was removed (a target that swaps its config dir in with mv): look again
            known[0].close()
            known = None
        if known is None:
            fd = self.root.open(export.target, os.O_PATH)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                known = (TargetRoot(fd, self.root.userspace), b"", is_local(fd))
            else:
                local = is_local(fd)
                os.close(fd)
                head, _, name = export.target.rpartition(b"/")
                known = (self.root.subroot(head or b"/"), b"/" + name, local)
            self._roots[export.target] = known
        return known

    def _in_export(self, placed: Placed, op: Callable[[TargetRoot, bytes], T]) -> T:
        """``op(export root, path beneath it)``. A directory export is its own root; a file export
        is looked up in its parent directory, by its name."""
        root, prefix, _ = self._export_root(placed.export)
        return op(root, prefix + (b"/" + placed.below if placed.below or not prefix else b""))

    async def _in_export_async(self, placed: Placed, op: Callable[[TargetRoot, bytes], T],
                               may_block: bool = False) -> T:
        """On the event loop for an export on a local file system (tmpfs for ConfigMaps, Secrets
        and tokens, a node's disk for emptyDir): a thread hop per call would cost more than the
        call. In a worker thread for anything else (NFS, CSI volumes), so a hung volume stalls
        its own request, never the agent."""
        export = placed.export
        if export.target not in self._roots:
            await asyncio.to_thread(self._export_root, export)
        if self._roots[export.target][2] and not may_block:
            return self._in_export(placed, op)
        return await asyncio.to_thread(self._in_export, placed, op)

    async def _run(self, path: bytes, op: Callable[[TargetRoot, bytes], T],
                   way: Callable[[], T] | None = None, write: bool = False, may_block: bool = False) -> T:
        """``op`` on ``path`` in its export, or ``way()`` for a directory on the way to them
        (reads only: ``_place`` refuses writes there). ``may_block``: a call that can wait on
        something other than the file system (opening a FIFO), always in a thread."""
        placed = self._place(normalise(path), write)
        if placed is None:
            assert way is not None
            return way()
        return await self._in_export_async(placed, op, may_block)

    def _refuse_export_itself(self, path: bytes) -> Placed:
        placed = self._place(normalise(path), write=True)
        assert placed is not None   # _place refuses writes on the way to the exports
        if not placed.below:
            raise SFTPPermissionDenied("an export itself cannot be removed or renamed")
        return placed

    # -- reading ------------------------------------------------------------------------------------
    def realpath(self, path: bytes) -> bytes:
        """Lexical: the server's paths are the target's names as the client asked for them;
        where a symlink leads is the client's to resolve (it reads links with ``readlink``)."""
        return normalise(path)

    async def stat(self, path: bytes) -> os.stat_result | SFTPAttrs:
        return await self._run(path, TargetRoot.stat, lambda: _WAY)

    async def lstat(self, path: bytes) -> os.stat_result | SFTPAttrs:
        return await self._run(path, TargetRoot.lstat, lambda: _WAY)

    async def readlink(self, path: bytes) -> bytes:
        def not_a_link() -> bytes:
            raise OSError(errno.EINVAL, "not a symbolic link")   # as readlink(2) says for a directory
        return await self._run(path, TargetRoot.readlink, not_a_link)

    async def statvfs(self, path: bytes) -> os.statvfs_result:
        return await self._run(path, TargetRoot.statvfs, lambda: os.fstatvfs(self.root.fd))

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        path = normalise(path)
        placed = self._place(path)
        if placed is None:
            yield SFTPName(b".", attrs=_WAY)
            yield SFTPName(b"..", attrs=_WAY)
            for name in self.exports.way_to_exports(path) or ():
                try:
                    attrs = await self.convert_attrs(self.stat(path.rstrip(b"/") + b"/" + name))
                except OSError:
                    continue   # an export the target does not have: nothing to show
                yield SFTPName(name, attrs=attrs)
            return
        entries = await self._in_export_async(placed, TargetRoot.listdir)
        here = await self.convert_attrs(self.stat(path))
        yield SFTPName(b".", attrs=here)
        yield SFTPName(b"..", attrs=here)   # the parent may be another export or the way: not looked up
        for name, attrs in entries:
            if not self.rules.hidden(placed.target.rstrip(b"/") + b"/" + name):
                yield SFTPName(name, attrs=SFTPAttrs.from_local(attrs))

    # -- files ----------------------------------------------------------------------------------------
    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        flags = _open_flags(pflags)
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        mode = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)

        def directory() -> int:
            raise OSError(errno.EISDIR, "is a directory")
        # In a thread even on a local file system: opening a FIFO (or a device) waits for its
        # other end, and the event loop serves every channel of the link.
        fd = await self._run(path, lambda root, p: root.open(p, flags, mode), directory, write=writing,
                             may_block=True)
        return OpenFile(fd, writable=writing)

    async def read(self, file_obj: OpenFile, offset: int, size: int) -> bytes:
        """From the page cache on the event loop when the data is there (``RWF_NOWAIT``: the
        kernel answers EAGAIN rather than wait for a disk or a network volume), else in a worker
        thread. The hop to a thread and back cost more than the copy itself."""
        buf = bytearray(size)
        try:
            if os.preadv(file_obj.fd, [buf], offset, os.RWF_NOWAIT) == size:
                return bytes(buf)
        except OSError:   # EAGAIN: not cached; EOPNOTSUPP: a file system without RWF_NOWAIT
            pass
        return await asyncio.to_thread(os.pread, file_obj.fd, size, offset)   # a short read may be EOF

    async def write(self, file_obj: OpenFile, offset: int, data: bytes) -> int:
        return await asyncio.to_thread(os.pwrite, file_obj.fd, data, offset)

    async def fstat(self, file_obj: OpenFile) -> os.stat_result:
        return await asyncio.to_thread(os.fstat, file_obj.fd)

    async def fstatvfs(self, file_obj: OpenFile) -> os.statvfs_result:
        return await asyncio.to_thread(os.fstatvfs, file_obj.fd)

    async def fsync(self, file_obj: OpenFile) -> None:
        await asyncio.to_thread(os.fsync, file_obj.fd)

    async def fsetstat(self, file_obj: OpenFile, attrs: SFTPAttrs) -> None:
        if not file_obj.writable:
            raise SFTPPermissionDenied("read-only export")
        await asyncio.to_thread(set_fd_attrs, file_obj.fd, *_changes(attrs))

    def close(self, file_obj: OpenFile) -> None:
        os.close(file_obj.fd)

    def exit(self) -> None:
        for root, _, _ in self._roots.values():
            root.close()
        self._roots.clear()
        self.root.close()

    # -- changes (writable exports only) -----------------------------------------------------------
    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._run(path, lambda root, p: root.set_attrs(p, *_changes(attrs)), write=True)

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        mode = 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        await self._run(path, lambda root, p: root.mkdir(p, mode), write=True)

    async def remove(self, path: bytes) -> None:
        await self._in_export_async(self._refuse_export_itself(path), TargetRoot.unlink)

    async def rmdir(self, path: bytes) -> None:
        await self._in_export_async(self._refuse_export_itself(path), TargetRoot.rmdir)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, replace=False)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, replace=True)

    async def _rename(self, oldpath: bytes, newpath: bytes, replace: bool) -> None:
        old, new = self._refuse_export_itself(oldpath), self._refuse_export_itself(newpath)
        if old.export != new.export:
            raise OSError(errno.EXDEV, "cannot rename across exports")   # two roots, as two file systems
        await self._in_export_async(old, lambda root, p: root.rename(p, _beside(p, old.below, new.below), replace))


def _beside(path: bytes, below: bytes, other: bytes) -> bytes:
    """``path`` (the export root's name for ``below``) with ``below`` swapped for ``other``: the
    second path of a rename, in the same export root."""
    return path[:len(path) - len(below)] + other


def _open_flags(pflags: int) -> int:
    """SFTP v3 open flags as open(2) flags (read-only when neither READ nor WRITE is set)."""
    if pflags & asyncssh.FXF_READ and pflags & asyncssh.FXF_WRITE:
        flags = os.O_RDWR
    elif pflags & asyncssh.FXF_WRITE:
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    for sftp_flag, os_flag in ((asyncssh.FXF_APPEND, os.O_APPEND), (asyncssh.FXF_CREAT, os.O_CREAT),
                               (asyncssh.FXF_TRUNC, os.O_TRUNC), (asyncssh.FXF_EXCL, os.O_EXCL)):
        if pflags & sftp_flag:
            flags |= os_flag
    return flags | os.O_NOCTTY


def _changes(attrs: SFTPAttrs) -> tuple:
    """(size, mode, owner, times) for ``set_fd_attrs``, from what the client set."""
    owner = (attrs.uid, attrs.gid) if attrs.uid is not None and attrs.gid is not None else None
    times = (attrs.atime, attrs.mtime) if attrs.atime is not None and attrs.mtime is not None else None
    return attrs.size, attrs.permissions, owner, times
