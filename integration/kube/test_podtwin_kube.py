"""`podtwin container run --target deploy/NAME IMAGE` against the real cluster.

An unchanged static app image (busybox + a static Go UDP client) runs locally in Docker and must
see what the target pod sees: its env (literal, ConfigMap, Secret), its DNS (short, namespaced and
full Service names), ClusterIPs and pod IPs over TCP and UDP. Nothing may be left in the cluster.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kubernetes import client, utils

from kubeutil import exec_in, wait_until
from podtwin.runner.config.image import podtwin_image_name

PODTWIN_IMAGE = podtwin_image_name()   # what sessions run: podtwin:<version>, or PODTWIN_IMAGE

APP = "podtwin-test/busybox:latest"
BACKEND = """
import http.server, socket, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = f"k8s backend {self.path}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9000))
    while True:
        d, a = s.recvfrom(2048); s.sendto(b"echo:" + d, a)
threading.Thread(target=udp, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"""


def sleeper(name: str, env: list[dict], labels: dict) -> dict:
    return {"name": name, "image": PODTWIN_IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "infinity"], "env": env}


def manifests(ns: str) -> list[dict]:
    env = [{"name": "APP_MODE", "value": "staging"},
           {"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "LOG_LEVEL"}}},
           {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "API_TOKEN"}}}]
    labels = {"app": "api"}
    pod_spec = {"containers": [sleeper("api", env, labels)], "terminationGracePeriodSeconds": 1}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"}, "data": {"LOG_LEVEL": "debug"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret"},
         "stringData": {"API_TOKEN": "s3cr3t-token"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "backend-code"}, "data": {"backend.py": BACKEND}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
         "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                  "template": {"metadata": {"labels": {"app": "db"}},
                               "spec": {"containers": [sleeper("db", [{"name": "WHO", "value": "statefulset"}], {})],
                                        "terminationGracePeriodSeconds": 1}}}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "worker"},
         "spec": {"template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                                        "containers": [sleeper("worker", [{"name": "WHO", "value": "job"}], {})]}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "two", "labels": {"app": "two"}},
         "spec": {"terminationGracePeriodSeconds": 1,
                  "containers": [sleeper("main", [{"name": "WHO", "value": "main"}], {}),
                                 sleeper("side", [{"name": "WHO", "value": "side"}], {})]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
         "spec": {"selector": labels, "ports": [{"port": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "backend"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "backend"}},
                  "template": {"metadata": {"labels": {"app": "backend"}}, "spec": {
                      "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "backend", "image": PODTWIN_IMAGE, "imagePullPolicy": "IfNotPresent",
                                      "command": ["python3", "/code/backend.py"],
                                      "volumeMounts": [{"name": "code", "mountPath": "/code"}]}],
                      "volumes": [{"name": "code", "configMap": {"name": "backend-code"}}]}}}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-files"},
         "data": {"app.yaml": "greeting: from the pod's ConfigMap\n", "hidden.yaml": "not for the app\n"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "files"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "files"}},
                  "template": {"metadata": {"labels": {"app": "files"}}, "spec": {
                      "terminationGracePeriodSeconds": 1,
                      # a non-root pod whose Secret (0440) is readable through its fsGroup only
                      "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
                      "containers": [{**sleeper("files", [], {}),
                                      "command": ["sh", "-c", "echo written-by-pod > /data/state; exec sleep infinity"],
                                      "volumeMounts": [
                          {"name": "config", "mountPath": "/etc/config"},
                          {"name": "secret", "mountPath": "/etc/secret", "readOnly": True},
                          {"name": "data", "mountPath": "/data"},
                          {"name": "config", "mountPath": "/srv/app.yaml", "subPath": "app.yaml"}]}],
                      "volumes": [{"name": "config", "configMap": {"name": "app-files"}},
                                  {"name": "secret", "secret": {"secretName": "app-secret", "defaultMode": 0o440}},
                                  {"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
         "spec": {"selector": {"app": "backend"}, "ports": [
             {"name": "http", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 9000, "protocol": "UDP"}]}},
    ]


@pytest.fixture(scope="module")
def staging(cluster, namespace):
    cluster.load_image(PODTWIN_IMAGE)
    for manifest in manifests(namespace):
        utils.create_from_dict(cluster.api, manifest, namespace=namespace)
    core = client.CoreV1Api(cluster.api)

    def all_ready():
        pods = core.list_namespaced_pod(namespace).items
        apps = {p.metadata.labels.get("app") or p.metadata.labels.get("job-name") for p in pods}
        return {"api", "db", "two", "backend", "worker", "files"} <= apps and all(
            p.status.phase == "Running" and all(c.ready for c in p.status.container_statuses or [])
            for p in pods)
    wait_until(all_ready, 180, "the staging workloads to run")
    return namespace


def podtwin(cluster, *args, kubeconfig=None, timeout=180):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or cluster.kubeconfig)}
    env["PODTWIN_STATE_DIR"] = os.environ.get("PODTWIN_TEST_STATE", tempfile.gettempdir() + "/podtwin-kube-tests")
    return subprocess.run([sys.executable, "-m", "podtwin.runner", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def agent_pods(cluster) -> list:
    return client.CoreV1Api(cluster.api).list_pod_for_all_namespaces(label_selector="podtwin.session").items


def no_agent_left(cluster, within: float) -> None:
    wait_until(lambda: not agent_pods(cluster), within, "the agent pods to go")


def test_the_pods_files_at_their_real_paths(cluster, staging, tmp_path):
    """ConfigMap, Secret (0440, fsGroup), the service-account token, an emptyDir the pod wrote and a
    subPath file, in the local app where the pod has them, read-only; from a seed-style file."""
    cfg = tmp_path / "mirrord.json"
    cfg.write_text(json.dumps({"target": "deployment/files", "feature": {"fs": "read"}}))
    script = ("cat /etc/config/app.yaml; cat /etc/secret/API_TOKEN; echo; "
              "cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; "
              "ls -lnL /etc/secret/API_TOKEN; cat /data/state /srv/app.yaml; "
              "echo x > /data/state 2>/dev/null && echo WROTE || echo write-refused")
    result = podtwin(cluster, "container", "run", "-n", staging, "-f", str(cfg), APP, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["greeting: from the pod's ConfigMap", "s3cr3t-token", staging]
    assert lines[3].startswith("-r--r-----") and lines[3].split()[2:4] == ["0", "2000"]   # as in the pod
    assert lines[4:] == ["written-by-pod", "greeting: from the pod's ConfigMap", "write-refused"]
    assert pod_exec(cluster, staging, "app=files", "cat", "/data/state") == "written-by-pod\n"
    assert ("the target's files: /data, /etc/config, /etc/secret, /srv/app.yaml, "
            "/var/run/secrets/kubernetes.io/serviceaccount") in result.stderr


def test_files_write_mode_live_updates_and_the_pods_user(cluster, staging, tmp_path):
    """--fs write writes the pod's emptyDir; a ConfigMap update the kubelet applies shows in the
    running app; --as-target-user reads the fsGroup Secret as the pod's user; not_found hides a
    file and local leaves a mount as the image's own."""
    cfg = tmp_path / "fs.json"
    cfg.write_text(json.dumps({"feature": {"fs": {"not_found": [r"^/etc/config/hidden\.yaml$"],
                                                   "local": [r"^/srv/app\.yaml$"]}}}))
    script = ("id -u; id -G; cat /etc/secret/API_TOKEN; echo; echo from-the-app > /data/from-app && echo WROTE; "
              "cat /srv/app.yaml 2>/dev/null || echo image-own; cat /etc/config/hidden.yaml 2>/dev/null || echo hidden; "
              "while true; do cat /etc/config/app.yaml; sleep 1; done")
    out = tmp_path / "out"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "PODTWIN_STATE_DIR": os.environ.get("PODTWIN_TEST_STATE", tempfile.gettempdir() + "/podtwin-kube-tests")}
    core = client.CoreV1Api(cluster.api)
    with open(out, "w") as stdout, open(tmp_path / "err", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "podtwin.runner", "container", "run", "-n", staging,
                                 "--target", "deploy/files", "-f", str(cfg), "--fs", "write", "--as-target-user",
                                 APP, "sh", "-c", script], stdout=stdout, stderr=stderr, env=env)
    try:
        wait_until(lambda: "greeting:" in out.read_text() or proc.poll() is not None, 120, "the app to read")
        assert proc.poll() is None, (tmp_path / "err").read_text()
        lines = out.read_text().splitlines()
        assert lines[0] == "1000" and "2000" in lines[1].split(), lines
        assert lines[2:6] == ["s3cr3t-token", "WROTE", "image-own", "hidden"], lines
        assert pod_exec(cluster, staging, "app=files", "cat", "/data/from-app") == "from-the-app\n"
        core.patch_namespaced_config_map("app-files", staging, {"data": {"app.yaml": "greeting: patched\n"}})
        wait_until(lambda: "greeting: patched" in out.read_text(), 60, "the ConfigMap's update to show")
    finally:
        core.patch_namespaced_config_map("app-files", staging,
                                         {"data": {"app.yaml": "greeting: from the pod's ConfigMap\n"}})
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 130, (tmp_path / "err").read_text()
    assert "the app runs as the target's user 1000:1000, with groups 2000" in (tmp_path / "err").read_text()
    no_agent_left(cluster, 30)


