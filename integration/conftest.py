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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from podtwin.runner.config.image import agent_image_name, podtwin_image_name
from podtwin.runner.state.session import process_start

ASSETS = Path(__file__).parent / "assets"
PODTWIN_IMAGE = podtwin_image_name()   # what sessions run: podtwin:<version>, or PODTWIN_IMAGE
APP_IMAGE = "podtwin-test/busybox:latest"
TEST_LABEL = "podtwin-test"


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def docker_engine():
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("no Docker engine answers: run `make setup` first", pytrace=False)
    for image in (PODTWIN_IMAGE, agent_image_name(), APP_IMAGE):
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
        remove_created(created)


def remove_created(created: list[tuple[str, str]]) -> None:
    """Remove what a staging fixture made: ("container" | "network", name), newest first."""
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


# Podtwin's objects carry their runner's PID and start time (labels): with both, a test finds
# the objects of the runners IT started, and none of another test run's on the same engine.
RUNNER_LABELS = ('{{.Label "podtwin.runner-pid"}}', '{{.Label "podtwin.runner-start"}}')


def _runner_id(pid: int) -> tuple[str, str]:
    return str(pid), process_start(pid)


class Podtwin:
    """Runs the real `podtwin` CLI in a subprocess, with this test run's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "PODTWIN_STATE_DIR": str(state_dir)}
        self.started: list[subprocess.Popen] = []
        self.runners: set[tuple[str, str]] = set()  # (pid, start) of every runner started here

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "podtwin.runner", *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 120, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(self.cmd(*args), stdin=None if input is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **(env or {})}, cwd=cwd)
        self.runners.add(_runner_id(proc.pid))
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen:
        """A runner in the background; its output goes to files (``proc.out_path``/``err_path``)
        so a killed runner leaves no pipe to drain."""
        logs = Path(tempfile.mkdtemp(prefix="runner-", dir=self.state_dir))
        with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
            proc = subprocess.Popen(self.cmd(*args), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=cwd)
        self.runners.add(_runner_id(proc.pid))
        proc.out_path, proc.err_path = logs / "out", logs / "err"
        self.started.append(proc)
        return proc

    def objects(self) -> list[tuple[str, str]]:
        """(kind, name) of the podtwin containers, networks and volumes of the runners started here."""
        found = []
        for kind, listing in (("container", ["ps", "-a"]), ("network", ["network", "ls"]),
                              ("volume", ["volume", "ls"])):
            out = docker(*listing, "--filter", "label=podtwin.session", "--format",
                         "\t".join(("{{.Names}}" if kind == "container" else "{{.Name}}", *RUNNER_LABELS))).stdout
            for line in out.splitlines():
                name, *runner = line.split("\t")
                if tuple(runner) in self.runners:
                    found.append((kind, name))
        return found

    def leftovers(self) -> list[str]:
        """Every podtwin object of this test still present: containers, networks, session
        directories. Other test runs' sessions on the same engine are none of its business."""
        found = [name for _, name in self.objects()]
        sessions = self.state_dir / "sessions"
        if sessions.is_dir():
            found += [f"dir:{p.name}" for p in sessions.iterdir()]
        return found

    def remove_leftovers(self) -> None:
        """What `podtwin clean --all` would do, for this test's sessions only."""
        for kind, name in self.objects():
            docker(*({"container": ["rm", "-f"], "network": ["network", "rm"], "volume": ["volume", "rm", "-f"]}[kind]),
                   name, check=False)
        sessions = self.state_dir / "sessions"
        if sessions.is_dir():
            for path in sessions.iterdir():
                shutil.rmtree(path, ignore_errors=True)


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
        tool.remove_leftovers()
        pytest.fail(f"left behind after the test: {left}")


def session_containers(role: str | None = None, runner: subprocess.Popen | None = None) -> list[str]:
    """Podtwin's containers (of one role; of one runner: pass it, as other test runs may share
    the engine)."""
    filters = ["--filter", "label=podtwin.session"]
    if role:
        filters += ["--filter", f"label=podtwin.role={role}"]
    if runner is not None:
        filters += ["--filter", f"label=podtwin.runner-pid={runner.pid}"]
    return docker("ps", "-a", *filters, "--format", "{{.Names}}").stdout.split()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def podtwin_rules(target: str) -> list[str]:
    """podtwin's nat rules in the target's network namespace."""
    save = docker("run", "--rm", "--network", f"container:{target}", "--cap-add", "NET_ADMIN",
                  PODTWIN_IMAGE, "iptables-save", "-t", "nat").stdout
    return [line for line in save.splitlines() if "PODTWIN" in line]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
