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

from podtwin.agent.link import wire
from podtwin.agent.streams import splice
from podtwin.agent.tasks import TaskSet
from podtwin.runner.sidecar.settings import FilesSettings

log = logging.getLogger("podtwin.sidecar.files")
MOUNT_TIMEOUT = 20.0


class FileMounts:
    def __init__(self, link, settings: FilesSettings, missing_file: Path) -> None:
        self.link, self.settings, self.missing_file = link, settings, missing_file
        self.root = Path(settings.root())
        self.proc: asyncio.subprocess.Process | None = None
        self.tasks = TaskSet("files")

    async def start(self) -> None:
        st = self.settings
        exports = wire.FsExports(tuple(wire.FsExport(e.path, e.write, e.writable, e.source) for e in st.exports),
                                 not_found=st.not_found, read_write=st.read_write, read_only=st.read_only)
        writer, reader, _ = await self.link.conn.open_session(
            subsystem=wire.SFTP_SUBSYSTEM, env={wire.FS_EXPORTS_ENV: exports.encode()}, encoding=None)
        ours, theirs = socket.socketpair()
        self.root.mkdir(parents=True, exist_ok=True)
        options = ["passive", "allow_other", "default_permissions", "dir_cache=no",
                   "ro" if not any(e.writable for e in self.settings.exports) else "rw"]
        self.proc = await asyncio.create_subprocess_exec(
            "sshfs", "-f", "-o", ",".join(options), "podtwin-agent:/", str(self.root),
            stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE)
        theirs.close()
        s_reader, s_writer = await asyncio.open_connection(sock=ours, limit=256 * 1024)
        self.tasks.spawn(splice(reader, writer, s_reader, s_writer), "sftp")
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
        self.tasks.cancel_all()


def _in_mount_table(path: Path) -> bool:
    """Whether ``path`` is a mount point, read from /proc/self/mountinfo (no access to it)."""
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)