def pod_exec(cluster, ns: str, selector: str, *command: str) -> str:
    pod = client.CoreV1Api(cluster.api).list_namespaced_pod(ns, label_selector=selector).items[0].metadata.name
    return exec_in(cluster, ns, pod, list(command))


def test_deployment_target_env_dns_tcp_udp(cluster, staging):
    backend_ip = next(p.status.pod_ip for p in client.CoreV1Api(cluster.api).list_namespaced_pod(
        staging, label_selector="app=backend").items)
    script = ("echo APP_MODE=$APP_MODE; echo LOG_LEVEL=$LOG_LEVEL; echo API_TOKEN=$API_TOKEN; "
              "wget -qO- http://backend/short; wget -qO- http://backend." + staging + "/ns; "
              "wget -qO- http://backend." + staging + ".svc.cluster.local/full; "
              f"wget -qO- http://{backend_ip}/pod-ip; udpsend backend:9000 over-udp; exit 7")
    result = podtwin(cluster, "container", "run", "-n", staging, "--target", "deploy/api", APP, "sh", "-c", script)
    assert result.returncode == 7, result.stdout + result.stderr
    out = result.stdout
    for expected in ("APP_MODE=staging", "LOG_LEVEL=debug", "API_TOKEN=s3cr3t-token", "k8s backend /short",
                     "k8s backend /ns", "k8s backend /full", "k8s backend /pod-ip", "echo:over-udp"):
        assert expected in out, (expected, out, result.stderr)
    no_agent_left(cluster, 10)


