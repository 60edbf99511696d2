"""End-to-end fixtures: a real Docker engine, a small 'staging' of real containers, the real CLI.

The staging: an internal Docker network (no route out), a backend on it (HTTP :80, UDP echo
:9000) and a target container on it with a known environment and an /etc/hosts entry. The app is
an unchanged static image (busybox plus a static Go UDP client), run through `podtwin`.
Every object the fixtures create is labelled ``podtwin-test`` and removed afterwards.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
PODTWIN_IMAGE = os.environ.get("PODTWIN_IMAGE") or "podtwin:dev"
APP_IMAGE = "podtwin-test/busybox:latest"
TEST_LABEL = "podtwin-test"


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def docker_engine():
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("no Docker engine answers: run `make setup` first", pytrace=False)
    for image in (PODTWIN_IMAGE, APP_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is missing: run `make setup` first", pytrace=False)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    """podtwin's state (session directories, guard log) for this test run only."""
    return tmp_path_factory.mktemp("podtwin-state")


@dataclass
class Staging:
    network: str
    backend: str
    backend_ip: str
    target: str
    target_env: dict


@pytest.fixture(scope="module")
def staging() -> Staging:
    tag = secrets.token_hex(3)
    network, backend, target = f"pt-net-{tag}", f"pt-backend-{tag}", f"pt-target-{tag}"
    created: list[tuple[str, str]] = []
    try:
        docker("network", "create", "--internal", "--label", TEST_LABEL, network)
        created.append(("network", network))
        docker("run", "-d", "--name", backend, "--label", TEST_LABEL, "--network", network,
               "--network-alias", "backend", "-v", f"{ASSETS / 'backend.py'}:/backend.py:ro",
               PODTWIN_IMAGE, "python3", "/backend.py")
        created.append(("container", backend))
        backend_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                            backend).stdout.strip()
        env = {"APP_MODE": "staging", "DB_PASSWORD": "hunter2", "FEATURE_X": "on",
               "FEATURE_Y": "off", "REGION": "eu-test-1"}
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        docker("run", "-d", "--name", target, "--label", TEST_LABEL, "--network", network,
               "--add-host", f"hosts-only.example:{backend_ip}", *env_args,
               PODTWIN_IMAGE, "sleep", "infinity")
        created.append(("container", target))
        wait_until(lambda: _http_ready(target), 20, "backend answering")
        yield Staging(network, backend, backend_ip, target, env)
    finally:
        for kind, name in reversed(created):
            if kind == "container":
                docker("rm", "-f", name, check=False)
            else:
                docker("network", "rm", name, check=False)


def _http_ready(target: str) -> bool:
    probe = docker("exec", target, "python3", "-c",
                   "import urllib.request;urllib.request.urlopen('http://backend/',timeout=1)", check=False)
    return probe.returncode == 0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Podtwin:
    """Runs the real `podtwin` CLI in a subprocess, with this test run's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "PODTWIN_STATE_DIR": str(state_dir)}
        self.started: list[subprocess.Popen] = []

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "podtwin.runner", *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 120, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), input=input, capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **(env or {})}, cwd=cwd)

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen:
        """A runner in the background; its output goes to files (``proc.out_path``/``err_path``)
        so a killed runner leaves no pipe to drain."""
        logs = Path(tempfile.mkdtemp(prefix="runner-", dir=self.state_dir))
        with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
            proc = subprocess.Popen(self.cmd(*args), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=cwd)
        proc.out_path, proc.err_path = logs / "out", logs / "err"
        self.started.append(proc)
        return proc

    def leftovers(self) -> list[str]:
        """Every podtwin object still present: containers, networks, session directories."""
        found = docker("ps", "-a", "--filter", "label=podtwin.session", "--format", "{{.Names}}").stdout.split()
        found += docker("network", "ls", "--filter", "label=podtwin.session", "--format", "{{.Name}}").stdout.split()
        sessions = self.state_dir / "sessions"
        if sessions.is_dir():
            found += [f"dir:{p.name}" for p in sessions.iterdir()]
        return found


@pytest.fixture
def podtwin(state_dir: Path) -> Podtwin:
    tool = Podtwin(state_dir)
    yield tool
    for proc in tool.started:  # a test that failed half-way may leave its runner running
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    # every test must leave nothing behind; the guard may need a moment after a kill
    left = []
    try:
        wait_until(lambda: not tool.leftovers(), 15, "podtwin objects to disappear")
    except AssertionError:
        left = tool.leftovers()
    if left:
        subprocess.run(tool.cmd("clean", "--all"), env=tool.env, capture_output=True)
        pytest.fail(f"left behind after the test: {left}")


def session_containers(role: str | None = None) -> list[str]:
    filters = ["--filter", "label=podtwin.session"]
    if role:
        filters += ["--filter", f"label=podtwin.role={role}"]
    return docker("ps", "-a", *filters, "--format", "{{.Names}}").stdout.split()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
