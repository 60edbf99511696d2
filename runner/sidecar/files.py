"""The target's files, sidecar side: one sshfs mount of the exported paths' tree.

sshfs (Debian's, in the podtwin image) runs with ``-o directport``: it speaks plain SFTP to a
loopback port of the sidecar's, and the sidecar joins each connection there to an ``sftp``
channel of its own link to the agent (the exports in the channel's environment; the agent serves
those paths only, confined to the target's root). With ``-o reconnect``, when the link breaks,
sshfs answers the calls in flight with EIO, and the next call connects again: the sidecar holds
that connection until the link is back (``LinkKeeper.wait``), so the app's file calls wait out a
blip. Files opened before it give EIO and must be opened again (sshfs's own rule: a handle
never crosses to a new SFTP session). The port serves exactly the exports the app has mounted
anyway, and is kept out of incoming traffic's port following.

The mount sits on the session volume, which the sidecar shares (rshared) with the Docker daemon:
the app container binds each export from there at its real path. The agent's own rules decide
what is writable; the mount is read-only when nothing is.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Callable

import asyncssh

from podtwin.agent.link import wire
from podtwin.agent.sockopts import no_delay
from podtwin.agent.tasks import TaskSet
from podtwin.runner.sidecar.settings import FilesSettings

log = logging.getLogger("podtwin.sidecar.files")
MOUNT_TIMEOUT = 20.0
# Both ends are ours: large SSH packets carry a whole SFTP read reply (sshfs's max_read) in one,
# so each Python event loop handles a quarter of the packets that 32 KiB (SSH's usual) would need.
SFTP_READ = 131072
CHANNEL_PACKET = SFTP_READ + 1024
CHANNEL_WINDOW = 8 * 1024 * 1024


class FileMounts:
    def __init__(self, links, settings: FilesSettings, missing_file: Path) -> None:
        self.links, self.settings, self.missing_file = links, settings, missing_file
        self.root = Path(settings.root())
        self.proc: asyncio.subprocess.Process | None = None
        self.channels: set = set()
        self.joining = TaskSet("files")
        # bound now, so the port is known (and kept out of incoming's port following) at once
        self.listener = no_delay(socket.create_server(("127.0.0.1", 0)))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.server: asyncio.base_events.Server | None = None
        self.exports = wire.FsExports(
            tuple(wire.FsExport(e.path, e.write, e.writable, e.source) for e in settings.exports),
            not_found=settings.not_found, read_write=settings.read_write, read_only=settings.read_only).encode()

    async def start(self) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Bridge(self._connected).socket_side, sock=self.listener)
        self.root.mkdir(parents=True, exist_ok=True)
        options = [f"directport={self.port}", "reconnect", "allow_other", "default_permissions", "dir_cache=no",
                   f"max_read={SFTP_READ}", "ro" if not any(e.writable for e in self.settings.exports) else "rw"]
        self.proc = await asyncio.create_subprocess_exec(
            "sshfs", "-f", "-o", ",".join(options), "127.0.0.1:/", str(self.root),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await self._mounted()
        missing = await asyncio.to_thread(self._missing)
        self.missing_file.write_text(json.dumps(missing))
        log.info("target files mounted: %s", ", ".join(e.path for e in self.settings.exports))

    def _connected(self, bridge: "_Bridge") -> None:
        """sshfs connected (at the mount, and again after each break): join it to a new sftp
        channel once the link is up."""
        self.joining.spawn(self._join(bridge), "join")

    async def _join(self, bridge: "_Bridge") -> None:
        assert bridge.sock is not None
        try:
            link = await self.links.wait()
            channel, _ = await link.conn.create_session(
                lambda: bridge.channel_side, subsystem=wire.SFTP_SUBSYSTEM,
                env={wire.FS_EXPORTS_ENV: self.exports}, encoding=None,
                window=CHANNEL_WINDOW, max_pktsize=CHANNEL_PACKET)
        except (asyncssh.Error, OSError) as exc:   # LinkDown is a ConnectionError
            log.warning("files: no sftp channel: %s", exc)
            bridge.sock.close()
            return
        self.channels = {c for c in self.channels if not c.is_closing()} | {channel}   # one per connection
        if bridge.sock.is_closing():
            channel.close()
        else:
            bridge.ready()   # the subsystem runs now: sshfs's bytes may flow

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
        if self.server is not None:
            self.server.close()
        self.listener.close()
        self.joining.cancel_all()
        for channel in self.channels:
            channel.close()


class _Bridge:
    """One sshfs connection and an SSH channel, copied into each other from the event loop's
    callbacks, with flow control both ways (a full side pauses reading from the other). The
    socket is read only once the channel's subsystem runs (``on_connect`` makes it)."""

    def __init__(self, on_connect: Callable[["_Bridge"], None]) -> None:
        bridge = self
        self.sock: asyncio.Transport | None = None
        self.chan: asyncssh.SSHClientChannel | None = None
        self.flowing = False
        self.early: list[bytes] = []   # from sshfs before the subsystem runs (older Pythons
        # start reading a new transport even when connection_made paused it)

        class ChannelSide(asyncssh.SSHClientSession):
            def connection_made(self, chan) -> None:
                bridge.chan = chan

            def data_received(self, data: bytes, datatype) -> None:
                if bridge.sock is not None:
                    bridge.sock.write(data)

            def eof_received(self) -> bool:
                if bridge.sock is not None and bridge.sock.can_write_eof():
                    bridge.sock.write_eof()
                return True

            def connection_lost(self, exc) -> None:
                if bridge.sock is not None:
                    bridge.sock.close()   # sshfs fails the calls in flight and connects again

            def pause_writing(self) -> None:
                if bridge.sock is not None:
                    bridge.sock.pause_reading()

            def resume_writing(self) -> None:
                if bridge.sock is not None:
                    bridge.sock.resume_reading()

        class SocketSide(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                bridge.sock = transport
                transport.pause_reading()
                on_connect(bridge)

            def data_received(self, data: bytes) -> None:
                if bridge.flowing:
                    bridge.chan.write(data)
                else:
                    bridge.early.append(data)

            def eof_received(self) -> bool:
                if bridge.flowing:
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

    def ready(self) -> None:
        """The channel's subsystem runs: pass on what sshfs sent meanwhile, then everything."""
        assert self.chan is not None and self.sock is not None
        self.flowing = True
        for data in self.early:
            self.chan.write(data)
        self.early.clear()
        self.sock.resume_reading()


def _in_mount_table(path: Path) -> bool:
    """Whether ``path`` is a mount point, read from /proc/self/mountinfo (no access to it)."""
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)
