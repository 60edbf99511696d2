"""The test cluster itself works as a Kubernetes cluster must for podtwin's tests: a Ready node,
Deployments and Services with cluster DNS, ConfigMap/Secret volumes, ephemeral containers,
exec and port-forward through the Python client, Pod Security admission and RBAC."""
from __future__ import annotations

import socket

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from kubeutil import exec_in, wait_until

HTTP_PORT = 8080


def busybox_container(image: str, name: str, script: str, **kw) -> client.V1Container:
    return client.V1Container(name=name, image=image, image_pull_policy="Never",
                              command=["sh", "-c", script], **kw)


def run_pod(cluster, ns: str, name: str, image: str, script: str = "sleep 3600", **spec) -> client.V1Pod:
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1PodSpec(containers=[busybox_container(image, "main", script)],
                              termination_grace_period_seconds=1, **spec))
    cluster.core.create_namespaced_pod(ns, pod)
    return cluster.wait_pod_running(ns, name)


@pytest.fixture(scope="module")
def web(cluster, namespace, app_image) -> str:
    """A Deployment serving HTTP with busybox httpd, and a Service `web` (80 -> 8080)."""
    script = (f"mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && "
              f"exec httpd -f -p {HTTP_PORT} -h /www")
    labels = {"app": "web"}
    cluster.apps.create_namespaced_deployment(namespace, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(termination_grace_period_seconds=1, containers=[
                    busybox_container(app_image, "web", script,
                                      ports=[client.V1ContainerPort(container_port=HTTP_PORT)],
                                      readiness_probe=client.V1Probe(
                                          tcp_socket=client.V1TCPSocketAction(port=HTTP_PORT),
                                          period_seconds=1))])))))
    cluster.core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector=labels, ports=[
            client.V1ServicePort(port=80, target_port=HTTP_PORT)])))

    def available():
        d = cluster.apps.read_namespaced_deployment("web", namespace)
        return (d.status.available_replicas or 0) >= 1
    wait_until(available, 120, "deployment web available")
    return "web"


@pytest.fixture(scope="module")
def client_pod(cluster, namespace, app_image) -> str:
    run_pod(cluster, namespace, "client", app_image)
    return "client"


def test_node_is_ready(cluster):
    nodes = cluster.core.list_node().items
    assert nodes, "no nodes"
    ready = [n.metadata.name for n in nodes
             if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)]
    assert ready, f"no Ready node among {[n.metadata.name for n in nodes]}"


def test_deployment_and_service_run(cluster, namespace, web):
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert [p.status.phase for p in pods] == ["Running"]
    endpoints = cluster.core.read_namespaced_endpoints("web", namespace)
    addresses = [a.ip for s in endpoints.subsets or [] for a in s.addresses or []]
    assert addresses == [pods[0].status.pod_ip]


@pytest.mark.parametrize("name", ["web", "web.{ns}.svc.cluster.local"])
def test_service_resolves_and_answers(cluster, namespace, web, client_pod, name):
    host = name.format(ns=namespace)
    svc_ip = cluster.core.read_namespaced_service("web", namespace).spec.cluster_ip
    # (busybox's `wget -T` crashes in Debian's static build: `timeout` bounds the attempt)
    out = exec_in(cluster, namespace, client_pod, ["nslookup", host])
    assert svc_ip in out, out
    body = exec_in(cluster, namespace, client_pod, ["timeout", "10", "wget", "-q", "-O-", f"http://{host}/"])
    assert body.startswith("hello-from-web-"), body


def test_names_outside_the_cluster_do_not_resolve(cluster, namespace, client_pod):
    """CoreDNS answers only cluster.local: nothing is forwarded off the machine."""
    out = exec_in(cluster, namespace, client_pod, ["sh", "-c", "nslookup example.com; echo rc=$?"])
    assert "rc=1" in out or "NXDOMAIN" in out, out


