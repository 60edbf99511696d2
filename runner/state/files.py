"""The files of a session directory, named once.

The runner makes the directory (mode 0700) and bind-mounts it into the agent and the sidecar at
``MOUNT_POINT``; ``SessionFiles(path)`` names the same files on the host and, with
``SessionFiles.in_container()``, as the containers see them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNT_POINT = "/podtwin"


@dataclass(frozen=True)
class SessionFiles:
    root: Path

    @classmethod
    def in_container(cls) -> "SessionFiles":
        """The session directory as the agent and the sidecar see it."""
        return cls(Path(MOUNT_POINT))

    @property
    def client_key(self) -> Path:
        """The session's private key: the only key the agent accepts (made by the runner)."""
        return self.root / "client_key"

    @property
    def client_public_key(self) -> Path:
        return self.root / "client_key.pub"

    @property
    def agent_host_key(self) -> Path:
        """The agent's private host key (Docker agents: made by the runner, read by the agent)."""
        return self.root / "agent_host_key"

    @property
    def agent_host_public_key(self) -> Path:
        """The agent's public host key: the only one the clients accept. For agents that make
        their own (Kubernetes), the runner writes it here from the agent's READY line."""
        return self.root / "agent_host_key.pub"

    @property
    def agent_socket(self) -> Path:
        """Where the link is reached: the agent's own listener (Docker) or the runner's relay of
        API-server streams (Kubernetes)."""
        return self.root / "agent.sock"

    @property
    def handoff_socket(self) -> Path:
        """A Docker agent's socket handoff (``podtwin.agent.link.handoff``): present when the agent
        shares the sidecar's kernel; the sidecar's outgoing TCP then bypasses the SSH link."""
        return self.root / "handoff.sock"

    @property
    def sidecar_settings(self) -> Path:
        """``SidecarSettings`` as JSON, written by the runner before the sidecar starts."""
        return self.root / "sidecar.json"

    @property
    def files_missing(self) -> Path:
        """The exports the target does not have (JSON list of paths), written by the sidecar once
        its mount answers: the app binds the others only."""
        return self.root / "files_missing.json"

    @property
    def owner(self) -> Path:
        """The runner's labels (PID, start time, host): tells a dead session's directory."""
        return self.root / "owner.json"

    @property
    def compose_marker(self) -> Path:
        """For the reaper: the compose project a session's service runs in (JSON: the compose
        command, the project's name, the generated file, the project directory)."""
        return self.root / "compose.json"

    @property
    def kube_marker(self) -> Path:
        """For the reaper: the kubeconfig and context of a Kubernetes session's agent."""
        return self.root / "kube.json"
