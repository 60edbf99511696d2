"""Incoming traffic, Docker targets: stealing the target's port, and never leaving a rule behind.

The target is the staging backend (an HTTP server on :80); a client container on the same
internal network calls it by name, as another service of the staging would.
"""
from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import (APP_IMAGE, ASSETS, PODTWIN_IMAGE, docker, podtwin_rules, session_containers,
                      wait_until, write_config)

APP_HTTPD = "mkdir -p /w && echo {body} > /w/index.html && httpd -f -p {port} -h /w"


@pytest.fixture(scope="module")
def client(staging):
    name = staging.target + "-client"
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "--network", staging.network,
           APP_IMAGE, "sleep", "3600")
    yield name
    docker("rm", "-f", name, check=False)


def call(client: str, path: str = "/") -> str:
    """What another service on the staging network gets from the target."""
    out = docker("exec", client, "timeout", "5", "wget", "-qO-", f"http://backend{path}", check=False)
    return out.stdout.strip() or f"(failed: {out.stderr.strip()})"


def steal(podtwin, staging, tmp_path, body: str = "from-local-app", port: int = 80, extra: dict | None = None):
    cfg = write_config(tmp_path / f"steal-{body}.json",
                       {"feature": {"network": {"incoming": {"mode": "steal", **(extra or {})}}}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{staging.backend}",
                         APP_IMAGE, "sh", "-c", APP_HTTPD.format(body=body, port=port))
    wait_until(lambda: "stealing port 80" in proc.err_path.read_text() or proc.poll() is not None,
               60, "the port to be stolen")
    assert proc.poll() is None, proc.err_path.read_text()
    return proc


def test_steal_whole_port_and_give_it_back(podtwin, staging, client, tmp_path):
    assert "hello from backend" in call(client)
    proc = steal(podtwin, staging, tmp_path)
    assert call(client, "/") == "from-local-app"
    assert call(client, "/?again") == "from-local-app"      # every connection, not just one
    assert podtwin_rules(staging.backend)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "hello from backend" in call(client)             # the target serves again at once
    assert podtwin_rules(staging.backend) == []


def test_port_mapping(podtwin, staging, client, tmp_path):
    proc = steal(podtwin, staging, tmp_path, body="mapped-8080", port=8080,
                 extra={"port_mapping": [[8080, 80]]})
    assert call(client) == "mapped-8080"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_the_port_follows_the_app(podtwin, staging, client, tmp_path):
    """When the app stops listening the target gets its port back, while the session goes on."""
    cfg = write_config(tmp_path / "follow.json", {"feature": {"network": {"incoming": "steal"}}})
    script = (APP_HTTPD.format(body="briefly", port=80).replace("httpd -f", "httpd")
              + " && sleep 4 && killall httpd && sleep 60")
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{staging.backend}",
                         APP_IMAGE, "sh", "-c", script)
    wait_until(lambda: "stealing port 80" in proc.err_path.read_text(), 60, "the steal")
    assert call(client) == "briefly"
    wait_until(lambda: "port 80 released" in proc.err_path.read_text(), 15, "the release")
    assert "hello from backend" in call(client)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_second_whole_port_steal_is_refused(podtwin, staging, client, tmp_path):
    first = steal(podtwin, staging, tmp_path, body="first")
    sid = json.loads(docker("inspect", session_containers("agent", first)[0]).stdout)[0]["Config"]["Labels"]["podtwin.session"]
    cfg = write_config(tmp_path / "second.json", {"feature": {"network": {"incoming": "steal"}}})
    second = podtwin.run("container", "run", "-f", str(cfg), "--target", f"container/{staging.backend}",
                         APP_IMAGE, "sh", "-c", APP_HTTPD.format(body="second", port=80), timeout=60)
    assert second.returncode != 0
    assert f"port 80 is already stolen by podtwin session {sid}" in second.stderr
    assert call(client) == "first"                            # the first session is unaffected
    first.send_signal(signal.SIGINT)
    first.wait(timeout=30)


def agent_container(runner) -> str:
    return session_containers("agent", runner)[0]