def test_exec_transport(cluster, staging, tmp_path):
    """agent.transport: exec -- the link over the stdin/stdout of a relay exec'd in the agent's pod."""
    cfg = tmp_path / "exec.json"
    cfg.write_text(json.dumps({"agent": {"transport": "exec"}}))
    result = podtwin(cluster, "container", "run", "-q", "-f", str(cfg), "-n", staging, "--target", "deploy/api",
                     APP, "sh", "-c", "echo API_TOKEN=$API_TOKEN; wget -qO- http://backend/over-exec; "
                                      "udpsend backend:9000 exec-udp")
    assert result.returncode == 0, result.stderr
    for expected in ("API_TOKEN=s3cr3t-token", "k8s backend /over-exec", "echo:exec-udp"):
        assert expected in result.stdout, (expected, result.stdout, result.stderr)
    no_agent_left(cluster, 10)


@pytest.mark.parametrize("target,who", [("sts/db", "statefulset"), ("job/worker", "job"),
                                        ("pod/two/container/side", "side"), ("pod/two", "main")])
def test_other_target_kinds(cluster, staging, target, who):
    result = podtwin(cluster, "container", "run", "-q", "-n", staging, "--target", target, APP,
                     "sh", "-c", "echo WHO=$WHO; wget -qO- http://backend/" + who)
    assert result.returncode == 0, result.stderr
    assert f"WHO={who}" in result.stdout and f"k8s backend /{who}" in result.stdout


