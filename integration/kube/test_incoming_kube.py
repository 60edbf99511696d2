"""Incoming traffic for Kubernetes targets, on the real cluster: a client pod calls the target
through its Service, as another service of the staging would, while a local podtwin session
steals (whole port, or by HTTP filter) or mirrors the target's port. Rules are read from the
target's own network namespace on the node (this machine), so "nothing left" is checked where
it matters.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client, utils
from kubernetes.stream import stream

from kubeutil import wait_until
from podtwin.agent.target.nsenter import main_pid
from podtwin.runner.config.image import podtwin_image_name

PODTWIN_IMAGE = podtwin_image_name()   # what sessions run: podtwin:<version>, or PODTWIN_IMAGE
APP = "podtwin-test/busybox:latest"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
WEB = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        b = f"target:{self.command} {self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers()
        self.wfile.write(b)
    do_GET = do_POST = answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"""
HTTPD = "mkdir -p /w && echo {body} > /w/index.html && httpd -f -p 80 -h /w"


def manifests() -> list[dict]:
    code = {"name": "code", "configMap": {"name": "incoming-code"}}
    python = {"image": PODTWIN_IMAGE, "imagePullPolicy": "IfNotPresent",
              "volumeMounts": [{"name": "code", "mountPath": "/code"}]}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "incoming-code"},
         "data": {"web.py": WEB, "client.py": (ASSETS / "keepalive_client.py").read_text()}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                  "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                      "terminationGracePeriodSeconds": 1, "volumes": [code],
                      "containers": [{"name": "web", "command": ["python3", "/code/web.py"], **python}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "meshed"},   # a mesh proxy's name only
         "spec": {"terminationGracePeriodSeconds": 1, "volumes": [code], "containers": [
             {"name": "istio-proxy", "command": ["sleep", "infinity"], **python},
             {"name": "app", "command": ["sleep", "infinity"], **python}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "caller"},
         "spec": {"terminationGracePeriodSeconds": 1, "volumes": [code],
                  "containers": [{"name": "caller", "command": ["sleep", "infinity"], **python}]}},
    ]


@pytest.fixture(scope="module")
def staging(cluster, namespace):
    cluster.load_image(PODTWIN_IMAGE)
    for manifest in manifests():
        utils.create_from_dict(cluster.api, manifest, namespace=namespace)
    core = client.CoreV1Api(cluster.api)

    def ready():
        pods = core.list_namespaced_pod(namespace).items
        return len(pods) == 3 and all(p.status.phase == "Running" and all(
            c.ready for c in p.status.container_statuses or []) for p in pods)
    wait_until(ready, 180, "the web, meshed and caller pods to run")
    wait_until(lambda: "target:GET /up" in " ".join(calls(cluster, namespace, [["GET", "/up", {}]])),
               60, "the web Service to answer")
    return namespace


