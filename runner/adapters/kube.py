"""Everything podtwin asks of a Kubernetes cluster. The only module that imports ``kubernetes``.

Resolves a target to one running, ready pod and container; runs the agent as a Job pinned to that
pod's node (hostPID, named capabilities only) or as an ephemeral container in the target pod;
reports scheduling, image and Pod Security problems as they happen; opens port-forward or exec
streams to the agent. API errors become PodtwinErrors with a hint.
"""
from __future__ import annotations

import ast
import difflib
import json
import logging
import posixpath
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import certifi
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream
from requests.utils import should_bypass_proxies
from websocket import ABNF, WebSocketException

from podtwin.runner.errors import (AgentError, ClusterUnavailable, Forbidden, ImageMissing, PodtwinError, SessionError,
                                   TargetError)
from podtwin.runner.state.session import LABEL_SESSION, Session
from podtwin.runner.targets import KubeTarget

log = logging.getLogger("podtwin.kube")
AGENT_PORT = 44128
MESH_SIDECARS = {"istio-proxy", "linkerd-proxy", "istio-init", "linkerd-init", "envoy", "vault-agent"}
MESH_PROXIES = {"istio-proxy", "linkerd-proxy", "envoy"}   # those that take the pod's traffic


@dataclass(frozen=True)
class PodTarget:
    namespace: str
    pod: str
    container: str
    container_id: str
    node: str
    pod_ip: str
    run_as: dict | None = None   # the target container's runAsUser/runAsGroup, when its spec names them
    mesh: str | None = None      # the service-mesh proxy container in the pod, if any
    hostname: str = ""           # what the pod's containers see as their host name
    mounts: tuple[tuple[str, bool], ...] = ()   # the container's volumeMounts: (mountPath, writable)
    groups: tuple[int, ...] = ()                 # the pod's fsGroup and supplementalGroups


def _label(value: str) -> str:
    return value.replace("/", "_")[:63]


