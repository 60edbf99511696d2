"""`podtwin compose` with Docker targets: a real compose v2 project whose `x-podtwin` services run
as podtwin sessions next to plain local services (no cluster needed; the Kubernetes version is
integration/kube/test_compose_kube.py).

The staging (conftest): an internal network with a backend (HTTP :80, alias `backend`) and a
target container with a known environment. An engaged service reaches what its target reaches;
the project's own services stay local.
"""
from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import APP_IMAGE, ASSETS, PODTWIN_IMAGE, docker, kill, podtwin_rules, wait_until

HTTPD = "mkdir -p /w && echo {body} > /w/index.html && exec httpd -f -p {port} -h /w"


@pytest.fixture(scope="module", autouse=True)
def compose_v2():
    probe = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith("2."):
        pytest.fail("docker compose v2 is missing: run `make setup` first", pytrace=False)


@pytest.fixture
def project(tmp_path):
    """A fresh compose project name; whatever a test leaves of it is removed afterwards, and
    reported (nothing of the project may outlive `podtwin compose up` but its volumes)."""
    name = f"ptc{secrets.token_hex(3)}"
    yield name
    left = project_objects(name)
    subprocess.run(["docker", "compose", "-p", name, "down", "--volumes", "--remove-orphans", "-t", "1"],
                   capture_output=True, cwd=tmp_path)
    for volume in docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={name}").stdout.split():
        docker("volume", "rm", "-f", volume, check=False)
    assert not left, f"left behind of compose project {name}: {left}"


