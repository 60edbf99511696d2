"""The agent next to a Kubernetes target: a Job pod on the target's node, or an ephemeral
container in the target pod (``agent.ephemeral``). See docs/kubernetes.md for the privileges of
each."""
from __future__ import annotations

import json

from podtwin.runner.adapters.kube import AGENT_PORT, KubeEngine, PodTarget
from podtwin.runner.backends.base import AgentReady, Placement, Resolved
from podtwin.runner.config.image import cluster_agent_image
from podtwin.runner.targets import KubeTarget, Targetless


class _KubeAgent(Placement):
    def __init__(self, target: KubeTarget, cfg, image: str, kube: KubeEngine, namespace: str | None,
                 kubeconfig: str | None, context: str | None) -> None:
        super().__init__(target, cfg, image)
        self.kube, self.namespace = kube, namespace
        self.kubeconfig, self.context = kubeconfig, context
        self.pod: PodTarget | None = None
        self.session = None
        self.ready: AgentReady | None = None

    def default_agent_image(self, image: str) -> str:
        return cluster_agent_image()   # what the cluster's nodes can pull

    def resolve(self, progress) -> Resolved:
        progress(f"resolving {self.target}")
        pod = self.pod = self.kube.resolve(self.target, self.namespace)
        progress(f"target: pod {pod.namespace}/{pod.pod}, container {pod.container}, node {pod.node}")
        if pod.mesh:
            progress.warn(f"podtwin: the target pod runs a service-mesh proxy ({pod.mesh}): outgoing traffic "
                          "goes through it as the pod's own does" + (
                              "; incoming traffic from meshed clients is mTLS, which podtwin cannot read "
                              "(steal and mirror serve plaintext clients only; see docs/kubernetes.md)"
                              if self.incoming else ""))
        run_as = pod.run_as or {}
        user = "" if run_as.get("runAsUser") is None else ":".join(
            str(v) for v in (run_as["runAsUser"], run_as.get("runAsGroup")) if v is not None)
        return Resolved(f"pod {pod.namespace}/{pod.pod}", pod.hostname or pod.pod, pod.mounts,
                        user, tuple(str(g) for g in pod.groups))

    def _begin(self, session) -> str:
        """For the reaper: where this session's agent lives, so it can remove it after a crash."""
        self.session = session
        session.files.kube_marker.write_text(json.dumps({"kubeconfig": self.kubeconfig, "context": self.context}))
        return session.files.client_public_key.read_text().strip()

    def agent_gone(self) -> bool:
        ready = self.ready
        return ready is not None and self.kube.container_ended(ready.namespace, ready.pod, ready.container)

    def _announce(self, line: str, **where: str) -> AgentReady:
        """The agent made its own host key: the clients accept that one only."""
        ready = AgentReady.parse(line, **where)
        path = self.session.files.agent_host_public_key
        partial = path.with_name(path.name + ".new")   # the sidecar waits for it: never half-written
        partial.write_text(ready.host_key + "\n")
        partial.replace(path)
        self.ready = ready
        return ready


class KubeJobAgent(_KubeAgent):
    """A Job pod on the target's node (hostPID, named capabilities; it finds the target's process
    by its container ID and enters its network namespace)."""

    name = "kube-job"
    what = "agent job"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job: tuple[str, str] | None = None

    @classmethod
    def probe(cls, target, cfg) -> bool:
        return isinstance(target, KubeTarget) and not cfg.agent.ephemeral

    def setup(self, session, progress) -> None:
        public_key = self._begin(session)
        progress(f"session {session.id}: creating the agent Job on node {self.pod.node}")
        self.job = self.kube.start_agent(session, self.pod, self.image, self.cfg.agent, public_key, self.incoming,
                                         writes_files=self.cfg.feature.fs.may_write())

    def wait_ready(self, progress) -> AgentReady:
        ns, job = self.job
        pod, line = self.kube.wait_agent(ns, job, self.cfg.agent.startup_timeout, progress)
        ready = self._announce(line, namespace=ns, pod=pod, container="agent")
        if not ready.port:
            ready = self.ready = AgentReady(**{**ready.__dict__, "port": AGENT_PORT})
        return ready

    def restore(self) -> None:
        if self.job:
            self.kube.delete_job(*self.job)


class KubeEphemeralAgent(_KubeAgent):
    """An ephemeral container in the target pod: no hostPID, no setns. Kubernetes cannot remove an
    ephemeral container: it exits when the session ends (END, from the runner or, if the runner
    died, from its guard), when nobody connects within agent.startup_timeout, or when its link
    stays broken past agent.reconnect_grace; it stays in the pod's spec as a terminated container."""

    name = "kube-ephemeral"
    what = "ephemeral agent"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.container: str | None = None

    @classmethod
    def probe(cls, target, cfg) -> bool:
        return isinstance(target, KubeTarget) and cfg.agent.ephemeral

    def setup(self, session, progress) -> None:
        public_key = self._begin(session)
        progress(f"session {session.id}: adding the agent to pod {self.pod.pod} as an ephemeral container")
        self.container = self.kube.start_ephemeral_agent(session, self.pod, self.image, self.cfg.agent,
                                                         public_key, self.incoming)

    def wait_ready(self, progress) -> AgentReady:
        pod = self.pod
        guard = self.session.name("rules-guard") if self.incoming == "steal" else None
        line = self.kube.wait_ephemeral_agent(pod.namespace, pod.pod, self.container,
                                              self.cfg.agent.startup_timeout, progress, guard=guard)
        ready = self._announce(line, namespace=pod.namespace, pod=pod.pod, container=self.container)
        # Nobody can delete it: if this process dies, its guard connects and ends the session.
        marker = self.session.files.kube_marker
        marker.write_text(json.dumps({**json.loads(marker.read_text()),
                                      "end": {"transport": self.cfg.agent.transport, "ready": ready.__dict__}}))
        return ready

    def restore(self) -> None:
        pass  # it exits by itself once the link closes


class KubeTargetlessAgent(_KubeAgent):
    """No target (mirrord's targetless mode): a Job pod of the session's own in the namespace,
    which asks for nothing (no hostPID, no capability, not root). The app gets no environment;
    its outgoing traffic and DNS leave from that pod; there is no incoming traffic to take."""

    name = "kube-targetless"
    what = "agent job"
    serves_incoming = False
    serves_files = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job: tuple[str, str] | None = None
        self.incoming = None

    @classmethod
    def probe(cls, target, cfg) -> bool:
        return isinstance(target, Targetless)

    def resolve(self, progress) -> Resolved:
        ns = self.cfg.agent.namespace or self.namespace or self.kube.default_namespace
        self.ns = ns
        if self.cfg.feature.network.incoming.mode != "off":
            progress("targetless: only outgoing traffic and DNS are bridged (there is no target for incoming "
                     "traffic, no environment and no files)")
        return Resolved(f"targetless in namespace {ns}", "")

    def setup(self, session, progress) -> None:
        public_key = self._begin(session)
        progress(f"session {session.id}: creating a targetless agent Job in namespace {self.ns}")
        self.job = self.kube.start_targetless_agent(session, self.ns, self.image, self.cfg.agent, public_key)

    wait_ready = KubeJobAgent.wait_ready

    def restore(self) -> None:
        if self.job:
            self.kube.delete_job(*self.job)
