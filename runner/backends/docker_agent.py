"""The agent as a Docker container in the target container's network and PID namespaces.

The runner makes the agent's host key, so the clients can start before the agent announces
itself; the agent listens on the session directory's unix socket itself (``AgentSocket``). Today
the engine is the local one; a Docker engine on another host (over SSH) is this placement with a
remote engine, and a transport that forwards the session socket.
"""
from __future__ import annotations

from podtwin.runner.adapters.docker_engine import DockerEngine, DockerTargetInfo
from podtwin.runner.config.image import agent_image_name
from podtwin.runner.backends.base import READY_PREFIX, AgentReady, Placement, Resolved, Transport
from podtwin.runner.errors import AgentError
from podtwin.runner.targets import DockerTarget


class DockerContainerAgent(Placement):
    name = "docker-container"
    runner_makes_host_key = True   # so the sidecar can start before the agent announces itself

    def __init__(self, target: DockerTarget, cfg, image: str, engine: DockerEngine) -> None:
        super().__init__(target, cfg, image)
        self.engine = engine
        self.info: DockerTargetInfo | None = None
        self.session = None
        self.agent_id: str | None = None
        self.guard_id: str | None = None

    def default_agent_image(self, image: str) -> str:
        return agent_image_name(image)   # the agent image built beside it

    def local_images(self) -> tuple[str, ...]:
        return (self.sidecar_image, self.image)

    @classmethod
    def probe(cls, target, cfg) -> bool:
        return isinstance(target, DockerTarget)

    def resolve(self, progress) -> Resolved:
        self.info = self.engine.get_target(self.target.name)
        return Resolved(str(self.target), self.info.hostname, self.info.mounts, self.info.user, self.info.groups)

    def setup(self, session, progress) -> None:
        assert self.info is not None
        self.session = session
        timeout = self.cfg.agent.startup_timeout
        if self.incoming == "steal":
            # Started first: it removes the session's incoming rules from the target's namespace
            # once the agent is gone, however the agent went.
            self.guard_id = self.engine.start_rules_guard(session, self.info, self.image, timeout)
        progress(f"session {session.id}: starting the agent in {self.target}'s namespaces, and the sidecar")
        self.agent_id = self.engine.start_agent(session, self.info, self.image, timeout,
                                                self.cfg.agent.communication_timeout, self.cfg.agent.reconnect_grace,
                                                incoming=self.incoming,
                                                writes_files=self.cfg.feature.fs.may_write())

    def wait_ready(self, progress) -> AgentReady:
        assert self.agent_id is not None and self.session is not None
        line = self.engine.wait_for_line(self.agent_id, READY_PREFIX, self.cfg.agent.startup_timeout, "agent")
        ready = AgentReady.parse(line)
        ours = self.session.files.agent_host_public_key.read_text().split()[:2]
        if ready.host_key.split()[:2] != ours:
            raise AgentError("the agent announced a host key that is not this session's",
                             "make sure nothing else writes to the session directory")
        return ready

    def agent_gone(self) -> bool:
        return self.agent_id is not None and not self.engine.is_running(self.agent_id)

    def restore(self) -> None:
        # After the link closes the agent removes its rules and exits; give it that moment. The
        # guard goes last: it cleans up after an agent that could not.
        if self.agent_id:
            self.engine.remove_when_exited(self.agent_id, 3)
        if self.guard_id:
            self.engine.remove_when_exited(self.guard_id, 5)


class AgentSocket(Transport):
    """The agent listens on the session's socket itself (bind-mounted session directory)."""

    name = "unix-socket"
    what = "session socket"

    def setup(self, session, ready, loop) -> None:
        pass

    def restore(self) -> None:
        pass