def project_objects(name: str) -> list[str]:
    """The project's containers and networks (its volumes are the user's and stay)."""
    label = f"label=com.docker.compose.project={name}"
    return (docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split()
            + docker("network", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split())


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_engaged_service_next_to_a_local_database(podtwin, staging, tmp_path, project):
    """`api` runs as its target: the target's env with the compose file's values winning (a `$`
    in a value intact), the target's network (the backend only it reaches, by name), while the
    local `db` is reached by its compose name; compose's exit code; nothing left after, but the
    user's named volume."""
    file = write(tmp_path / "compose.yaml", {
        "services": {
            "db": {"image": APP_IMAGE, "command": ["sh", "-c", HTTPD.format(body="local-db", port=5432)],
                   "volumes": ["dbdata:/data"]},
            "api": {"image": APP_IMAGE, "depends_on": ["db"],
                    "environment": {"APP_MODE": "local", "PRICE": "$$5"},
                    "command": ["sh", "-c", "echo APP_MODE=$$APP_MODE REGION=$$REGION PRICE=$$PRICE; "
                                "echo DB=$$(wget -qO- http://db:5432/); "
                                "echo BACKEND=$$(wget -qO- http://backend/ | head -c 18); exit 3"],
                    "x-podtwin": {"target": f"container/{staging.target}"}},
        },
        "volumes": {"dbdata": {}},
    })
    done = podtwin.run("compose", "-p", project, "-f", str(file), "up", "--exit-code-from", "api", timeout=180)
    assert done.returncode == 3, done.stderr
    assert "APP_MODE=local REGION=eu-test-1 PRICE=$5" in done.stdout   # the file's value wins; REGION: the target's
    assert "DB=local-db" in done.stdout                                # the local service, by its compose name
    assert "BACKEND=hello from backend" in done.stdout                 # the target's network
    assert project_objects(project) == []
    assert docker("volume", "ls", "-q", "--filter", f"name={project}_dbdata").stdout.strip()


def test_two_targets_steal_published_port_and_ctrl_c(podtwin, staging, tmp_path, project):
    """Two engaged services, each stealing its own target's port 80: a request to each target
    reaches the right local container. Another local service reaches `api` by name, the host
    through the port `api` publishes. Ctrl-C stops the project (130) and leaves nothing: no
    container, network or steal rule."""
    second = f"{staging.target}-web2"
    docker("run", "-d", "--name", second, "--label", "podtwin-test", "--network", staging.network,
           "--network-alias", "backend2", "-v", f"{ASSETS / 'backend.py'}:/backend.py:ro",
           PODTWIN_IMAGE, "python3", "/backend.py")
    port = 18000 + secrets.randbelow(1000)
    try:
        steal = {"feature": {"network": {"incoming": "steal"}}}
        file = write(tmp_path / "compose.yaml", {
            "services": {
                "api": {"image": APP_IMAGE, "command": ["sh", "-c", HTTPD.format(body="api-local", port=80)],
                        "ports": [f"127.0.0.1:{port}:80"],
                        "x-podtwin": {"target": f"container/{staging.backend}", **steal}},
                "worker": {"image": APP_IMAGE, "command": ["sh", "-c", HTTPD.format(body="worker-local", port=80)],
                           "x-podtwin": {"target": f"container/{second}", **steal}},
                "web": {"image": APP_IMAGE, "command": ["sleep", "3600"]},
            },
        })
        proc = podtwin.start("compose", "-p", project, "-f", str(file), "up")
        wait_until(lambda: proc.err_path.read_text().count("stealing port 80") >= 2 or proc.poll() is not None,
                   120, "both ports stolen")
        assert proc.poll() is None, proc.err_path.read_text()
        client = f"{staging.target}-cclient"
        docker("run", "-d", "--name", client, "--label", "podtwin-test", "--network", staging.network,
               APP_IMAGE, "sleep", "600")
        try:
            fetch = lambda host: docker("exec", client, "timeout", "5", "wget", "-qO-", f"http://{host}/",  # noqa: E731
                                        check=False).stdout.strip()
            assert wait_until(lambda: fetch("backend") == "api-local", 20, "backend's port served by api")
            assert fetch("backend2") == "worker-local"
        finally:
            docker("rm", "-f", client, check=False)
        by_name = docker("exec", f"{project}-web-1", "wget", "-qO-", "http://api/", check=False)
        assert by_name.stdout.strip() == "api-local", by_name.stderr
        host = subprocess.run(["wget", "-qO-", f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
        assert host.stdout.strip() == "api-local", host.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, proc.err_path.read_text()
        assert project_objects(project) == []
        assert podtwin_rules(staging.backend) == [] and podtwin_rules(second) == []
    finally:
        docker("rm", "-f", second, check=False)


def long_running(staging, tmp_path) -> Path:
    return write(tmp_path / "compose.yaml", {"services": {
        "db": {"image": APP_IMAGE, "command": ["sh", "-c", HTTPD.format(body="db", port=5432)]},
        "api": {"image": APP_IMAGE, "command": ["sh", "-c", "trap 'exit 0' TERM; while sleep 1; do :; done"],
                "x-podtwin": {"target": f"container/{staging.target}"}}}})


def test_sigkill_of_podtwin_the_guard_takes_the_project_down(podtwin, staging, tmp_path, project):
    proc = podtwin.start("compose", "-p", project, "-f", str(long_running(staging, tmp_path)), "up")
    wait_until(lambda: len(project_objects(project)) >= 4 or proc.poll() is not None, 120, "the project running")
    time.sleep(1)
    kill(proc.pid)
    proc.wait()
    wait_until(lambda: not project_objects(project), 10, "the guard to take the project down")


def test_a_dead_agent_stops_the_project_naming_the_service(podtwin, staging, tmp_path, project):
    proc = podtwin.start("compose", "-p", project, "-f", str(long_running(staging, tmp_path)), "up")
    wait_until(lambda: f"{project}-api-1" in docker("ps", "--format", "{{.Names}}").stdout or proc.poll() is not None,
               120, "api running")
    agents = docker("ps", "-q", "--filter", "label=podtwin.role=agent",
                    "--filter", f"label=podtwin.runner-pid={proc.pid}").stdout.split()
    assert len(agents) == 1
    docker("kill", agents[0])
    assert proc.wait(timeout=60) == 125
    err = proc.err_path.read_text()
    assert "service 'api': the link to its agent was lost" in err
    assert project_objects(project) == []


def test_config_prints_a_project_compose_accepts(podtwin, staging, tmp_path, project):
    file = long_running(staging, tmp_path)
    done = podtwin.run("compose", "-p", project, "-f", str(file), "config")
    assert done.returncode == 0, done.stderr
    model = yaml.safe_load(done.stdout)
    assert model["services"]["api"]["network_mode"] == "service:podtwin-api"
    assert model["services"]["podtwin-api"]["networks"]["default"]["aliases"] == ["api"]
    out = tmp_path / "generated.yaml"
    out.write_text(done.stdout)
    check = subprocess.run(["docker", "compose", "-f", str(out), "config", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert project_objects(project) == []   # config starts nothing


def test_bad_x_podtwin_is_one_line_and_nothing_starts(podtwin, staging, tmp_path, project):
    file = write(tmp_path / "compose.yaml", {"services": {
        "api": {"image": APP_IMAGE, "network_mode": "host", "x-podtwin": {"target": f"container/{staging.target}"}}}})
    done = podtwin.run("compose", "-p", project, "-f", str(file), "up")
    assert done.returncode == 125
    assert done.stderr.strip().count("\n") == 0 and "service 'api' has network_mode: host" in done.stderr
    missing = write(tmp_path / "missing.yaml", {"services": {
        "api": {"image": APP_IMAGE, "x-podtwin": {"target": "container/no-such-target-xyz"}}}})
    done = podtwin.run("compose", "-p", project, "-f", str(missing), "up")
    assert done.returncode == 125 and "service 'api': target container 'no-such-target-xyz' not found" in done.stderr
    assert project_objects(project) == []
