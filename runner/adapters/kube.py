"""Everything podtwin asks of a Kubernetes cluster. The only module that imports ``kubernetes``.

Resolves a target to one running, ready pod and container; runs the agent as a Job pinned to that
pod's node (hostPID, named capabilities only); reports scheduling and image problems as they
happen; opens port-forward streams to the agent. API errors become PodtwinErrors with a hint.
"""
from __future__ import annotations

import difflib
import json
import logging
import time
from dataclasses import dataclass

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward

from ..errors import AgentError, ImageMissing, PodtwinError, SessionError, TargetError
from ..session import LABEL_SESSION, Session
from ..targets import KubeTarget

log = logging.getLogger("podtwin.kube")
AGENT_PORT = 44128
MESH_SIDECARS = {"istio-proxy", "linkerd-proxy", "istio-init", "linkerd-init", "envoy", "vault-agent"}


class ClusterUnavailable(PodtwinError):
    default_hint = "check the cluster with `kubectl get nodes`, or pass --context/--kubeconfig"


class Forbidden(PodtwinError):
    default_hint = "ask for the Role in docs/kubernetes.md, or run `podtwin doctor`"


@dataclass(frozen=True)
class PodTarget:
    namespace: str
    pod: str
    container: str
    container_id: str
    node: str
    pod_ip: str


def _label(value: str) -> str:
    return value.replace("/", "_")[:63]


