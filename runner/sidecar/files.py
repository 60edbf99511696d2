"""The target's files, sidecar side: one sshfs mount of the exported paths' tree.

sshfs (Debian's, in the podtwin image) runs with ``-o passive``: it speaks SFTP on its stdin and
stdout, which the sidecar joins to an ``sftp`` channel of its own link to the agent (the exports
in the channel's environment; the agent serves those paths only, confined to the target's root).
No second connection, no new listener. The mount sits on the session volume, which the sidecar
shares (rshared) with the Docker daemon: the app container binds each export from there at its
real path. The agent's own rules decide what is writable; the mount is read-only when nothing is.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import asyncssh

from podtwin.agent.link import wire
from podtwin.runner.sidecar.settings import FilesSettings

log = logging.getLogger("podtwin.sidecar.files")
MOUNT_TIMEOUT = 20.0
# Both ends are ours: large SSH packets carry a whole SFTP read reply (sshfs's max_read) in one,
# so each Python event loop handles a quarter of the packets that 32 KiB (SSH's usual) would need.
SFTP_READ = 131072
CHANNEL_PACKET = SFTP_READ + 1024
CHANNEL_WINDOW = 8 * 1024 * 1024


class FileMounts:
    def __init__(self, link, settings: FilesSettings, missing_file: Path) -> None:
        self.link, self.settings, self.missing_file = link, settings, missing_file
        self.root = Path(settings.root())
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: asyncssh.SSHClientChannel | None = None

    async def start(self) -> None:
        st = self.settings
        exports = wire.FsExports(tuple(wire.FsExport(e.path, e.write, e.writable, e.source) for e in st.exports),
                                 not_found=st.not_found, read_write=st.read_write, read_only=st.read_only)
        ours, theirs = socket.socketpair()
        self.root.mkdir(parents=True, exist_ok=True)
        options = ["passive", "allow_other", "default_permissions", "dir_cache=no", f"max_read={SFTP_READ}",
                   "ro" if not any(e.writable for e in self.settings.exports) else "rw"]
        self.proc = await asyncio.create_subprocess_exec(
            "sshfs", "-f", "-o", ",".join(options), "podtwin-agent:/", str(self.root),
            stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE)
        theirs.close()
        # sshfs's socket and the sftp channel, joined by callbacks: each message crosses the
        # sidecar in one call, no task wake-up per direction (a small file costs five round trips)
        loop = asyncio.get_running_loop()
        bridge = _Bridge()
        self.channel, _ = await self.link.conn.create_session(
            lambda: bridge.channel_side, subsystem=wire.SFTP_SUBSYSTEM,
            env={wire.FS_EXPORTS_ENV: exports.encode()}, encoding=None,
            window=CHANNEL_WINDOW, max_pktsize=CHANNEL_PACKET)
        await loop.connect_accepted_socket(lambda: bridge.socket_side, sock=ours)
        await self._mounted()
        missing = await asyncio.to_thread(self._missing)
        self.missing_file.write_text(json.dumps(missing))
        log.info("target files mounted: %s", ", ".join(e.path for e in self.settings.exports))

    def _missing(self) -> list[str]:
        """The exports the target does not have (a path a ``read_only`` regex named, say): the
        app must not bind them (Docker refuses a missing bind source)."""
        return [e.path for e in self.settings.exports if not os.path.lexists(f"{self.root}{e.path}")]

    async def _mounted(self) -> None:
        """Until the mount answers (the app must start on the target's files, not an empty dir).

        Never touch the mount from the event loop: its answers come through this very loop's
        pump, so a stat here would wait for itself. The kernel's mount table says when it is
        there; a stat in a worker thread, that it answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOUNT_TIMEOUT
        while not _in_mount_table(self.root):
            if self.proc is not None and self.proc.returncode is not None:
                err = (await self.proc.stderr.read()).decode(errors="replace").strip()
                raise RuntimeError(f"sshfs exited ({self.proc.returncode}): {err[-300:]}")
            if loop.time() > deadline:
                raise RuntimeError(f"the target's files were not mounted within {MOUNT_TIMEOUT:.0f}s")
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.to_thread(os.listdir, self.root), MOUNT_TIMEOUT)

    def close(self) -> None:
        """Unmount (the unmount propagates to the daemon and the app), then end sshfs."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.root)], capture_output=True)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
        if self.channel is not None:
            self.channel.close()


class _Bridge:
    """sshfs's end of a socketpair and an SSH channel, copied into each other from the event
    loop's callbacks, with flow control both ways (a full side pauses reading from the other)."""

    def __init__(self) -> None:
        bridge = self
        self.sock: asyncio.Transport | None = None
        self.chan: asyncssh.SSHClientChannel | None = None
        self.early: list[bytes] = []   # from the channel before the socket side is connected

        class ChannelSide(asyncssh.SSHClientSession):
            def connection_made(self, chan) -> None:
                bridge.chan = chan

            def data_received(self, data: bytes, datatype) -> None:
                if bridge.sock is not None:
                    bridge.sock.write(data)
                else:
                    bridge.early.append(data)

            def eof_received(self) -> bool:
                if bridge.sock is not None and bridge.sock.can_write_eof():
                    bridge.sock.write_eof()
                return True

            def connection_lost(self, exc) -> None:
                if bridge.sock is not None:
                    bridge.sock.close()   # sshfs sees EOF and exits: the mount answers ENOTCONN

            def pause_writing(self) -> None:
                if bridge.sock is not None:
                    bridge.sock.pause_reading()

            def resume_writing(self) -> None:
                if bridge.sock is not None:
                    bridge.sock.resume_reading()

        class SocketSide(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                bridge.sock = transport
                for data in bridge.early:
                    transport.write(data)
                bridge.early.clear()

            def data_received(self, data: bytes) -> None:
                if bridge.chan is not None:
                    bridge.chan.write(data)

            def eof_received(self) -> bool:
                if bridge.chan is not None:
                    bridge.chan.write_eof()
                return True

            def connection_lost(self, exc) -> None:
                if bridge.chan is not None:
                    bridge.chan.close()

            def pause_writing(self) -> None:
                if bridge.chan is not None:
                    bridge.chan.pause_reading()

            def resume_writing(self) -> None:
                if bridge.chan is not None:
                    bridge.chan.resume_reading()

        self.channel_side, self.socket_side = ChannelSide(), SocketSide()


def _in_mount_table(path: Path) -> bool:
    """Whether ``path`` is a mount point, read from /proc/self/mountinfo (no access to it)."""
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)
