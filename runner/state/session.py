"""A session's identity: its id, its private directory, its keys, and the labels on everything
it creates (by which `sessions`, `clean` and the reaper find it, and tell a dead runner's).

The session directory (mode 0700, its files named in ``files``) is bind-mounted into the agent
and the sidecar. It holds the session's SSH keys and the agent's unix socket: the link has no
network listener at all, so nothing outside this session can reach the agent.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from podtwin.runner.errors import ConfigError
from podtwin.runner.state.files import SessionFiles

MAX_UNIX_PATH = 107   # sun_path holds 108 bytes, the terminating NUL included
LABEL_SESSION = "podtwin.session"
LABEL_ROLE = "podtwin.role"
LABEL_TARGET = "podtwin.target"
LABEL_RUNNER_PID = "podtwin.runner-pid"
LABEL_HOST = "podtwin.host"
LABEL_RUNNER_START = "podtwin.runner-start"


def state_dir() -> Path:
    return Path(os.environ.get("PODTWIN_STATE_DIR", "~/.cache/podtwin")).expanduser()


def check_state_dir(session_dir: Path | None = None) -> None:
    """Refuse, in one line and before anything starts, a state directory no session could use:
    too long for the session's unix socket, not a directory, or not writable."""
    path = session_dir or sessions_dir() / ("x" * 8)   # a session's directory: 8 hex digits
    if len(bytes(SessionFiles(path).agent_socket)) > MAX_UNIX_PATH:
        raise ConfigError(f"the state directory {state_dir()} is too long a path for the session's unix socket",
                          "set PODTWIN_STATE_DIR to a shorter path")
    existing = next((p for p in (sessions_dir(), *sessions_dir().parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot use the state directory {state_dir()} ({existing} is "
                          f"{'not a directory' if not existing.is_dir() else 'not writable'})",
                          "set PODTWIN_STATE_DIR to a writable directory")


def sessions_dir() -> Path:
    return state_dir() / "sessions"


@dataclass
class Session:
    id: str
    target: str
    dir: Path
    runner_pid: int = field(default_factory=os.getpid)
    owner_lock: int | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, target: str) -> "Session":
        sid = secrets.token_hex(4)
        path = sessions_dir() / sid
        check_state_dir(path)
        try:
            path.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot use the state directory {state_dir()} ({exc.strerror or exc})",
                              "set PODTWIN_STATE_DIR to a writable directory") from exc
        path.chmod(0o700)
        session = cls(sid, target, path)
        session.files.owner.write_text(json.dumps(session.labels("runner")))
        session.hold_owner_lock()
        return session

    def hold_owner_lock(self) -> None:
        """Lock the owner file for as long as this process lives: the kernel lets go when it
        dies, however it dies. An agent on this kernel (a Docker target's) tells a dead runner
        from a broken link by it (``agent --runner-lock``). The descriptor is not inherited."""
        fd = os.open(self.files.owner, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:   # a file system without locks: the agent then waits out its grace
            os.close(fd)
            return
        self.owner_lock = fd

    @property
    def files(self) -> SessionFiles:
        return SessionFiles(self.dir)

    def name(self, role: str) -> str:
        return f"podtwin-{self.id}-{role}"

    def labels(self, role: str) -> dict[str, str]:
        return {
            LABEL_SESSION: self.id,
            LABEL_ROLE: role,
            LABEL_TARGET: self.target,
            LABEL_RUNNER_PID: str(self.runner_pid),
            LABEL_RUNNER_START: process_start(self.runner_pid),
            LABEL_HOST: socket.gethostname(),
        }

    def write_keys(self, agent_host_key: bool = True) -> None:
        """Fresh ed25519 keys for this session only: the client key (the agent accepts nothing
        else) and, unless the agent makes its own (``agent_host_key=False``), the agent's host key
        (the clients accept nothing else)."""
        import asyncssh  # heavy import, only when a session really starts

        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"podtwin-{self.id}")
        files = self.files
        files.client_key.write_bytes(key.export_private_key())
        files.client_key.chmod(0o600)
        files.client_public_key.write_bytes(key.export_public_key())
        if not agent_host_key:
            return
        host = asyncssh.generate_private_key("ssh-ed25519", comment=f"podtwin-agent-{self.id}")
        files.agent_host_key.write_bytes(host.export_private_key())
        files.agent_host_key.chmod(0o600)
        files.agent_host_public_key.write_bytes(host.export_public_key())

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.owner_lock is not None:
            os.close(self.owner_lock)
            self.owner_lock = None


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the PID
    it names one process for good, so a reused PID is not taken for a live runner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def dir_owner_alive(path: Path) -> bool:
    """Whether the runner that created a session directory still runs."""
    try:
        labels = json.loads(SessionFiles(path).owner.read_text())
    except (OSError, ValueError):
        return False
    return runner_alive(labels)


def runner_alive(labels: dict[str, str]) -> bool:
    """Whether the runner that owns objects with these labels still runs (on this host)."""
    if labels.get(LABEL_HOST) != socket.gethostname():
        return True  # another machine's session: not ours to judge
    try:
        pid = int(labels.get(LABEL_RUNNER_PID, "0"))
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = labels.get(LABEL_RUNNER_START)
    return not recorded or recorded == process_start(pid)
