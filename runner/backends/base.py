"""The two kinds of backend a session is made of, and what passes between them.

* A **placement** puts the agent next to the target: it resolves the target, starts the agent
  (and, for steal, the rules guard that outlives it), waits for its READY line, and removes what
  it started. Docker container, Kubernetes Job, Kubernetes ephemeral container.
* A **transport** makes the agent reachable at the session's unix socket, where the owner link
  and the sidecar connect: the agent's own socket (Docker), API-server port-forward or exec
  streams (Kubernetes).

Each is a class with ``probe`` (does it serve this target and config?), ``setup`` and a matching
``restore``; the session pipeline records ``restore`` before it calls ``setup``.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from podtwin.runner.errors import AgentError

if TYPE_CHECKING:
    from podtwin.runner.config.models import PodtwinConfig
    from podtwin.runner.link.loop import LoopThread
    from podtwin.runner.progress import Progress
    from podtwin.runner.state.session import Session
    from podtwin.runner.targets import Target

READY_PREFIX = "PODTWIN_AGENT_READY "


@dataclass(frozen=True)
class Resolved:
    """The target as found: what to call it in progress lines, the host name the app gets, and
    the paths of its mounted volumes (with whether the target may write them)."""

    description: str
    hostname: str
    mounts: tuple[tuple[str, bool], ...] = ()
    user: str = ""                  # the target's user, as `docker run --user` takes it ("" if it names none)
    groups: tuple[str, ...] = ()    # its extra groups (a pod's fsGroup and supplementalGroups)


@dataclass(frozen=True)
class AgentReady:
    """The agent's READY line: its host key, and where a transport reaches it."""

    host_key: str
    port: int | None = None          # its loopback listener (Kubernetes agents)
    exec_socket: str | None = None   # a unix socket for exec'd relays (a node agent in another netns)
    pod: str = ""                    # the pod and container it runs in (Kubernetes agents)
    container: str = ""
    namespace: str = ""

    @classmethod
    def parse(cls, line: str, **where: str) -> "AgentReady":
        try:
            body = json.loads(line.removeprefix(READY_PREFIX))
            return cls(host_key=str(body["host_key"]), port=body.get("port"),
                       exec_socket=body.get("exec_socket"), **where)
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"the agent's READY line is not understood: {line[:200]!r}",
                             "use the podtwin image built from this podtwin version (`podtwin images build`)") from exc


class Placement(ABC):
    """Where the agent runs."""

    name: ClassVar[str]
    what: ClassVar[str] = "agent"
    # Whether the runner makes the agent's host key (and the agent reads it from the session
    # directory), or the agent makes its own and announces it in its READY line.
    runner_makes_host_key: ClassVar[bool] = False
    # Whether there is a target whose incoming traffic a session can mirror or steal, and whose
    # files it can mount (a targetless agent has neither: its own pod is not the app's).
    serves_incoming: ClassVar[bool] = True
    serves_files: ClassVar[bool] = True

    def __init__(self, target: "Target", cfg: "PodtwinConfig", image: str) -> None:
        self.target, self.cfg = target, cfg
        self.image = cfg.agent.image or self.default_agent_image(image)   # agent.image wins
        self.sidecar_image = image                 # the local podtwin image the sidecar runs
        self.incoming = cfg.feature.network.incoming.mode if cfg.feature.network.incoming.mode != "off" else None

    def default_agent_image(self, image: str) -> str:
        """The agent's image when agent.image names none, beside the podtwin image ``image``."""
        raise NotImplementedError

    def local_images(self) -> tuple[str, ...]:
        """The images the local Docker engine must have: the sidecar's (a cluster pulls the
        agent's itself)."""
        return (self.sidecar_image,)

    @classmethod
    @abstractmethod
    def probe(cls, target: "Target", cfg: "PodtwinConfig") -> bool:
        """Whether this placement serves ``target`` with ``cfg``."""

    @abstractmethod
    def resolve(self, progress: "Progress") -> Resolved:
        """Find the target (a running container, a ready pod); nothing is made yet."""

    @abstractmethod
    def setup(self, session: "Session", progress: "Progress") -> None:
        """Start the agent (and, for steal, its rules guard) without waiting for it."""

    @abstractmethod
    def wait_ready(self, progress: "Progress") -> AgentReady:
        """Until the agent has announced itself."""

    @abstractmethod
    def restore(self) -> None:
        """Remove what setup started (the agent removes its own rules as it exits)."""

    def agent_gone(self) -> bool:
        """Whether the agent is known to have ended (asked while the link is down: a gone agent
        ends the session at once instead of after agent.reconnect_grace). False: running, or
        cannot tell."""
        return False


class Transport(ABC):
    """How the session's unix socket reaches the agent."""

    name: ClassVar[str]
    what: ClassVar[str]
    hint: ClassVar[str] = ""

    @abstractmethod
    def setup(self, session: "Session", ready: AgentReady, loop: "LoopThread") -> None:
        """Make the agent reachable at the session's socket."""

    @abstractmethod
    def restore(self) -> None:
        """Stop serving the session's socket and close every stream."""

    def failure(self) -> str | None:
        """Why the link could not be opened, when the transport knows better than the link."""
        return None