def test_service_target(cluster, staging):
    result = podtwin(cluster, "container", "run", "-q", "-n", staging, "--target", "svc/api", APP,
                     "sh", "-c", "echo APP_MODE=$APP_MODE")
    assert "APP_MODE=staging" in result.stdout, result.stderr


def test_unknown_target_says_what_exists(cluster, staging):
    result = podtwin(cluster, "container", "run", "-n", staging, "--target", "deploy/apu", APP, "true")
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "deployment/apu not found" in line and "deployment/api" in line
    assert not agent_pods(cluster)


def test_sessions_and_clean_cover_agent_jobs(cluster, staging):
    """An agent Job whose runner is gone (made by hand: the runner's own guard normally deletes
    it) is listed as dead by `podtwin sessions` and deleted by `podtwin clean`."""
    import socket
    gone = subprocess.Popen(["true"])
    gone.wait()                                   # a runner PID that no longer runs
    labels = {"podtwin.session": "0badc0de", "podtwin.role": "agent", "podtwin.target": "deployment_api",
              "podtwin.runner-pid": str(gone.pid), "podtwin.runner-start": "0",
              "podtwin.host": socket.gethostname()}
    name = "podtwin-0badc0de-agent"
    client.BatchV1Api(cluster.api).create_namespaced_job(staging, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "agent", "image": PODTWIN_IMAGE, "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "infinity"]}]}}}})
    listed = podtwin(cluster, "sessions")
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("0badc0de"))
    assert "dead" in line and "deployment/api" in line and f"agent-job:{staging}/{name}" in line
    cleaned = podtwin(cluster, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed agent Job {staging}/{name}" in cleaned.stdout
    wait_until(lambda: not client.BatchV1Api(cluster.api).list_namespaced_job(
        staging, label_selector="podtwin.session=0badc0de").items, 30, "the Job to go")
    wait_until(lambda: not agent_pods(cluster), 30, "its pod to go")


def test_sigkill_of_the_runner_removes_the_agent(cluster, staging, tmp_path):
    core = client.CoreV1Api(cluster.api)
    target = core.list_namespaced_pod(staging, label_selector="app=api").items[0]
    restarts = target.status.container_statuses[0].restart_count
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PODTWIN_STATE_DIR": str(tmp_path)}
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "podtwin.runner", "container", "run", "-n", staging,
                                 "--target", "deploy/api", APP, "sleep", "300"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        wait_until(lambda: "starting the app" in (tmp_path / "err").read_text(), 120, "the session to start")
        assert agent_pods(cluster)
        proc.kill()
        proc.wait(timeout=10)
        start = time.monotonic()
        no_agent_left(cluster, 30)
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    after = core.read_namespaced_pod(target.metadata.name, staging)
    assert after.status.container_statuses[0].restart_count == restarts   # the target was never touched
    # and it still serves: the session's leftovers (the app container) go with the guard
    wait_until(lambda: not subprocess.run(["docker", "ps", "-aq", "--filter", "label=podtwin.session"],
                                          capture_output=True, text=True).stdout.strip(), 20,
               "the local containers to go")


def test_rbac_limited_user_gets_a_clear_error(cluster, staging, limited_kubeconfig):
    result = podtwin(cluster, "container", "run", "-n", staging, "--target", "deploy/api", APP, "true",
                     kubeconfig=limited_kubeconfig)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("podtwin: ") and "not allowed" in line, result.stderr
    assert "Traceback" not in result.stderr
    assert not agent_pods(cluster)


def kubeconfig_for(cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig for ServiceAccount ``sa`` (token from the TokenRequest API)."""
    import base64

    import yaml

    token = client.CoreV1Api(cluster.api).create_namespaced_service_account_token(
        sa, namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ctx = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cl = next(c["cluster"] for c in admin["clusters"] if c["name"] == ctx["cluster"])
    ca = cl.get("certificate-authority-data") or base64.b64encode(
        Path(cl["certificate-authority"]).read_bytes()).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cl["server"], "certificate-authority-data": ca}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
        "current-context": sa}))
    path.chmod(0o600)
    return path


def test_the_documented_role_is_enough(cluster, staging, tmp_path):
    """A user bound to exactly docs/kubernetes-role.yaml passes `podtwin doctor` and runs a session."""
    import yaml

    role = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "kubernetes-role.yaml").read_text())
    utils.create_from_dict(cluster.api, role, namespace=staging)
    client.CoreV1Api(cluster.api).create_namespaced_service_account(
        staging, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="dev")))
    client.RbacAuthorizationV1Api(cluster.api).create_namespaced_role_binding(staging, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="dev"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role["metadata"]["name"]),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="dev", namespace=staging)]))
    kubeconfig = kubeconfig_for(cluster, staging, "dev", tmp_path / "dev.kubeconfig")
    doctor = podtwin(cluster, "doctor", kubeconfig=kubeconfig)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "FAIL" not in doctor.stdout and "may create jobs" in doctor.stdout
    result = podtwin(cluster, "container", "run", "-q", "--target", "deploy/api", APP, "sh", "-c",
                     "echo APP_MODE=$APP_MODE; wget -qO- http://backend/as-dev", kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    assert "APP_MODE=staging" in result.stdout and "k8s backend /as-dev" in result.stdout
    no_agent_left(cluster, 10)


def test_doctor_names_what_a_limited_user_lacks(cluster, staging, limited_kubeconfig):
    doctor = podtwin(cluster, "doctor", kubeconfig=limited_kubeconfig)
    assert doctor.returncode == 1
    assert "FAIL  may create jobs" in doctor.stdout and "docs/kubernetes.md" in doctor.stdout
    assert "ok    may list pods" in doctor.stdout


def test_missing_portforward_permission_is_one_clear_line(cluster, staging, tmp_path):
    import yaml

    role = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "kubernetes-role.yaml").read_text())
    role["metadata"]["name"] = "no-portforward"
    role["rules"] = [r for r in role["rules"] if "pods/portforward" not in r["resources"]]
    utils.create_from_dict(cluster.api, role, namespace=staging)
    client.CoreV1Api(cluster.api).create_namespaced_service_account(
        staging, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nopf")))
    client.RbacAuthorizationV1Api(cluster.api).create_namespaced_role_binding(staging, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="nopf"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="no-portforward"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="nopf", namespace=staging)]))
    kubeconfig = kubeconfig_for(cluster, staging, "nopf", tmp_path / "nopf.kubeconfig")
    result = podtwin(cluster, "container", "run", "--target", "deploy/api", APP, "true", kubeconfig=kubeconfig)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("podtwin: port-forward to the agent failed") and "pods/portforward" in line, line
    no_agent_left(cluster, 15)


def test_targetless_session_from_a_restricted_namespace(cluster, staging, tmp_path):
    """No target (a mirrord file without one): the agent is a pod of the session's own, here in a
    namespace at Pod Security `restricted`; the app gets no environment from it, and its
    outgoing TCP, UDP and DNS leave from that pod's network."""
    core = client.CoreV1Api(cluster.api)
    ns = f"targetless-{staging[-6:]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels={
        "podtwin-test": "1", "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"})))
    try:
        wait_until(lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items),
                   60, "the namespace's default ServiceAccount")
        cfg = tmp_path / "mirrord.json"
        cfg.write_text(json.dumps({"feature": {"network": {"incoming": "off"}}}))
        full = f"backend.{staging}.svc.cluster.local"
        script = (f"echo APP_MODE=[$APP_MODE]; wget -qO- http://{full}/targetless; "
                  f"udpsend {full}:9000 targetless-udp")
        result = podtwin(cluster, "container", "run", "-f", str(cfg), "-n", ns, APP, "sh", "-c", script)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "APP_MODE=[]" in result.stdout                       # no target: no environment
        assert "k8s backend /targetless" in result.stdout and "echo:targetless-udp" in result.stdout
        assert f"creating a targetless agent Job in namespace {ns}" in result.stderr
        no_agent_left(cluster, 30)
    finally:
        core.delete_namespace(ns)


