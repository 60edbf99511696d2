"""What the agent reads from the target's main process: environment, resolver files, hostname.

Everything goes through /proc/PID, so it works the same whether the agent shares the target's PID
namespace (Docker: ``--pid container:T``, the target is PID 1) or sees it from the host's PID
namespace (Kubernetes node agent with hostPID). Reading another process's environ and root needs
CAP_SYS_PTRACE when the agent's credentials differ from the target's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from podtwin.agent.link.wire import Info


@dataclass(frozen=True)
class TargetProcess:
    pid: int
    proc: Path = Path("/proc")
    targetless: bool = False   # the agent itself, with no target: its pod's network, no environment

    @property
    def root(self) -> Path:
        return self.proc / str(self.pid) / "root"

    def exists(self) -> bool:
        return (self.proc / str(self.pid)).is_dir()

    def environ(self) -> dict[str, str]:
        if self.targetless:
            return {}
        raw = (self.proc / str(self.pid) / "environ").read_bytes()
        env: dict[str, str] = {}
        for item in raw.split(b"\0"):
            if not item or b"=" not in item:
                continue
            key, _, value = item.partition(b"=")
            env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
        return env

    def read_text(self, path: str, default: str = "") -> str:
        """A file as the target sees it, e.g. read_text('/etc/resolv.conf')."""
        try:
            return (self.root / path.lstrip("/")).read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return default

    def hostname(self) -> str:
        name = self.read_text("/etc/hostname").strip()
        if name:
            return name
        return self.environ().get("HOSTNAME", "")

    def info(self) -> Info:
        return Info(pid=self.pid, env=self.environ(), resolv_conf=self.read_text("/etc/resolv.conf"),
                    hosts=self.read_text("/etc/hosts"), hostname=self.hostname(), ipv6=self.has_ipv6())

    def has_ipv6(self) -> bool:
        """Whether the target's network namespace has a global IPv6 address (not loopback, not
        link-local): ``/proc/PID/net/if_inet6`` lists its addresses, scope 00 being global."""
        try:
            lines = (self.proc / str(self.pid) / "net" / "if_inet6").read_text().splitlines()
        except OSError:
            return False
        return any(len(f) >= 6 and f[3] == "00" and f[5] != "lo" for f in (line.split() for line in lines))