def test_configmap_and_secret_mount(cluster, namespace, app_image):
    cluster.core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="settings"), data={"greeting": "hello-config"}))
    cluster.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="creds"), string_data={"password": "s3cret-value"}))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="mounts"),
        spec=client.V1PodSpec(
            termination_grace_period_seconds=1,
            containers=[busybox_container(app_image, "main", "sleep 3600", volume_mounts=[
                client.V1VolumeMount(name="cfg", mount_path="/etc/cfg"),
                client.V1VolumeMount(name="sec", mount_path="/etc/sec")])],
            volumes=[
                client.V1Volume(name="cfg", config_map=client.V1ConfigMapVolumeSource(name="settings")),
                client.V1Volume(name="sec", secret=client.V1SecretVolumeSource(secret_name="creds"))]))
    cluster.core.create_namespaced_pod(namespace, pod)
    cluster.wait_pod_running(namespace, "mounts")
    out = exec_in(cluster, namespace, "mounts", ["cat", "/etc/cfg/greeting", "/etc/sec/password"])
    assert out == "hello-configs3cret-value", out


def test_service_account_token_is_mounted(cluster, namespace, client_pod):
    token = exec_in(cluster, namespace, client_pod,
                    ["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"])
    assert token.count(".") == 2, "not a JWT"
    ns = exec_in(cluster, namespace, client_pod,
                 ["cat", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"])
    assert ns == namespace


def test_exec(cluster, namespace, client_pod):
    out = exec_in(cluster, namespace, client_pod, ["sh", "-c", "echo $((6 * 7)) $(hostname)"])
    assert out.strip() == "42 client"


def test_port_forward(cluster, namespace, web):
    pod = cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items[0].metadata.name
    pf = portforward(cluster.core.connect_get_namespaced_pod_portforward, pod, namespace,
                     ports=str(HTTP_PORT))
    sock = pf.socket(HTTP_PORT)
    sock.setblocking(True)
    sock.settimeout(10)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    finally:
        sock.close()
    error = pf.error(HTTP_PORT)
    pf.close()
    # the client's proxy thread ends once both sides are closed, without closing its socket
    wait_until(lambda: not pf.websocket.connected, 10, "port-forward websocket closed")
    pf.websocket.shutdown()
    assert b" 200 " in data.split(b"\r\n", 1)[0], data[:200]
    assert f"hello-from-{pod}".encode() in data
    assert error is None


def test_ephemeral_container_attaches(cluster, namespace, app_image):
    run_pod(cluster, namespace, "target", app_image)
    cluster.core.patch_namespaced_pod_ephemeralcontainers("target", namespace, {"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": app_image, "imagePullPolicy": "Never", "targetContainerName": "main",
        "command": ["sh", "-c", "echo attached-$(hostname); sleep 3600"],
    }]}})

    def running():
        pod = cluster.core.read_namespaced_pod("target", namespace)
        for s in pod.status.ephemeral_container_statuses or []:
            if s.name == "debugger" and s.state.running:
                return True
        return False
    wait_until(running, 60, "ephemeral container running")
    wait_until(lambda: "attached-target" in cluster.core.read_namespaced_pod_log(
        "target", namespace, container="debugger"), 30, "ephemeral container output")
    # It shares the pod's network namespace: localhost is the pod's.
    assert exec_in(cluster, namespace, "target", ["hostname"], container="debugger").strip() == "target"


def test_pod_security_baseline_refuses_privileged_pod(cluster, namespace, app_image):
    name = f"{namespace}-psa"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"podtwin-test": "1", "pod-security.kubernetes.io/enforce": "baseline"})))
    try:
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="privileged"),
            spec=client.V1PodSpec(containers=[busybox_container(
                app_image, "main", "sleep 3600",
                security_context=client.V1SecurityContext(privileged=True))]))
        with pytest.raises(ApiException) as err:
            cluster.core.create_namespaced_pod(name, pod)
        assert err.value.status == 403
        assert "violates PodSecurity" in err.value.body and "privileged" in err.value.body
        # The same pod without `privileged` is admitted (dry run: it need not run).
        pod.spec.containers[0].security_context = None
        cluster.core.create_namespaced_pod(name, pod, dry_run="All")
    finally:
        cluster.core.delete_namespace(name)


def test_limited_user_is_confined_to_its_namespace(cluster, namespace, limited_kubeconfig, client_pod):
    api = config.new_client_from_config(config_file=str(limited_kubeconfig))
    try:
        core = client.CoreV1Api(api)
        names = [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
        assert "client" in names
        for call in (lambda: core.list_namespaced_pod("kube-system"),
                     lambda: core.list_namespaced_secret(namespace),
                     lambda: core.delete_namespaced_pod("client", namespace)):
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403, err.value
    finally:
        api.close()
