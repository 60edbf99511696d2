"""The agent's other shapes on the real cluster: an ephemeral container in the target pod (in a
namespace whose Pod Security level is baseline, where the default Job agent is refused), and the
exec stdio transport.

Same app and assertions as test_podtwin_kube: env (literal, ConfigMap, Secret), DNS, TCP to a
backend Service and pod IP, UDP.
"""
from __future__ import annotations

import json
import time

import pytest
from kubernetes import client, utils

from kubeutil import wait_until
from test_podtwin_kube import APP, PODTWIN_IMAGE, manifests, podtwin

BASELINE = {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "latest"}
WANTED = {"app-config", "app-secret", "backend-code", "api", "backend"}


@pytest.fixture(scope="module")
def baseline_ns(cluster, namespace):
    """The target namespace at Pod Security level baseline, with the api and backend workloads."""
    cluster.load_image(PODTWIN_IMAGE)
    core = client.CoreV1Api(cluster.api)
    core.patch_namespace(namespace, {"metadata": {"labels": BASELINE}})
    for manifest in manifests(namespace):
        if manifest["metadata"]["name"] in WANTED:
            utils.create_from_dict(cluster.api, manifest, namespace=namespace)

    def all_ready():
        pods = core.list_namespaced_pod(namespace).items
        return {"api", "backend"} <= {p.metadata.labels.get("app") for p in pods} and all(
            p.status.phase == "Running" and all(c.ready for c in p.status.container_statuses or []) for p in pods)
    wait_until(all_ready, 180, "the api and backend pods to run")
    return namespace


def config(tmp_path, **agent) -> str:
    path = tmp_path / "podtwin.json"
    path.write_text(json.dumps({"agent": agent}))
    return str(path)


def api_pod(cluster, ns):
    return client.CoreV1Api(cluster.api).list_namespaced_pod(ns, label_selector="app=api").items[0]


def session_objects(cluster, ns) -> list[str]:
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    return ([f"job/{j.metadata.name}" for j in batch.list_namespaced_job(ns, label_selector="podtwin.session").items]
            + [f"pod/{p.metadata.name}" for p in core.list_namespaced_pod(ns, label_selector="podtwin.session").items])


def check_session(cluster, ns, cfg: str) -> None:
    backend_ip = client.CoreV1Api(cluster.api).list_namespaced_pod(
        ns, label_selector="app=backend").items[0].status.pod_ip
    script = ("echo APP_MODE=$APP_MODE; echo LOG_LEVEL=$LOG_LEVEL; echo API_TOKEN=$API_TOKEN; "
              f"wget -qO- http://backend/short; wget -qO- http://backend.{ns}.svc.cluster.local/full; "
              f"wget -qO- http://{backend_ip}/pod-ip; udpsend backend:9000 over-udp; exit 7")
    result = podtwin(cluster, "container", "run", "-f", cfg, "-n", ns, "--target", "deploy/api", APP,
                     "sh", "-c", script)
    assert result.returncode == 7, result.stdout + result.stderr
    for expected in ("APP_MODE=staging", "LOG_LEVEL=debug", "API_TOKEN=s3cr3t-token", "k8s backend /short",
                     "k8s backend /full", "k8s backend /pod-ip", "echo:over-udp"):
        assert expected in result.stdout, (expected, result.stdout, result.stderr)


def ephemeral_agents(cluster, ns) -> dict[str, str]:
    """The podtwin ephemeral containers of the api pod: name -> running/terminated/waiting."""
    pod = api_pod(cluster, ns)
    return {s.name: ("terminated" if s.state.terminated else "running" if s.state.running else "waiting")
            for s in pod.status.ephemeral_container_statuses or [] if s.name.startswith("podtwin-")}


def test_pod_security_baseline_refuses_the_job_agent_in_one_line(cluster, baseline_ns, tmp_path):
    start = time.monotonic()
    result = podtwin(cluster, "container", "run", "-n", baseline_ns, "--target", "deploy/api", APP, "true")
    took = time.monotonic() - start
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("podtwin: Pod Security level 'baseline'"), line
    assert "hostPID" in line and "agent.ephemeral: true" in line and "agent.namespace" in line, line
    assert took < 15, f"took {took:.1f}s"
    assert not session_objects(cluster, baseline_ns)   # the Job went with the session


def test_ephemeral_agent_passes_baseline(cluster, baseline_ns, tmp_path):
    before = api_pod(cluster, baseline_ns)
    restarts = before.status.container_statuses[0].restart_count
    check_session(cluster, baseline_ns, config(tmp_path, ephemeral=True))
    agents = ephemeral_agents(cluster, baseline_ns)
    assert agents, "no ephemeral agent in the target pod"
    # Kubernetes keeps ephemeral containers in the pod's spec; ours must have exited.
    wait_until(lambda: set(ephemeral_agents(cluster, baseline_ns).values()) == {"terminated"}, 20,
               "the ephemeral agents to exit")
    after = api_pod(cluster, baseline_ns)
    assert after.metadata.uid == before.metadata.uid
    assert after.status.container_statuses[0].restart_count == restarts
    # nothing added but the ephemeral container itself
    spec = next(c for c in after.spec.ephemeral_containers if c.name in agents)
    assert spec.security_context is None or not (spec.security_context.capabilities
                                                 or spec.security_context.privileged)
    assert not session_objects(cluster, baseline_ns)


def test_ephemeral_agent_over_the_exec_transport(cluster, baseline_ns, tmp_path):
    check_session(cluster, baseline_ns, config(tmp_path, ephemeral=True, transport="exec"))


def test_ephemeral_steal_is_refused_by_baseline_in_one_line(cluster, baseline_ns, tmp_path):
    path = tmp_path / "steal.json"
    path.write_text(json.dumps({"agent": {"ephemeral": True},
                                "feature": {"network": {"incoming": {"mode": "steal", "ports": [8080]}}}}))
    result = podtwin(cluster, "container", "run", "-f", str(path), "-n", baseline_ns, "--target", "deploy/api",
                     APP, "true")
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "Pod Security level 'baseline'" in line and "NET_ADMIN" in line and "incoming.mode" in line, line
    assert "Traceback" not in result.stderr