@pytest.mark.parametrize("fault", ["sigkill-agent", "delete-agent-container", "sigkill-runner"])
def test_no_dirty_rules_after_a_crash(podtwin, staging, client, tmp_path, fault):
    proc = steal(podtwin, staging, tmp_path, body=f"crash-{fault}")
    assert call(client) == f"crash-{fault}"
    if fault == "sigkill-agent":
        pid = docker("inspect", "-f", "{{.State.Pid}}", agent_container(proc)).stdout.strip()
        docker("run", "--rm", "--pid", "host", "--cap-add", "KILL", APP_IMAGE, "kill", "-9", pid)
    elif fault == "delete-agent-container":
        docker("rm", "-f", agent_container(proc))
    else:
        proc.kill()
    start = time.monotonic()
    try:
        wait_until(lambda: not podtwin_rules(staging.backend), 10, "the session's rules to go")
    except AssertionError as exc:
        guards = session_containers("rules-guard", proc)
        logs = [docker("logs", g, check=False).stderr[-2000:] for g in guards]
        raise AssertionError(f"{exc}; rules {podtwin_rules(staging.backend)}; guard logs {logs}") from exc
    wait_until(lambda: "hello from backend" in call(client), 10, "the target to serve again")
    assert time.monotonic() - start < 10
    proc.wait(timeout=30)


def test_a_mirrord_file_works_unchanged(podtwin, staging, client, tmp_path):
    """`.mirrord/mirrord.json` in the working directory, mirrord's own keys, no podtwin flags."""
    (tmp_path / ".mirrord").mkdir()
    (tmp_path / ".mirrord" / "mirrord.json").write_text(json.dumps(
        {"target": f"container/{staging.backend}", "feature": {"network": {"incoming": "steal"}}}))
    proc = podtwin.start("container", "run", APP_IMAGE, "sh", "-c",
                         APP_HTTPD.format(body="mirrord-file", port=80), cwd=tmp_path)
    wait_until(lambda: "stealing port 80" in proc.err_path.read_text() or proc.poll() is not None,
               60, "the steal")
    assert call(client) == "mirrord-file", proc.err_path.read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_mirror_is_the_default(podtwin, staging, client):
    """With no config the app gets a copy of every request while the target answers them all."""
    proc = podtwin.start("container", "run", "--target", f"container/{staging.backend}", APP_IMAGE,
                         "nc", "-ll", "-p", "80", "-e", "sh", "-c", "head -1 >&2")
    wait_until(lambda: "mirroring port 80" in proc.err_path.read_text() or proc.poll() is not None,
               60, "the mirror")
    for i in range(3):
        assert "hello from backend" in call(client, f"/copy-{i}")   # the target still answers
    wait_until(lambda: all(f"GET /copy-{i} HTTP/1.1" in proc.err_path.read_text() for i in range(3)),
               10, "the app to log a copy of each request")
    assert podtwin_rules(staging.backend) == []                      # mirroring redirects nothing
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def keepalive(staging, requests: list) -> list:
    """Requests from a service on the staging network over one kept-alive connection."""
    out = docker("run", "--rm", "--network", staging.network, "-v",
                 f"{ASSETS / 'keepalive_client.py'}:/c.py:ro", PODTWIN_IMAGE, "python3", "/c.py",
                 "backend", json.dumps(requests))
    return [body for _, body in json.loads(out.stdout)["responses"]]