def calls(cluster, ns: str, requests: list) -> list[str]:
    """Requests from the caller pod to http://web (the Service) over one kept-alive connection."""
    ws = stream(client.CoreV1Api(cluster.api).connect_get_namespaced_pod_exec, "caller", ns,
                command=["python3", "/code/client.py", "web", json.dumps(requests)],
                stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
    try:
        ws.run_forever(timeout=30)
        out = ws.read_stdout() + ws.read_stderr()
    finally:
        ws.close()
        ws.sock.shutdown()  # websocket-client's close() leaves the socket open once the server has closed
    try:
        return [body for _, body in json.loads(out)["responses"]]
    except ValueError:
        return [f"(failed: {out.strip()[-300:]})"]


def web_pod(cluster, ns: str):
    return client.CoreV1Api(cluster.api).list_namespaced_pod(ns, label_selector="app=web").items[0]


def rules_in(container_id: str) -> list[str]:
    """podtwin's nat rules in that container's network namespace, read on the node."""
    save = subprocess.run(["nsenter", "-t", str(main_pid(container_id)), "-n", "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout
    return [line for line in save.splitlines() if "PODTWIN" in line]


def target_rules(cluster, ns: str) -> list[str]:
    return rules_in(web_pod(cluster, ns).status.container_statuses[0].container_id)


def guard_logs(cluster, ns: str, agent) -> str:
    """The rules guard's output (in the agent's Job pod, or beside an ephemeral agent)."""
    core = client.CoreV1Api(cluster.api)
    try:
        if agent is not None:
            return core.read_namespaced_pod_log(agent.metadata.name, agent.metadata.namespace, container="rules-guard")
        pod = web_pod(cluster, ns)
        guards = [c.name for c in pod.spec.ephemeral_containers or [] if c.name.endswith("-rules-guard")]
        return core.read_namespaced_pod_log(pod.metadata.name, ns, container=guards[-1])
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(no guard log: {exc})"


def agent_pods(cluster) -> list:
    return client.CoreV1Api(cluster.api).list_pod_for_all_namespaces(label_selector="podtwin.session").items


class Session:
    """A podtwin session in the background, its stderr in a file."""

    def __init__(self, cluster, ns: str, tmp_path: Path, name: str, incoming, *app: str, agent: dict | None = None) -> None:
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}, "agent": agent or {}}))
        self.err_path = tmp_path / f"{name}.err"
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PODTWIN_STATE_DIR": str(tmp_path / "state")}
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "podtwin.runner", "container", "run", "-n", ns, "-f", str(cfg),
                 "--target", "deploy/web", *app], stdout=subprocess.DEVNULL, stderr=err, env=env)

    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        wait_until(lambda: text in self.err() or self.proc.poll() is not None, timeout, repr(text))
        assert self.proc.poll() is None, self.err()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture
def sessions(cluster):
    started: list[Session] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=10)
    wait_until(lambda: not agent_pods(cluster), 30, "the agent pods to go")


def test_steal_whole_port_through_the_service(cluster, staging, sessions, tmp_path):
    session = Session(cluster, staging, tmp_path, "steal", "steal", APP, "sh", "-c", HTTPD.format(body="from-local"))
    sessions.append(session)
    session.wait_for("stealing port 80")
    assert calls(cluster, staging, [["GET", "/", {}], ["GET", "/?again", {}]]) == ["from-local", "from-local"]
    assert target_rules(cluster, staging)
    assert session.stop() == 130
    assert calls(cluster, staging, [["GET", "/back", {}]]) == ["target:GET /back"]   # at once
    assert target_rules(cluster, staging) == []


def test_http_filter_and_two_sessions_on_one_port(cluster, staging, sessions, tmp_path):
    def filtered(name: str) -> Session:
        session = Session(cluster, staging, tmp_path, name,
                          {"mode": "steal", "http_filter": {"header_filter": f"^x-podtwin-user: {name}$"}},
                          "-v", f"{ASSETS / 'keepalive_app.py'}:/app.py:ro", PODTWIN_IMAGE, "python3", "/app.py", name)
        sessions.append(session)
        session.wait_for("matching the HTTP filter")
        return session

    alice_session = filtered("alice")
    alice, bob = {"x-podtwin-user": "alice"}, {"x-podtwin-user": "bob"}
    assert calls(cluster, staging, [["GET", "/1", alice], ["GET", "/2", bob], ["POST", "/3", alice]]) == [
        "alice:GET /1", "target:GET /2", "alice:POST /3"]                    # one keep-alive connection
    bob_session = filtered("bob")
    assert calls(cluster, staging, [["GET", "/4", alice], ["GET", "/5", bob], ["GET", "/6", {}]]) == [
        "alice:GET /4", "bob:GET /5", "target:GET /6"]
    assert bob_session.stop() == 130
    assert alice_session.stop() == 130
    assert calls(cluster, staging, [["GET", "/7", alice]]) == ["target:GET /7"]
    assert target_rules(cluster, staging) == []


