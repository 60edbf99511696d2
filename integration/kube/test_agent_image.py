"""The agent's image on a cluster that pulls it (issue #13): `podtwin images push` to a registry
(Debian's docker-registry, on loopback, started here), and a session whose agent the test
cluster's kubelet pulls from it; `podtwin images load` and the release name sessions use by
default."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from kubernetes import client, utils

from kubeutil import wait_until
from test_podtwin_kube import APP, PODTWIN_IMAGE, manifests, podtwin

REGISTRY = "/usr/bin/docker-registry"


@pytest.fixture(scope="module")
def staging(cluster, namespace):
    """The api Deployment (env from a ConfigMap and a Secret) to run sessions against."""
    cluster.load_image(PODTWIN_IMAGE)
    for manifest in manifests(namespace):
        if manifest["metadata"]["name"] in ("app-config", "app-secret", "api"):
            utils.create_from_dict(cluster.api, manifest, namespace=namespace)
    core = client.CoreV1Api(cluster.api)
    wait_until(lambda: any(p.status.phase == "Running" and all(c.ready for c in p.status.container_statuses or [])
                           for p in core.list_namespaced_pod(namespace, label_selector="app=api").items),
               180, "the api pod to run")
    return namespace


@pytest.fixture
def registry(tmp_path):
    if not os.path.exists(REGISTRY):
        pytest.fail("docker-registry is not installed (scripts/setup.sh installs it)", pytrace=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "registry.yml").write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n")
    with open(tmp_path / "registry.log", "w") as log:   # the child keeps its own descriptor
        proc = subprocess.Popen([REGISTRY, "serve", str(tmp_path / "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=log)

    def answers():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200
        except OSError:
            return proc.poll() is not None and pytest.fail((tmp_path / "registry.log").read_text())
    try:
        wait_until(answers, 30, "the registry to answer")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        tags = subprocess.run(["docker", "images", "-q", "--format", "{{.Repository}}:{{.Tag}}",
                               f"127.0.0.1:{port}/*/*"], capture_output=True, text=True).stdout.split()
        if tags:   # what `images push` tagged locally for this registry, gone with it
            subprocess.run(["docker", "rmi", *tags], capture_output=True)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "podtwin.runner", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_push_to_a_registry_and_the_kubelet_pulls_the_agent_from_it(cluster, staging, registry, tmp_path):
    if not cluster.managed:
        pytest.skip("the registry is on this machine's loopback: only the project's own cluster reaches it")
    pushed = cli("images", "push", f"{registry}/podtwin/agent")
    assert pushed.returncode == 0, pushed.stderr
    image = pushed.stdout.split()[1].rstrip(";")
    assert image.startswith(f"{registry}/podtwin/agent:") and f"agent.image: {image}" in pushed.stdout
    tags = json.load(urllib.request.urlopen(f"http://{registry}/v2/podtwin/agent/tags/list", timeout=5))
    assert image.rsplit(":", 1)[1] in tags["tags"]

    cfg = tmp_path / "agent.json"
    cfg.write_text(json.dumps({"agent": {"image": image, "image_pull_policy": "Always"}}))
    started = time.time()
    result = podtwin(cluster, "container", "run", "-q", "-f", str(cfg), "-n", staging, "--target", "deploy/api",
                     APP, "sh", "-c", "echo APP_MODE=$APP_MODE")
    assert result.returncode == 0, result.stderr
    assert "APP_MODE=staging" in result.stdout

    def pulled():
        events = client.CoreV1Api(cluster.api).list_namespaced_event(staging).items
        return [e for e in events if e.reason == "Pulled" and image in (e.message or "")
                and e.last_timestamp and e.last_timestamp.timestamp() >= started - 5]
    assert wait_until(pulled, 30, "the kubelet's Pulled event for the agent image")


def test_load_into_the_test_cluster_and_the_default_name(cluster, staging):
    """Without agent.image or PODTWIN_AGENT_IMAGE, the agent is the release's name, which
    `podtwin images build` tags and `podtwin images load` puts on the nodes."""
    if not cluster.managed:
        pytest.skip("loads into the project's own cluster only")
    loaded = cli("images", "load", "podtwin-test")
    assert loaded.returncode == 0, loaded.stderr
    release = loaded.stdout.split()[1]
    assert release.startswith("ghcr.io/podtwin/podtwin-agent:")
    env = {k: v for k, v in os.environ.items() if k != "PODTWIN_AGENT_IMAGE"}
    result = subprocess.run([sys.executable, "-m", "podtwin.runner", "container", "run", "-n", staging,
                             "--target", "deploy/api", APP, "sh", "-c", "echo APP_MODE=$APP_MODE"],
                            capture_output=True, text=True, timeout=300,
                            env={**env, "KUBECONFIG": str(cluster.kubeconfig)})
    assert result.returncode == 0 and "APP_MODE=staging" in result.stdout, result.stderr


def test_a_missing_agent_image_names_the_ways_to_get_it_there(cluster, staging, tmp_path):
    cfg = tmp_path / "missing.json"
    cfg.write_text(json.dumps({"agent": {"image": "podtwin-test/no-such-agent:1", "startup_timeout": 60}}))
    result = podtwin(cluster, "container", "run", "-f", str(cfg), "-n", staging, "--target", "deploy/api", APP, "true")
    assert result.returncode == 125
    line = result.stderr.strip().splitlines()[-1]
    assert "podtwin-test/no-such-agent:1 cannot be pulled" in line
    assert "podtwin images load" in line and "podtwin images push" in line
