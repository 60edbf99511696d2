"""The errors of a Kubernetes session that does not start: each is one line naming the problem
and the fix, comes within seconds (not after a timeout), exits non-zero and leaves nothing in
the cluster. Real cluster, real kubelet; the unpullable image points at a closed port on
loopback, so the pull fails here without any traffic leaving the machine."""
from __future__ import annotations

import json
import time

import pytest
from kubernetes import client, utils

from kubeutil import wait_until
from test_podtwin_kube import APP, PODTWIN_IMAGE, podtwin


@pytest.fixture(scope="module")
def target_ns(cluster, namespace):
    cluster.load_image(PODTWIN_IMAGE)
    sleeper = {"name": "api", "image": PODTWIN_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sleep", "infinity"]}
    for name, replicas in (("api", 1), ("idle", 0)):
        utils.create_from_dict(cluster.api, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"terminationGracePeriodSeconds": 1, "containers": [sleeper]}}}},
            namespace=namespace)
    wait_until(lambda: any(p.status.phase == "Running" for p in client.CoreV1Api(cluster.api).list_namespaced_pod(
        namespace, label_selector="app=api").items), 120, "the api pod to run")
    return namespace


def nothing_left(cluster, ns: str) -> None:
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    wait_until(lambda: not batch.list_namespaced_job(ns, label_selector="podtwin.session").items
               and not core.list_namespaced_pod(ns, label_selector="podtwin.session").items,
               30, "the agent Job and pod to go")


TARGET = INFRA = 125   # docker run's code for its own failures, whatever the kind (README "Exit codes")


def one_line_failure(result, code: int, *expected: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("podtwin: "), result.stderr
    for text in expected:
        assert text in line, (text, line)
    return line


def run_with(cluster, ns, tmp_path, agent: dict, target: str = "deploy/api"):
    cfg = tmp_path / "podtwin.json"
    cfg.write_text(json.dumps({"agent": agent}))
    start = time.monotonic()
    result = podtwin(cluster, "container", "run", "-n", ns, "-f", str(cfg), "--target", target, APP, "true")
    return result, time.monotonic() - start


@pytest.mark.parametrize("image,policy", [("127.0.0.1:1/podtwin/missing:v1", "IfNotPresent"),
                                          ("podtwin/not-on-the-node:v1", "Never")])
def test_unpullable_agent_image_is_said_at_once(cluster, target_ns, tmp_path, image, policy):
    result, took = run_with(cluster, target_ns, tmp_path,
                            {"image": image, "image_pull_policy": policy, "startup_timeout": 120})
    one_line_failure(result, INFRA, f"agent image {image} cannot be pulled", "agent.image")
    assert took < 60          # at the first ErrImagePull, far before the 120 s start-up timeout
    nothing_left(cluster, target_ns)


def test_agent_pod_refused_by_the_kubelet_is_said_at_once(cluster, target_ns, tmp_path):
    result, took = run_with(cluster, target_ns, tmp_path,
                            {"resources": {"requests": {"cpu": "500"}}, "startup_timeout": 120})
    one_line_failure(result, INFRA, "refused the agent pod", "agent.resources")
    assert took < 60
    nothing_left(cluster, target_ns)


def test_workload_without_a_ready_pod(cluster, target_ns, tmp_path):
    result, _ = run_with(cluster, target_ns, tmp_path, {}, target="deploy/idle")
    one_line_failure(result, TARGET, "deployment/idle", "has no running, ready pod")
    nothing_left(cluster, target_ns)


def test_cluster_that_does_not_answer(cluster, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "closed",
        "clusters": [{"name": "closed", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "closed", "context": {"cluster": "closed", "user": "u"}}]}))
    start = time.monotonic()
    result = podtwin(cluster, "container", "run", "--target", "deploy/api", APP, "true", kubeconfig=kubeconfig)
    one_line_failure(result, INFRA, "the cluster does not answer", "--context/--kubeconfig")
    assert time.monotonic() - start < 30
