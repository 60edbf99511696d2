"""Backends: where the agent runs (placements) and how the session's socket reaches it
(transports); ``base`` has their contract. ``for_target`` picks the pair a session uses.

| target            | placement                                   | transport                      |
|-------------------|---------------------------------------------|--------------------------------|
| container/NAME    | docker_agent.DockerContainerAgent           | docker_agent.AgentSocket       |
| pod/, deploy/, .. | kube_agents.KubeJobAgent, or with           | kube_streams.PortForward, or   |
|                   | agent.ephemeral KubeEphemeralAgent          | with agent.transport ExecStdio |
| targetless        | kube_agents.KubeTargetlessAgent             | the same                       |

A new backend is a class beside these (a Docker engine on another host over SSH: a placement
with a remote engine and a transport that forwards the session socket) and a line here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from podtwin.runner.errors import ConfigError, PodtwinError
from podtwin.runner.targets import DockerTarget, Target, Targetless

if TYPE_CHECKING:
    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.backends.base import Placement, Transport
    from podtwin.runner.config.models import PodtwinConfig


def for_target(target: Target, cfg: "PodtwinConfig", image: str, engine: "DockerEngine", *,
               namespace: str | None = None, kubeconfig: str | None = None,
               context: str | None = None) -> tuple["Placement", "Transport"]:
    """The placement and transport for ``target`` (Kubernetes modules load only when needed)."""
    if isinstance(target, DockerTarget):
        from podtwin.runner.backends.docker_agent import AgentSocket, DockerContainerAgent

        return DockerContainerAgent(target, cfg, image, engine), AgentSocket()
    from podtwin.runner.adapters.kube import KubeEngine
    from podtwin.runner.backends.kube_agents import KubeEphemeralAgent, KubeJobAgent, KubeTargetlessAgent
    from podtwin.runner.backends.kube_streams import TRANSPORTS

    try:
        kube = KubeEngine(kubeconfig, context)
    except PodtwinError as exc:
        if isinstance(target, Targetless):
            raise ConfigError(f"no target given, and no cluster for a targetless session ({exc.message})",
                              "pass --target container/NAME or KIND/NAME, or set KUBECONFIG for a targetless "
                              "session") from exc
        raise
    kind = next(p for p in (KubeTargetlessAgent, KubeJobAgent, KubeEphemeralAgent) if p.probe(target, cfg))
    placement = kind(target, cfg, image, kube, namespace, kubeconfig, context)
    return placement, TRANSPORTS[cfg.agent.transport](kube)