def filtered_steal(podtwin, staging, tmp_path, http_filter: dict, name: str = "local"):
    cfg = write_config(tmp_path / f"filter-{name}.json", {"feature": {"network": {"incoming": {
        "mode": "steal", "http_filter": http_filter}}}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{staging.backend}",
                         "-v", f"{ASSETS / 'keepalive_app.py'}:/app.py:ro", PODTWIN_IMAGE, "python3", "/app.py",
                         name)
    wait_until(lambda: "matching the HTTP filter" in proc.err_path.read_text() or proc.poll() is not None,
               60, "the filtered steal")
    assert proc.poll() is None, proc.err_path.read_text()
    return proc


def test_http_filter_by_header_on_one_keepalive_connection(podtwin, staging, tmp_path):
    proc = filtered_steal(podtwin, staging, tmp_path, {"header_filter": "^x-podtwin-user: alice$"})
    alice, bob = {"x-podtwin-user": "alice"}, {"x-podtwin-user": "bob"}
    bodies = keepalive(staging, [["GET", "/1", alice], ["GET", "/2", bob], ["POST", "/3", alice],
                                 ["GET", "/4", {}], ["GET", "/5", alice]])
    assert bodies[0] == "local:GET /1"
    assert "hello from backend, you asked for /2" in bodies[1]
    assert bodies[2] == "local:POST /3"
    assert "you asked for /4" in bodies[3]
    assert bodies[4] == "local:GET /5"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert podtwin_rules(staging.backend) == []


def test_http_filter_by_path_or_method(podtwin, staging, tmp_path):
    proc = filtered_steal(podtwin, staging, tmp_path,
                          {"any_of": [{"path": "^/api/"}, {"method": "DELETE"}]})
    bodies = keepalive(staging, [["GET", "/api/orders", {}], ["GET", "/home", {}],
                                 ["DELETE", "/home", {}]])
    assert bodies[0] == "local:GET /api/orders"
    assert "you asked for /home" in bodies[1]
    assert bodies[2] == "local:DELETE /home"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_two_sessions_with_different_filters_share_a_port(podtwin, staging, client, tmp_path):
    alice_session = filtered_steal(podtwin, staging, tmp_path, {"header_filter": "^x-podtwin-user: alice$"}, "alice")
    bob_session = filtered_steal(podtwin, staging, tmp_path, {"header_filter": "^x-podtwin-user: bob$"}, "bob")
    alice, bob = {"x-podtwin-user": "alice"}, {"x-podtwin-user": "bob"}
    bodies = keepalive(staging, [["GET", "/1", alice], ["GET", "/2", bob], ["GET", "/3", {}],
                                 ["POST", "/4", bob], ["GET", "/5", alice]])
    assert bodies[0] == "alice:GET /1" and bodies[4] == "alice:GET /5"
    assert bodies[1] == "bob:GET /2" and bodies[3] == "bob:POST /4"
    assert "hello from backend, you asked for /3" in bodies[2]      # nobody's: the target's own

    # A whole-port steal would take both sessions' requests: refused, naming them.
    whole = podtwin.start("container", "run", "-f", str(write_config(tmp_path / "whole.json", {
        "feature": {"network": {"incoming": "steal"}}})), "--target", f"container/{staging.backend}",
        APP_IMAGE, "sh", "-c", APP_HTTPD.format(body="whole", port=80))
    assert whole.wait(timeout=60) != 0
    assert "already stolen with an HTTP filter by podtwin session" in whole.err_path.read_text()

    # The older session ends: the newer passes around it, and its requests go to the target.
    alice_session.send_signal(signal.SIGINT)
    assert alice_session.wait(timeout=30) == 130
    bodies = keepalive(staging, [["GET", "/6", alice], ["GET", "/7", bob], ["GET", "/8", {}]])
    assert "you asked for /6" in bodies[0]
    assert bodies[1] == "bob:GET /7"
    assert "you asked for /8" in bodies[2]
    bob_session.send_signal(signal.SIGINT)
    assert bob_session.wait(timeout=30) == 130
    assert "you asked for /9" in keepalive(staging, [["GET", "/9", bob]])[0]
    assert podtwin_rules(staging.backend) == []


def test_clean_removes_stale_rules_but_not_a_live_sessions(podtwin, staging, client, tmp_path):
    """Rules whose agent and guard are both gone (here: made by hand, as a crash of the whole
    engine could leave them) go with `podtwin clean --target`; a live session's stay."""
    proc = steal(podtwin, staging, tmp_path, body="still-mine")
    stale = ["-p", "tcp", "--dport", "9999", "-j", "REDIRECT", "--to-ports", "1"]
    docker("run", "--rm", "--network", f"container:{staging.backend}", "--cap-add", "NET_ADMIN", PODTWIN_IMAGE,
           "sh", "-c", "iptables -t nat -N PODTWIN_IN_deadbeef && iptables -t nat -A PODTWIN_IN_deadbeef "
           + " ".join(stale) + " && iptables -t nat -I PREROUTING -p tcp -j PODTWIN_IN_deadbeef")
    assert any("deadbeef" in rule for rule in podtwin_rules(staging.backend))
    result = podtwin.run("clean", "--target", f"container/{staging.backend}")
    assert result.returncode == 0, result.stderr
    assert f"removed the incoming rules of dead session deadbeef (in {staging.backend})" in result.stdout
    rules = podtwin_rules(staging.backend)
    assert not any("deadbeef" in rule for rule in rules)
    assert rules and call(client) == "still-mine"                 # the live session is untouched
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert podtwin_rules(staging.backend) == []

    bad = podtwin.run("clean", "--target", "deploy/api")
    assert bad.returncode != 0 and "container/NAME targets only" in bad.stderr.strip().splitlines()[-1]
