"""Fixtures for tests against a real Kubernetes cluster (see docs/cluster.md).

- ``cluster`` (session): a running cluster -- the one named by PODTWIN_TEST_KUBECONFIG if set
  (used as is, never torn down), else the offline cluster of integration/cluster, brought up by
  ``up.sh`` if it is not up already (cluster-up is idempotent and quick once built).
- ``namespace`` (module): a fresh namespace per test module, deleted afterwards.
- ``cluster.load_image(name)``: copy an image from the local Docker engine (e.g. one built from
  images/) into the cluster's containerd, so pods run it without any registry.
- ``limited_kubeconfig`` (module): a kubeconfig for a second user, a ServiceAccount with a
  namespace-scoped Role only, so tests can provoke permission errors.

These tests only run when asked for (``make kube-test`` sets PODTWIN_KUBE_TESTS=1, or
PODTWIN_TEST_KUBECONFIG names a cluster): a fresh machine has to build the cluster first.
"""
from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubeutil import wait_until
from podtwin.runner.config.image import agent_image_name

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
APP_IMAGE = "podtwin-test/busybox:latest"   # built from images/busybox by `make images`
TEST_LABEL = "podtwin-test"
# The tests load the locally built agent image (beside PODTWIN_IMAGE) into the cluster and have
# the agent use it; the release's name, the default, is tried by test_agent_image.py.
AGENT_IMAGE = agent_image_name()
os.environ.setdefault("PODTWIN_AGENT_IMAGE", AGENT_IMAGE)


def _enabled() -> bool:
    return os.environ.get("PODTWIN_KUBE_TESTS") == "1" or bool(os.environ.get("PODTWIN_TEST_KUBECONFIG"))


def pytest_collection_modifyitems(config, items):
    if _enabled():
        return
    skip = pytest.mark.skip(reason="Kubernetes tests run with `make kube-test` (or PODTWIN_KUBE_TESTS=1)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@dataclass
class Cluster:
    kubeconfig: Path
    api: "kubernetes.client.ApiClient"  # noqa: F821
    managed: bool   # True: the offline cluster of integration/cluster (images can be loaded)

    @property
    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api)

    @property
    def apps(self):
        from kubernetes import client
        return client.AppsV1Api(self.api)

    def load_image(self, image: str) -> str:
        """Copy `image` from the local Docker engine into the cluster; returns its name."""
        subprocess.run([str(CLUSTER_DIR / "load.sh"), image], check=True, capture_output=True, text=True,
                       timeout=300)
        return image

    def wait_pod_running(self, namespace: str, name: str, timeout: float = 120):
        def running():
            pod = self.core.read_namespaced_pod(name, namespace)
            statuses = pod.status.container_statuses or []
            if pod.status.phase == "Running" and statuses and all(s.ready for s in statuses):
                return pod
            return None
        return wait_until(running, timeout, f"pod {namespace}/{name} running")


def _bring_up() -> Path:
    """Run cluster-up and return the kubeconfig path from its last line."""
    proc = subprocess.run([str(CLUSTER_DIR / "up.sh")], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"cluster-up failed:\n{proc.stderr[-4000:]}", pytrace=False)
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"export KUBECONFIG=(\S+)", last)
    if not m:
        pytest.fail(f"cluster-up printed no kubeconfig: {last!r}", pytrace=False)
    return Path(m.group(1))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    from kubernetes import config

    external = os.environ.get("PODTWIN_TEST_KUBECONFIG")
    kubeconfig = Path(external) if external else _bring_up()
    api = config.new_client_from_config(config_file=str(kubeconfig))
    c = Cluster(kubeconfig=kubeconfig, api=api, managed=not external)
    wait_until(lambda: _node_ready(c), 120, "a Ready node")
    if c.managed and os.environ["PODTWIN_AGENT_IMAGE"] == AGENT_IMAGE:
        c.load_image(AGENT_IMAGE)
    yield c
    api.close()


def _node_ready(c: Cluster) -> bool:
    for node in c.core.list_node().items:
        for cond in node.status.conditions or []:
            if cond.type == "Ready" and cond.status == "True":
                return True
    return False


@pytest.fixture(scope="session")
def app_image(cluster: Cluster) -> str:
    """The test app image (images/busybox), present in the cluster."""
    if cluster.managed:
        cluster.load_image(APP_IMAGE)
    return APP_IMAGE


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, request) -> str:
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]", "-", request.module.__name__.split(".")[-1].lower())[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={TEST_LABEL: "1"})))
    # The ServiceAccount controller creates `default` shortly after; pods need it.
    wait_until(lambda: _has_default_sa(cluster, name), 60, f"ServiceAccount {name}/default")
    yield name
    cluster.core.delete_namespace(name)


def _has_default_sa(cluster: Cluster, ns: str) -> bool:
    from kubernetes.client.exceptions import ApiException
    try:
        cluster.core.read_namespaced_service_account("default", ns)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


@pytest.fixture(scope="module")
def limited_kubeconfig(cluster: Cluster, namespace: str, tmp_path_factory) -> Path:
    """A kubeconfig for ServiceAccount `limited` in `namespace`, allowed to read pods and
    configmaps there and nothing else. Works for any provider (no CA key needed): the token
    comes from the TokenRequest API."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(cluster.api)
    cluster.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="limited")))
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="limited"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods", "configmaps"],
                                   verbs=["get", "list", "watch"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="limited"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="limited"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="limited", namespace=namespace)]))
    token = cluster.core.create_namespaced_service_account_token("limited", namespace, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token

    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    ctx_name = admin["current-context"]
    ctx = next(c["context"] for c in admin["contexts"] if c["name"] == ctx_name)
    cl = next(c["cluster"] for c in admin["clusters"] if c["name"] == ctx["cluster"])
    cluster_entry = {"server": cl["server"]}
    if "certificate-authority-data" in cl:
        cluster_entry["certificate-authority-data"] = cl["certificate-authority-data"]
    elif "certificate-authority" in cl:
        cluster_entry["certificate-authority-data"] = base64.b64encode(
            Path(cl["certificate-authority"]).read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster_entry}],
        "users": [{"name": "limited", "user": {"token": token}}],
        "contexts": [{"name": "limited", "context": {"cluster": "c", "user": "limited", "namespace": namespace}}],
        "current-context": "limited",
    }
    path = tmp_path_factory.mktemp("kube") / "limited.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