def test_mirror_copies_while_the_target_answers(cluster, staging, sessions, tmp_path):
    session = Session(cluster, staging, tmp_path, "mirror", "mirror", APP,
                      "nc", "-ll", "-p", "80", "-e", "sh", "-c", 'while read -r line; do echo "$line" >&2; done')
    sessions.append(session)
    session.wait_for("mirroring port 80")
    assert calls(cluster, staging, [["GET", f"/copy-{i}", {}] for i in range(3)]) == [
        f"target:GET /copy-{i}" for i in range(3)]
    try:
        wait_until(lambda: all(f"GET /copy-{i} HTTP/1.1" in session.err() for i in range(3)), 15,
                   "the local app to log a copy of each request")
    except AssertionError as exc:
        agent = agent_pods(cluster)[0]
        log = client.CoreV1Api(cluster.api).read_namespaced_pod_log(
            agent.metadata.name, agent.metadata.namespace, container="agent")
        raise AssertionError(f"{exc}\nsession: {session.err()}\nagent: {log}") from exc
    assert target_rules(cluster, staging) == []                          # mirroring redirects nothing
    assert session.stop() == 130


@pytest.mark.parametrize("fault", ["sigkill-agent", "delete-agent-pod", "sigkill-runner", "sigkill-ephemeral-agent",
                                   "sigkill-runner-ephemeral"])
def test_no_dirty_rules_after_a_crash(cluster, staging, sessions, tmp_path, fault):
    """The agent keeps a session whose link broke (agent.reconnect_grace), so a dead runner is
    told apart by its guard: it deletes the agent's Job, or connects to an ephemeral agent (which
    nobody can delete) and ends the session."""
    restarts = web_pod(cluster, staging).status.container_statuses[0].restart_count
    ephemeral = fault in ("sigkill-ephemeral-agent", "sigkill-runner-ephemeral")
    session = Session(cluster, staging, tmp_path, fault, "steal", APP, "sh", "-c", HTTPD.format(body=fault),
                      agent={"ephemeral": ephemeral})
    sessions.append(session)
    session.wait_for("stealing port 80")
    assert calls(cluster, staging, [["GET", "/", {}]]) == [fault]
    if fault == "sigkill-ephemeral-agent":   # the agent in the target pod; its guard beside it
        agent_status = next(c for c in web_pod(cluster, staging).status.ephemeral_container_statuses
                            if c.name.endswith("-agent") and c.state.running)
        os.kill(main_pid(agent_status.container_id), signal.SIGKILL)
        agent = None
    elif ephemeral:
        agent = None
    else:
        agent = agent_pods(cluster)[0]
    if fault == "sigkill-agent":        # the agent process alone: its pod and the guard remain
        agent_status = next(c for c in agent.status.container_statuses if c.name == "agent")
        os.kill(main_pid(agent_status.container_id), signal.SIGKILL)
    elif fault == "delete-agent-pod":
        client.CoreV1Api(cluster.api).delete_namespaced_pod(agent.metadata.name, agent.metadata.namespace)
    elif fault in ("sigkill-runner", "sigkill-runner-ephemeral"):
        session.proc.kill()
    start = time.monotonic()
    try:
        wait_until(lambda: not target_rules(cluster, staging), 10, "the session's rules to go", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {target_rules(cluster, staging)}; guard: {guard_logs(cluster, staging, agent)}") from exc
    wait_until(lambda: calls(cluster, staging, [["GET", "/x", {}]]) == ["target:GET /x"], 10,
               "the target to serve again")
    assert time.monotonic() - start < 10
    code = session.proc.wait(timeout=60)
    if not fault.startswith("sigkill-runner"):   # the runner saw its agent go, said so and ended the app
        assert code != 0 and "the link to the agent was lost" in session.err(), session.err()
    assert web_pod(cluster, staging).status.container_statuses[0].restart_count == restarts


def test_a_mesh_sidecar_is_named_and_skipped(cluster, staging, tmp_path):
    cfg = tmp_path / "steal.json"
    cfg.write_text(json.dumps({"feature": {"network": {"incoming": "steal"}}}))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PODTWIN_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, "-m", "podtwin.runner", "container", "run", "-n", staging, "-f", str(cfg),
                             "--target", "pod/meshed", APP, "true"], capture_output=True, text=True, env=env,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert "container app," in result.stderr                      # not the proxy
    assert "service-mesh proxy (istio-proxy)" in result.stderr and "mTLS" in result.stderr