class KubeEngine:
    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
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
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        self.default_namespace = (active.get("context") or {}).get("namespace") or "default"
        try:
            client.VersionApi(self.api).get_code(_request_timeout=10)
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
        if exc.status == 401:
            return ClusterUnavailable(f"the cluster refused our credentials while trying to {doing}",
                                      "log in again (your token or certificate may have expired)")
        if exc.status == 403:
            if "PodSecurity" in message or "violates PodSecurity" in message:
                return AgentError(f"Pod Security refuses the agent: {message[:300]}",
                                  "set agent.ephemeral: true, or agent.namespace to a namespace that "
                                  "allows privileged-level pods")
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
        return PodTarget(pod.metadata.namespace, pod.metadata.name, container, status.container_id,
                         pod.spec.node_name, pod.status.pod_ip or "")

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
                    incoming: str | None) -> tuple[str, str]:
        """A Job whose pod runs on the target's node with hostPID; returns (namespace, job name)."""
        ns = agent_cfg.namespace or pod.namespace
        name = session.name("agent")
        labels = {**{_label(k): _label(v) for k, v in session.labels("agent").items()}, **(agent_cfg.labels or {})}
        caps = ["SYS_ADMIN", "SYS_PTRACE"] + {"steal": ["NET_ADMIN"], "mirror": ["NET_RAW"]}.get(incoming, [])
        command = ["python", "-m", "podtwin.agent", "--listen", f"tcp:127.0.0.1:{AGENT_PORT}",
                   "--authorized-key", public_key, "--target-container-id", pod.container_id,
                   "--startup-timeout", str(agent_cfg.startup_timeout),
                   "--communication-timeout", str(agent_cfg.communication_timeout),
                   *(["--incoming", incoming, "--session", session.id] if incoming else [])]
        container = client.V1Container(
            name="agent", image=image, image_pull_policy=agent_cfg.image_pull_policy, command=command,
            security_context=client.V1SecurityContext(
                privileged=agent_cfg.privileged or None, run_as_user=0,
                capabilities=client.V1Capabilities(add=caps, drop=["ALL"])),
            resources=client.V1ResourceRequirements(
                requests=(agent_cfg.resources.requests or None) if agent_cfg.resources else None,
                limits=(agent_cfg.resources.limits or None) if agent_cfg.resources else None))
        containers = [container]
        if incoming == "steal":
            # The rules guard: outlives a SIGKILLed agent process and removes the session's rules.
            containers.append(client.V1Container(
                name="rules-guard", image=image, image_pull_policy=agent_cfg.image_pull_policy,
                command=["python", "-m", "podtwin.agent.guard", "--session", session.id,
                         "--target-container-id", pod.container_id,
                         "--startup-timeout", str(agent_cfg.startup_timeout)],
                security_context=client.V1SecurityContext(
                    run_as_user=0, capabilities=client.V1Capabilities(
                        add=["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"], drop=["ALL"])),
                resources=client.V1ResourceRequirements(
                    requests={"cpu": "10m", "memory": "32Mi"}, limits={"memory": "64Mi"})))
        spec = client.V1PodSpec(
            containers=containers, restart_policy="Never", host_pid=True, node_name=pod.node,
            tolerations=[client.V1Toleration(operator="Exists")]
            + [client.V1Toleration(**t) for t in agent_cfg.tolerations or []],
            node_selector=agent_cfg.node_selector or None,
            image_pull_secrets=[client.V1LocalObjectReference(name=s.name)
                                for s in agent_cfg.image_pull_secrets or []] or None,
            automount_service_account_token=False, termination_grace_period_seconds=5)
        job = client.V1Job(
            metadata=client.V1ObjectMeta(name=name, namespace=ns, labels=labels, annotations=agent_cfg.annotations or None),
            spec=client.V1JobSpec(
                backoff_limit=0, ttl_seconds_after_finished=agent_cfg.ttl,
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels, annotations=agent_cfg.annotations or None),
                    spec=spec)))
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
                waiting = status.state.waiting
                if waiting and waiting.reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
                    raise ImageMissing(f"the agent image {status.image} cannot be pulled on node "
                                       f"{pod.spec.node_name} ({waiting.reason})",
                                       "load it into the node (`make cluster-load IMAGE=...`) or set agent.image")
                if waiting and waiting.reason and waiting.reason not in said:
                    said.add(waiting.reason)
                    progress(f"agent pod: {waiting.reason}")
                terminated = status.state.terminated
                if terminated:
                    raise AgentError(f"the agent's {status.name} container exited during start-up: "
                                     f"{self._logs(ns, pod.metadata.name, container=status.name)}")
            if phase == "Pending" and "Pending" not in said:
                said.add("Pending")
                progress("agent pod scheduled; starting")
            if phase == "Running":
                for line in self._logs(ns, pod.metadata.name, tail=None).splitlines():
                    if line.startswith("PODTWIN_AGENT_READY "):
                        return pod.metadata.name, line.split(" ", 1)[1]
            time.sleep(0.2)
        raise AgentError(f"the agent was not ready within {timeout:.0f}s",
                         "raise agent.startup_timeout, or look at `kubectl describe job` for it")

    def _job_failure(self, ns: str, job: str) -> None:
        """Admission (Pod Security, quotas) refuses the Job's pod: the Job says so in its events."""
        events = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={job}").items
        for event in events:
            if event.reason == "FailedCreate" and "PodSecurity" in (event.message or ""):
                raise AgentError(f"Pod Security refuses the agent: {event.message[:300]}",
                                 "set agent.ephemeral: true, or agent.namespace to a namespace that allows "
                                 "privileged-level pods")
            if event.reason == "FailedCreate":
                raise AgentError(f"the agent's pod cannot be created: {event.message[:300]}")

    def _logs(self, ns: str, pod: str, tail: int | None = 5, container: str = "agent") -> str:
        try:
            return self.core.read_namespaced_pod_log(pod, ns, container=container, tail_lines=tail) or ""
        except ApiException:
            return ""

    def port_forward(self, ns: str, pod: str, port: int = AGENT_PORT):
        """A connected socket to ``port`` on the pod's loopback, through the API server."""
        try:
            pf = portforward(self.core.connect_get_namespaced_pod_portforward, pod, ns, ports=str(port))
        except ApiException as exc:
            raise self._error(exc, f"port-forward to pod {pod}") from exc
        sock = pf.socket(port)
        sock.setblocking(True)
        return pf, sock

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
        except ApiException:
            return []
        return [(j.metadata.namespace, j.metadata.name, dict(j.metadata.labels or {})) for j in jobs]


# What a session does, as (verb, group, resource, subresource); docs/kubernetes.md has the Role.
SESSION_PERMISSIONS = [
    ("get", "apps", "deployments", ""), ("list", "", "pods", ""), ("get", "", "services", ""),
    ("create", "batch", "jobs", ""), ("delete", "batch", "jobs", ""), ("delete", "", "pods", ""),
    ("get", "", "pods", "log"), ("get", "", "pods", "portforward"), ("list", "", "events", ""),
]


def can_i(engine: "KubeEngine", verb: str, group: str, resource: str, subresource: str, ns: str) -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=subresource or None, namespace=ns)))
    try:
        result = client.AuthorizationV1Api(engine.api).create_self_subject_access_review(review)
    except ApiException as exc:
        raise engine._error(exc, "ask the cluster what we may do") from exc
    return bool(result.status.allowed)


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