class KubeEngine:
    def __init__(self, kubeconfig: str | None = None, context: str | None = None,
                 probe_timeout: float = 10) -> None:
        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
        except config.ConfigException as exc:
            raise ClusterUnavailable(f"no usable kubeconfig ({exc})") from exc
        except FileNotFoundError as exc:
            raise ClusterUnavailable(f"kubeconfig not found: {exc.filename}") from exc
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        # Port-forward and exec streams: the client's stream() swaps its ApiClient's call_api for a
        # WebSocket one while it opens a stream, so streams get an ApiClient of their own (a
        # Job deletion on another thread must not go out as a WebSocket request), opened one at
        # a time.
        self.streams = client.CoreV1Api(client.ApiClient())
        self.streams_lock = threading.Lock()
        self._tls: ssl.SSLContext | bool | None = None   # the port-forwards' TLS, made once
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        self.default_namespace = (active.get("context") or {}).get("namespace") or "default"
        try:
            client.VersionApi(self.api).get_code(_request_timeout=probe_timeout)
        except ApiException as exc:
            raise self._error(exc, "reach the cluster") from exc
        except Exception as exc:  # urllib3 connection errors, TLS errors
            raise ClusterUnavailable(f"the cluster does not answer ({type(exc).__name__}: {str(exc)[:200]})") from exc

    # -- errors -----------------------------------------------------------------------------
    def _error(self, exc: ApiException, doing: str) -> PodtwinError:
        body = {}
        try:
            body = json.loads(exc.body or "{}")
        except ValueError:
            pass
        message = body.get("message") or exc.reason or str(exc)
        if exc.status == 0 and "Handshake status 403" in message:  # a refused WebSocket upgrade
            exc.status, message = 403, _handshake_message(message)
        if exc.status == 401:
            return ClusterUnavailable.credentials_refused(doing)
        if exc.status == 403:
            if "PodSecurity" in message:
                return pod_security_error(message, ephemeral="ephemeral" in doing)
            details = body.get("details") or {}
            return Forbidden(f"not allowed to {doing}: {message[:300]}"
                             + (f" (resource {details.get('kind')})" if details.get("kind") else ""))
        return SessionError(f"could not {doing}: {message[:300]}")

    # -- targets ----------------------------------------------------------------------------
    def resolve(self, target: KubeTarget, namespace: str | None) -> PodTarget:
        ns = namespace or self.default_namespace
        try:
            pods = self._pods_for(target, ns)
        except ApiException as exc:
            if exc.status == 404:
                raise TargetError(f"{target} not found in namespace {ns}", self._close_names(target, ns)) from exc
            raise self._error(exc, f"read {target.kind} {target.name} in {ns}") from exc
        ready = [p for p in pods if p.status.phase == "Running" and _ready(p)]
        if not ready:
            raise TargetError(f"{target} in {ns} has no running, ready pod",
                              f"check `kubectl -n {ns} get pods` for {target.name}")
        pod = sorted(ready, key=lambda p: p.metadata.creation_timestamp)[0]  # the oldest ready pod
        return self._pod_target(pod, target.container)

    def _pods_for(self, target: KubeTarget, ns: str) -> list:
        kind = target.kind
        if kind == "pod":
            return [self.core.read_namespaced_pod(target.name, ns)]
        if kind == "deployment":
            selector = self.apps.read_namespaced_deployment(target.name, ns).spec.selector
        elif kind == "statefulset":
            selector = self.apps.read_namespaced_stateful_set(target.name, ns).spec.selector
        elif kind == "replicaset":
            selector = self.apps.read_namespaced_replica_set(target.name, ns).spec.selector
        elif kind == "job":
            selector = self.batch.read_namespaced_job(target.name, ns).spec.selector
        elif kind == "cronjob":
            self.batch.read_namespaced_cron_job(target.name, ns)
            jobs = [j for j in self.batch.list_namespaced_job(ns).items
                    if any(o.kind == "CronJob" and o.name == target.name
                           for o in j.metadata.owner_references or [])]
            return [p for j in jobs for p in self._pods_by_labels(ns, j.spec.selector.match_labels)]
        elif kind == "service":
            svc = self.core.read_namespaced_service(target.name, ns)
            if not svc.spec.selector:
                raise TargetError(f"{target} has no selector (no pods behind it)")
            return self._pods_by_labels(ns, svc.spec.selector)
        else:
            raise TargetError(f"{kind} targets are not supported yet")
        return self._pods_by_labels(ns, selector.match_labels or {})

    def _pods_by_labels(self, ns: str, labels: dict) -> list:
        selector = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        return self.core.list_namespaced_pod(ns, label_selector=selector).items

    def _pod_target(self, pod, container: str | None) -> PodTarget:
        statuses = {s.name: s for s in pod.status.container_statuses or []}
        names = [c.name for c in pod.spec.containers]
        if container is None:
            candidates = [n for n in names if n not in MESH_SIDECARS] or names
            container = candidates[0]
            if len(names) > 1:
                log.warning("pod %s has containers %s; using %s (choose with /container/NAME)",
                            pod.metadata.name, ", ".join(names), container)
        if container not in statuses:
            raise TargetError(f"pod {pod.metadata.name} has no container {container!r}",
                              f"its containers: {', '.join(names)}")
        status = statuses[container]
        if not status.container_id or not status.ready:
            raise TargetError(f"container {container} of pod {pod.metadata.name} is not running and ready")
        spec = next(c for c in pod.spec.containers if c.name == container)
        sc, psc = spec.security_context, pod.spec.security_context   # the container's wins
        run_as = {key: next((getattr(c, attr) for c in (sc, psc) if c is not None and getattr(c, attr) is not None), None)
                  for key, attr in (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group"))}
        run_as = run_as if any(v is not None for v in run_as.values()) else None
        mesh = next((n for n in names + [c.name for c in pod.spec.init_containers or []]
                     if n in MESH_PROXIES), None)   # native sidecars are init containers
        return PodTarget(pod.metadata.namespace, pod.metadata.name, container, status.container_id,
                         pod.spec.node_name, pod.status.pod_ip or "", run_as, mesh,
                         hostname=(pod.spec.hostname or pod.metadata.name)[:63],
                         mounts=tuple((posixpath.normpath(m.mount_path), not m.read_only)
                                      for m in spec.volume_mounts or [] if posixpath.normpath(m.mount_path) != "/"),
                         groups=tuple(dict.fromkeys(g for g in [psc and psc.fs_group, *((psc and psc.supplemental_groups)
                                                                                       or [])] if g is not None)))

    def _close_names(self, target: KubeTarget, ns: str) -> str:
        listers = {"pod": lambda: self.core.list_namespaced_pod(ns).items,
                   "deployment": lambda: self.apps.list_namespaced_deployment(ns).items,
                   "statefulset": lambda: self.apps.list_namespaced_stateful_set(ns).items,
                   "service": lambda: self.core.list_namespaced_service(ns).items,
                   "job": lambda: self.batch.list_namespaced_job(ns).items,
                   "cronjob": lambda: self.batch.list_namespaced_cron_job(ns).items}
        try:
            names = [o.metadata.name for o in listers.get(target.kind, lambda: [])()]
        except ApiException:
            return f"check the name with `kubectl -n {ns} get {target.kind}`"
        close = difflib.get_close_matches(target.name, names, n=3)
        if close:
            return "did you mean " + ", ".join(f"{target.kind}/{n}" for n in close) + "?"
        return f"check the name with `kubectl -n {ns} get {target.kind}`"

    # -- the agent ----------------------------------------------------------------------------
    def start_agent(self, session: Session, pod: PodTarget, image: str, agent_cfg, public_key: str,
                    incoming: str | None, writes_files: bool = False) -> tuple[str, str]:
        """A Job whose pod runs on the target's node with hostPID; returns (namespace, job name).
        DAC_READ_SEARCH reads a non-root target's environ and files; ``writes_files`` adds
        DAC_OVERRIDE and FOWNER to change them."""
        ns = agent_cfg.namespace or pod.namespace
        name = session.name("agent")
        labels = {**{_label(k): _label(v) for k, v in session.labels("agent").items()}, **(agent_cfg.labels or {})}
        caps = (["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"] + (["DAC_OVERRIDE", "FOWNER"] if writes_files else [])
                + {"steal": ["NET_ADMIN"], "mirror": ["NET_RAW"]}.get(incoming, []))
        command = ["python", "-m", "podtwin.agent", "--listen", f"tcp:127.0.0.1:{AGENT_PORT}",
                   "--authorized-key", public_key, "--target-container-id", pod.container_id,
                   "--startup-timeout", str(agent_cfg.startup_timeout),
                   "--communication-timeout", str(agent_cfg.communication_timeout),
                   "--reconnect-grace", str(agent_cfg.reconnect_grace),
                   *(["--incoming", incoming, "--session", session.id] if incoming else [])]
        container = client.V1Container(
            name="agent", image=image, image_pull_policy=agent_cfg.image_pull_policy, command=command,
            security_context=client.V1SecurityContext(
                privileged=agent_cfg.privileged or None, run_as_user=0,
                capabilities=client.V1Capabilities(add=caps, drop=["ALL"])),
            resources=self._resources(agent_cfg))
        containers = [container]
        if incoming == "steal":
            # The rules guard: outlives a SIGKILLed agent process and removes the session's rules.
            containers.append(client.V1Container(
                name="rules-guard", image=image, image_pull_policy=agent_cfg.image_pull_policy,
                command=["python", "-m", "podtwin.agent.incoming.steal.rules_guard", "--session", session.id,
                         "--target-container-id", pod.container_id,
                         "--startup-timeout", str(agent_cfg.startup_timeout)],
                security_context=client.V1SecurityContext(
                    run_as_user=0, capabilities=client.V1Capabilities(
                        add=["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"], drop=["ALL"])),
                resources=client.V1ResourceRequirements(
                    requests={"cpu": "10m", "memory": "32Mi"}, limits={"memory": "64Mi"})))
        return self._create_job(ns, name, labels, containers, agent_cfg, host_pid=True, node_name=pod.node,
                                tolerations=[client.V1Toleration(operator="Exists")])

    def start_targetless_agent(self, session: Session, ns: str, image: str, agent_cfg,
                               public_key: str) -> tuple[str, str]:
        """A Job whose pod is the session's own (targetless): wherever the scheduler puts it, no
        hostPID, no capability, not root (Pod Security ``restricted``); the app's outgoing traffic
        and DNS leave from it. Returns (namespace, job name)."""
        name = session.name("agent")
        labels = {**{_label(k): _label(v) for k, v in session.labels("agent").items()}, **(agent_cfg.labels or {})}
        command = ["python", "-m", "podtwin.agent", "--listen", f"tcp:127.0.0.1:{AGENT_PORT}",
                   "--authorized-key", public_key, "--targetless",
                   "--startup-timeout", str(agent_cfg.startup_timeout),
                   "--communication-timeout", str(agent_cfg.communication_timeout),
                   "--reconnect-grace", str(agent_cfg.reconnect_grace)]
        container = client.V1Container(
            name="agent", image=image, image_pull_policy=agent_cfg.image_pull_policy, command=command,
            security_context=client.V1SecurityContext(
                run_as_user=65534, run_as_group=65534, run_as_non_root=True, allow_privilege_escalation=False,
                capabilities=client.V1Capabilities(drop=["ALL"]),
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            resources=self._resources(agent_cfg))
        return self._create_job(ns, name, labels, [container], agent_cfg)

    @staticmethod
    def _resources(agent_cfg) -> "client.V1ResourceRequirements":
        return client.V1ResourceRequirements(
            requests=(agent_cfg.resources.requests or None) if agent_cfg.resources else None,
            limits=(agent_cfg.resources.limits or None) if agent_cfg.resources else None)

    def _create_job(self, ns: str, name: str, labels: dict, containers: list, agent_cfg,
                    tolerations: list | None = None, **spec) -> tuple[str, str]:
        """The agent's Job: never restarted, removed ``agent.ttl`` after it ends, no token."""
        pod_spec = client.V1PodSpec(
            containers=containers, restart_policy="Never",
            tolerations=(tolerations or []) + [client.V1Toleration(**t) for t in agent_cfg.tolerations or []] or None,
            node_selector=agent_cfg.node_selector or None,
            image_pull_secrets=[client.V1LocalObjectReference(name=s.name)
                                for s in agent_cfg.image_pull_secrets or []] or None,
            automount_service_account_token=False, termination_grace_period_seconds=5, **spec)
        job = client.V1Job(
            metadata=client.V1ObjectMeta(name=name, namespace=ns, labels=labels, annotations=agent_cfg.annotations or None),
            spec=client.V1JobSpec(
                backoff_limit=0, ttl_seconds_after_finished=agent_cfg.ttl,
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels, annotations=agent_cfg.annotations or None),
                    spec=pod_spec)))
        try:
            self.batch.create_namespaced_job(ns, job)
        except ApiException as exc:
            raise self._error(exc, f"create the agent Job in namespace {ns}") from exc
        return ns, name

    def wait_agent(self, ns: str, job: str, timeout: float, progress) -> tuple[str, str]:
        """Wait for the agent's pod to print its READY line: (pod name, the line's JSON)."""
        deadline = time.monotonic() + timeout
        said = set()
        while time.monotonic() < deadline:
            try:
                pods = self.core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items
            except ApiException as exc:
                raise self._error(exc, f"list the agent's pods in {ns}") from exc
            if not pods:
                self._job_failure(ns, job)
                time.sleep(0.2)
                continue
            pod = pods[0]
            phase = pod.status.phase
            for status in pod.status.container_statuses or []:
                _report_waiting(status, pod.spec.node_name, said, progress, "agent pod")
                terminated = status.state.terminated
                if terminated:
                    raise AgentError(f"the agent's {status.name} container exited during start-up: "
                                     f"{self._logs(ns, pod.metadata.name, container=status.name)}")
            if phase == "Failed" and not pod.status.container_statuses:
                # The kubelet refused it before starting anything (OutOfcpu, NodeAffinity, ...).
                raise AgentError(f"node {pod.spec.node_name} refused the agent pod: "
                                 f"{pod.status.reason or 'Failed'}: {(pod.status.message or '').strip()[:300]}",
                                 "lower agent.resources, or check `kubectl describe node` for it")
            if phase == "Pending" and "Pending" not in said:
                said.add("Pending")
                progress("agent pod scheduled; starting")
            if phase == "Pending":
                self._pull_progress(ns, pod.metadata.name, "agent", said, progress)
            if phase == "Running":
                for line in self._logs(ns, pod.metadata.name, tail=None).splitlines():
                    if line.startswith("PODTWIN_AGENT_READY "):
                        return pod.metadata.name, line.split(" ", 1)[1]
            # the agent needs about a second from scheduled to READY: poll finely, for a few seconds
            time.sleep(0.05 if phase == "Running" else 0.1)
        raise AgentError(f"the agent was not ready within {timeout:.0f}s",
                         "raise agent.startup_timeout, or look at `kubectl describe job` for it")

    def _pull_progress(self, ns: str, pod: str, container: str, said: set, progress) -> None:
        """The kubelet's image events for one container (pulling, pulled, already present), each
        said once: on a slow registry this is where the start-up time goes."""
        try:
            events = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={pod}").items
        except ApiException:
            return  # no right to list events (the ephemeral agent needs none): progress is optional
        for event in events:
            path = event.involved_object.field_path or ""
            if event.reason in ("Pulling", "Pulled") and f"{{{container}}}" in path:
                key = f"event:{event.metadata.uid}"
                if key not in said:
                    said.add(key)
                    progress(f"agent image: {(event.message or event.reason).strip()[:200]}")

    def _job_failure(self, ns: str, job: str) -> None:
        """Admission (Pod Security, quotas) refuses the Job's pod: the Job says so in its events."""
        try:
            events = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={job}").items
        except ApiException as exc:
            raise self._error(exc, f"list the agent Job's events in {ns}") from exc
        for event in events:
            if event.reason == "FailedCreate" and "PodSecurity" in (event.message or ""):
                raise pod_security_error(event.message, ephemeral=False, namespace=ns)
            if event.reason == "FailedCreate":
                raise AgentError(f"the agent's pod cannot be created: {event.message[:300]}")

    def _logs(self, ns: str, pod: str, tail: int | None = 5, container: str = "agent") -> str:
        try:
            # The raw bytes, decoded here: some client versions (36) hand back str(bytes) otherwise.
            resp = self.core.read_namespaced_pod_log(pod, ns, container=container, tail_lines=tail,
                                                     _preload_content=False)
            return resp.data.decode(errors="replace")
        except ApiException:
            return ""

    def port_forward(self, ns: str, pod: str, port: int = AGENT_PORT):
        """A port-forward stream to ``port`` on the pod's loopback, through the API server, to open
        and splice on an event loop (``kube_portforward``)."""
        from podtwin.runner.adapters.kube_portforward import PortForwardStream
        return PortForwardStream(self.websocket_settings(), ns, pod, port)

    def websocket_settings(self):
        """What a WebSocket to the API server needs, from the kubeconfig as the client loaded it:
        the server, TLS (CA -- certifi's when the kubeconfig names none, as the client's own
        requests --, client certificate, name check), the proxy unless NO_PROXY covers the server,
        and the Authorization header (a token from an exec plugin or OIDC is refreshed here, as for
        any request of the client's: it may run the plugin, so call this off the event loop)."""
        from podtwin.runner.adapters.kube_portforward import WebSocketSettings
        cfg = self.api.configuration
        bearer = cfg.auth_settings().get("BearerToken") or {}   # refreshes an expiring token first
        headers = {"Authorization": bearer["value"]} if bearer.get("value") else {}
        with self.streams_lock:
            if self._tls is None:
                self._tls = self._tls_context(cfg)
        proxy = cfg.proxy if cfg.proxy and not should_bypass_proxies(cfg.host, no_proxy=cfg.no_proxy or "") else None
        return WebSocketSettings(host=cfg.host.rstrip("/"), ssl=self._tls, headers=headers,
                                 server_hostname=cfg.tls_server_name or None, proxy=proxy,
                                 proxy_headers=(cfg.proxy_headers or None) if proxy else None)

    @staticmethod
    def _tls_context(cfg) -> ssl.SSLContext | bool:
        if not cfg.host.startswith("https"):
            return False
        if cfg.verify_ssl:
            tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert or certifi.where())
            if cfg.assert_hostname is False:
                tls.check_hostname = False
        else:
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        return tls

    # -- the agent as an ephemeral container -------------------------------------------------
    def start_ephemeral_agent(self, session: Session, pod: PodTarget, image: str, agent_cfg, public_key: str,
                              incoming: str | None) -> str:
        """Add the agent to the target pod as an ephemeral container that targets the target
        container (so it sees its processes) and shares the pod's network namespace: no hostPID,
        no setns, and no capability added unless incoming traffic asks for one. It listens on a
        loopback port the kernel chooses (announced in its READY line), so sessions never collide
        with each other or with the app. Returns the container's name."""
        uid = (pod.run_as or {}).get("runAsUser")
        if incoming and uid:
            # As the target's user it may read the target's environ without SYS_PTRACE, but a
            # non-root process gets no effective NET_ADMIN/NET_RAW (no ambient capabilities).
            raise AgentError(f"the target container runs as uid {uid}: an ephemeral agent reads its "
                             f"environment only as that user, and then cannot {incoming} incoming traffic",
                             "set feature.network.incoming: off, or use the Job agent (agent.ephemeral: false)")
        name = session.name("agent")
        # Mirror's capture uses NET_RAW from the runtime's default set (containerd and Docker have
        # it; adding it explicitly would fail Pod Security baseline); steal's rules need NET_ADMIN.
        caps = ["NET_ADMIN"] if incoming == "steal" else []
        command = ["python", "-m", "podtwin.agent", "--listen", "tcp:127.0.0.1:0",
                   "--authorized-key", public_key, "--target-in-pod", pod.container_id,
                   "--startup-timeout", str(agent_cfg.startup_timeout),
                   "--communication-timeout", str(agent_cfg.communication_timeout),
                   "--reconnect-grace", str(agent_cfg.reconnect_grace),
                   *(["--incoming", incoming, "--session", session.id] if incoming else [])]
        # As the target's user (when its spec names one), the agent may read the target's
        # /proc/PID/environ and root with no CAP_SYS_PTRACE; otherwise the image's user (root).
        security: dict = {k: v for k, v in (pod.run_as or {}).items() if v is not None}
        if caps:
            security["capabilities"] = {"add": caps}
        if agent_cfg.privileged:
            security["privileged"] = True
        container = {"name": name, "image": image, "imagePullPolicy": agent_cfg.image_pull_policy,
                     "command": command, "targetContainerName": pod.container, "stdin": False, "tty": False,
                     **({"securityContext": security} if security else {})}
        containers = [container]
        if incoming == "steal":
            # The rules guard, as for the Job agent: it outlives a SIGKILLed agent in the pod's
            # network namespace and removes the session's rules (it needs nothing but NET_ADMIN).
            containers.append({
                "name": session.name("rules-guard"), "image": image,
                "imagePullPolicy": agent_cfg.image_pull_policy, "stdin": False, "tty": False,
                "command": ["python", "-m", "podtwin.agent.incoming.steal.rules_guard", "--session", session.id,
                            "--startup-timeout", str(agent_cfg.startup_timeout)],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}, "runAsUser": 0}})
        try:
            self.core.patch_namespaced_pod_ephemeralcontainers(
                pod.pod, pod.namespace, {"spec": {"ephemeralContainers": containers}},
                _content_type="application/strategic-merge-patch+json")
        except ApiException as exc:
            if exc.status == 404 and "ephemeralcontainers" in (exc.body or ""):
                raise AgentError("this cluster has no ephemeral containers (Kubernetes 1.25+ has them)",
                                 "set agent.ephemeral: false") from exc
            raise self._error(exc, f"add the agent as an ephemeral container to pod {pod.pod} in "
                                   f"{pod.namespace}") from exc
        return name

    def wait_ephemeral_agent(self, ns: str, pod: str, name: str, timeout: float, progress,
                             guard: str | None = None) -> str:
        """Wait for the ephemeral agent to print its READY line; returns the line's JSON. A rules
        guard (``guard``: its container's name) that ends meanwhile fails the start too."""
        deadline = time.monotonic() + timeout
        said = set()
        while time.monotonic() < deadline:
            try:
                obj = self.core.read_namespaced_pod(pod, ns)
            except ApiException as exc:
                raise self._error(exc, f"read pod {pod} in {ns}") from exc
            statuses = {s.name: s for s in obj.status.ephemeral_container_statuses or []}
            for cname in (name, guard):   # the agent, and its rules guard when it has one
                status = statuses.get(cname) if cname else None
                if status is None or status.state is None:
                    continue
                _report_waiting(status, obj.spec.node_name, said, progress, "agent container")
                if status.state.terminated:
                    what = "agent" if cname == name else "agent's rules guard"
                    raise AgentError(f"the {what} exited during start-up: "
                                     + self._logs(ns, pod, container=cname).strip().replace("\n", " | "))
            state = statuses[name].state if name in statuses else None
            if state is None or state.waiting:
                self._pull_progress(ns, pod, name, said, progress)
            if state is not None and state.running:
                for line in self._logs(ns, pod, tail=None, container=name).splitlines():
                    if line.startswith("PODTWIN_AGENT_READY "):
                        return line.split(" ", 1)[1]
            time.sleep(0.2)
        raise AgentError(f"the agent was not ready within {timeout:.0f}s",
                         f"raise agent.startup_timeout, or look at `kubectl -n {ns} describe pod {pod}`")

    def container_ended(self, ns: str, pod: str, container: str) -> bool:
        """Whether a pod's (or ephemeral) container is known to have ended: the pod is gone or
        the container terminated. False when it runs, or when the API server cannot say."""
        try:
            obj = self.core.read_namespaced_pod(pod, ns, _request_timeout=5)
        except ApiException as exc:
            return exc.status == 404
        except Exception:  # noqa: BLE001 - the API server is down or restarting: cannot tell
            return False
        statuses = [*(obj.status.container_statuses or []), *(obj.status.ephemeral_container_statuses or [])]
        status = next((s for s in statuses if s.name == container), None)
        return obj.metadata.deletion_timestamp is not None or (
            status is not None and status.state is not None and status.state.terminated is not None)

    # -- the exec transport ------------------------------------------------------------------
    def exec_stdio(self, ns: str, pod: str, container: str, address: str):
        """A connected socket to the agent at ``address`` (``127.0.0.1:PORT`` or ``unix:/PATH``
        as seen in ``container``): the stdin/stdout of ``python -m podtwin.agent.link.stdio_relay``
        exec'd there (no TTY)."""
        command = ["python", "-m", "podtwin.agent.link.stdio_relay", address]
        try:
            with self.streams_lock:
                ws = stream(self.streams.connect_get_namespaced_pod_exec, pod, ns, container=container,
                            command=command, stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False, binary=True)
        except ApiException as exc:
            raise self._error(exc, f"exec in pod {pod}") from exc
        relay = ExecStream(ws)
        return relay, relay.socket

    def delete_job(self, ns: str, job: str) -> None:
        try:
            self.batch.delete_namespaced_job(job, ns, propagation_policy="Background", grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise self._error(exc, f"delete the agent Job {job}") from exc
        try:  # the pod too, now, rather than when the garbage collector gets to it
            for pod in self.core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items:
                self.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
        except ApiException:
            pass

    def session_jobs(self, session_id: str | None = None) -> list[tuple[str, str, dict]]:
        selector = LABEL_SESSION if session_id is None else f"{LABEL_SESSION}={session_id}"
        try:
            jobs = self.batch.list_job_for_all_namespaces(label_selector=selector).items
        except ApiException as exc:
            if exc.status != 403:
                return []
            try:  # not allowed cluster-wide: the namespaces we may list, i.e. our own
                jobs = self.batch.list_namespaced_job(self.default_namespace, label_selector=selector).items
            except ApiException:
                return []
        return [(j.metadata.namespace, j.metadata.name, dict(j.metadata.labels or {})) for j in jobs]


def pod_security_error(message: str, ephemeral: bool, namespace: str = "") -> AgentError:
    """One line for a Pod Security refusal: the level, what it refuses, and what to do instead."""
    m = re.search(r'violates PodSecurity "([a-z]+):([^"]+)": (.*)', message)
    level, why = (m.group(1), m.group(3).strip()) if m else ("?", message)
    where = f" of namespace {namespace}" if namespace else ""
    if ephemeral:
        return AgentError(f"Pod Security level {level!r}{where} refuses the agent's ephemeral container: {why[:300]}",
                          "incoming steal needs NET_ADMIN, which level baseline does not allow: set "
                          "feature.network.incoming.mode to mirror or off, or use a namespace at level privileged")
    return AgentError(f"Pod Security level {level!r}{where} refuses the agent Job's pod: {why[:300]}",
                      "set agent.ephemeral: true (an ephemeral container in the target pod: no added "
                      "privileges for env and outgoing traffic, passes baseline), or agent.namespace to a "
                      "namespace at level privileged")


def _handshake_message(reason: str) -> str:
    """websocket-client's "Handshake status 403 Forbidden -+-+- {headers} -+-+- b'{json}'" -> the
    API server's message."""
    body = reason.rsplit(" -+-+- ", 1)[-1]
    try:
        status = json.loads(ast.literal_eval(body)) if body.startswith(("b'", 'b"')) else json.loads(body)
        return str(status.get("message") or "forbidden")
    except (ValueError, SyntaxError, AttributeError):
        return "forbidden"


class ExecStream:
    """An exec'd process's stdin and stdout as one end of a socket pair.

    One thread moves the bytes, select()ing on the WebSocket and on its end of the pair (as the
    kubernetes client's port-forward does: no concurrent reads and writes on one TLS socket).
    Channel 0 is the process's stdin, 1 its stdout, 2 its stderr (kept for errors), 3 the exit
    status. With the v5 protocol (Kubernetes 1.30+), the end of our data closes its stdin.
    """

    LIMIT = 4 * 1024 * 1024  # buffered bytes per direction before we stop reading that side

    def __init__(self, ws) -> None:
        self.ws = ws
        self.socket, self._ours = socket.socketpair()
        self.stderr = b""
        self.status = ""
        self._thread = threading.Thread(target=self._run, name="podtwin-exec", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        web = self.ws.sock            # websocket.WebSocket
        local = self._ours
        v5 = self.ws.subprotocol == "v5.channel.k8s.io"
        to_ws, to_local = b"", b""
        local_eof = ws_closed = False
        try:
            while True:
                if ws_closed and not to_local:
                    break
                rlist, wlist = [], []
                if not ws_closed:
                    if len(to_local) < self.LIMIT:
                        rlist.append(web.sock)
                    if to_ws:
                        wlist.append(web.sock)
                    if not local_eof and len(to_ws) < self.LIMIT:
                        rlist.append(local)
                if to_local:
                    wlist.append(local)
                if local_eof and not to_ws and not v5:
                    break  # v4 cannot half-close stdin: closing the stream ends the relay
                ready_r, ready_w, _ = select.select(rlist, wlist, [])
                if web.sock in ready_r:
                    while True:
                        opcode, frame = web.recv_data_frame(True)
                        if opcode == ABNF.OPCODE_CLOSE:
                            ws_closed = True
                            break
                        if opcode in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) and frame.data:
                            channel, data = frame.data[0], frame.data[1:]
                            if channel == 1:
                                to_local += data
                            elif channel == 2:
                                self.stderr = (self.stderr + data)[-4096:]
                            elif channel == 3:
                                self.status += data.decode(errors="replace")
                        if not (isinstance(web.sock, ssl.SSLSocket) and web.sock.pending()):
                            break
                if local in ready_r:
                    data = local.recv(256 * 1024)
                    if data:
                        to_ws += ABNF.create_frame(b"\x00" + data, ABNF.OPCODE_BINARY).format()
                    else:
                        local_eof = True
                        if v5:  # close the process's stdin: the relay half-closes to the agent
                            to_ws += ABNF.create_frame(bytes([255, 0]), ABNF.OPCODE_BINARY).format()
                if web.sock in ready_w and to_ws:
                    to_ws = to_ws[web.sock.send(to_ws):]
                if local in ready_w and to_local:
                    to_local = to_local[local.send(to_local):]
        except (OSError, WebSocketException, ValueError) as exc:
            log.debug("exec stream ended: %s", exc)
        finally:
            for sock in (local,):
                try:
                    sock.close()
                except OSError:
                    pass
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def failure(self) -> str | None:
        """Why the exec'd relay ended, if it failed: its exit status and last stderr line."""
        if self._thread.is_alive():
            return None
        status = self.status.strip()
        failed = status and '"Success"' not in status
        last = (self.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
        if not failed and not last:
            return None
        return last or f"the relay exited: {status[:200]}"

    def close(self) -> None:
        try:
            self._ours.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.socket.close()
        except OSError:
            pass


# What a session does, as (verb, group, resource, subresource); docs/kubernetes.md has the Role.
# Every session needs the common ones; each kind of agent and transport adds its own.
COMMON_PERMISSIONS = [
    ("get", "apps", "deployments", ""), ("list", "", "pods", ""), ("get", "", "services", ""),
    ("get", "", "pods", "log"),
]
JOB_PERMISSIONS = [
    ("create", "batch", "jobs", ""), ("delete", "batch", "jobs", ""), ("delete", "", "pods", ""),
    ("list", "", "events", ""),
]
EPHEMERAL_PERMISSIONS = [("get", "", "pods", ""), ("patch", "", "pods", "ephemeralcontainers")]
# get: the WebSocket upgrade; create: SPDY, and WebSockets too from Kubernetes 1.35
# (AuthorizePodWebsocketUpgradeCreatePermission).
PORT_FORWARD_PERMISSIONS = [("get", "", "pods", "portforward"), ("create", "", "pods", "portforward")]
EXEC_PERMISSIONS = [("get", "", "pods", "exec"), ("create", "", "pods", "exec")]

def can_i(engine: "KubeEngine", verb: str, group: str, resource: str, subresource: str, ns: str) -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=subresource or None, namespace=ns)))
    try:
        result = client.AuthorizationV1Api(engine.api).create_self_subject_access_review(review)
    except ApiException as exc:
        raise engine._error(exc, "ask the cluster what we may do") from exc
    return bool(result.status.allowed)


def _report_waiting(status, node: str, said: set, progress, what: str) -> None:
    """A container's waiting reason: an image that cannot be pulled fails at once; any other
    reason is said once, as progress."""
    waiting = status.state.waiting if status.state is not None else None
    if not waiting or not waiting.reason:
        return
    if waiting.reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"):
        raise ImageMissing(f"the agent image {status.image} cannot be pulled on node {node} ({waiting.reason})",
                           "put it where the cluster can pull it: `podtwin images load kind|minikube|k3d` for a "
                           "local cluster, or `podtwin images push REGISTRY/REPO` and set agent.image to "
                           "what it prints (docs/kubernetes.md)")
    if waiting.reason in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
        raise AgentError(f"the {status.name} container cannot start on node {node}: {waiting.reason}: "
                         f"{(waiting.message or '').strip()[:300]}",
                         "the pod's securityContext (runAsNonRoot?) or agent.* settings may forbid it")
    if waiting.reason not in said:
        said.add(waiting.reason)
        progress(f"{what}: {waiting.reason}")


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