def test_real_users_mirrord_file_shapes_work(cluster, staging, tmp_path):
    """The shapes found in real users' files: the target object without `path`, a get_env
    template (one with a default, one set), and the top-level kubeconfig key (no KUBECONFIG)."""
    cfg = tmp_path / "mirrord.json"
    cfg.write_text(json.dumps({
        "kubeconfig": str(cluster.kubeconfig),
        "target": {"deployment": "api", "container": "api"},
        "feature": {"env": {"override": {
            "FROM_TEMPLATE": "{{ get_env(name='PT_SHAPES_SET') }}",
            "WITH_DEFAULT": "{{ get_env(name='PT_SHAPES_UNSET', default='the-default') }}"}}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PT_SHAPES_UNSET")}
    env.update(PT_SHAPES_SET="from-the-environment",
               PODTWIN_STATE_DIR=os.environ.get("PODTWIN_TEST_STATE", tempfile.gettempdir() + "/podtwin-kube-tests"))
    result = subprocess.run([sys.executable, "-m", "podtwin.runner", "container", "run", "-q", "-f", str(cfg),
                             "-n", staging, APP, "sh", "-c", "echo $APP_MODE $FROM_TEMPLATE $WITH_DEFAULT"],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["staging", "from-the-environment", "the-default"]


def test_compose_project_with_two_bridged_services_and_a_local_one(cluster, staging, tmp_path):
    """`podtwin compose up`: `api` runs as deploy/api (its env, the compose file's value winning;
    the cluster's backend by short and full names) next to a plain local `db` it reaches by its
    compose name; `reader` runs as deploy/files with the pod's ConfigMap at its path. compose's
    exit code; afterwards no agent, no container of the project, and the target pods untouched."""
    import yaml

    def pods():
        return {(p.metadata.name, p.metadata.uid, sum(s.restart_count for s in p.status.container_statuses or []))
                for p in client.CoreV1Api(cluster.api).list_namespaced_pod(staging).items}
    before = pods()
    project = f"ptk{os.getpid()}"
    file = tmp_path / "compose.yaml"
    file.write_text(yaml.safe_dump({"services": {
        "db": {"image": APP, "command": ["sh", "-c", "mkdir -p /w && echo local-db > /w/index.html && "
                                         "exec httpd -f -p 5432 -h /w"]},
        "api": {"image": APP, "depends_on": ["db"], "environment": {"APP_MODE": "local"},
                "command": ["sh", "-c", "echo APP_MODE=$$APP_MODE LOG_LEVEL=$$LOG_LEVEL; wget -qO- http://db:5432/; "
                            "wget -qO- http://backend/short; "
                            f"wget -qO- http://backend.{staging}.svc.cluster.local/full; sleep 1; exit 5"],
                "x-podtwin": {"target": "deploy/api", "namespace": staging}},
        "reader": {"image": APP, "command": ["sh", "-c", "trap 'exit 0' TERM; cat /etc/config/app.yaml; "
                                             "while sleep 1; do :; done"],
                   "x-podtwin": {"target": "deploy/files", "namespace": staging}},
    }}))
    result = podtwin(cluster, "compose", "-p", project, "-f", str(file), "up", "--exit-code-from", "api")
    assert result.returncode == 5, result.stdout + result.stderr
    for expected in ("APP_MODE=local LOG_LEVEL=debug", "local-db", "k8s backend /short", "k8s backend /full",
                     "greeting: from the pod's ConfigMap"):
        assert expected in result.stdout, (expected, result.stdout, result.stderr)
    no_agent_left(cluster, 15)
    left = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True).stdout.split()
    assert left == []
    assert pods() == before
