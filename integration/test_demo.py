"""`make demo` (python -m podtwin.runner.tools.demo) works end to end and leaves nothing behind."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import docker

DEMO_LABEL = "podtwin-demo"


def demo_objects() -> list[str]:
    found = docker("ps", "-a", "--filter", f"label={DEMO_LABEL}", "--format", "{{.Names}}").stdout.split()
    found += docker("network", "ls", "--filter", f"label={DEMO_LABEL}", "--format", "{{.Name}}").stdout.split()
    return found


def test_demo_runs_and_cleans_up(tmp_path):
    env = {**os.environ, "PODTWIN_STATE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "podtwin.runner.tools.demo"], capture_output=True, text=True,
                            timeout=150, env=env, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    plain, _, through_podtwin = result.stdout.partition("through podtwin")
    assert "cannot resolve orders" in plain and "APP_ENV=<not set>" in plain, output
    assert "APP_ENV=staging" in through_podtwin, output
    assert "orders service: 3 open orders" in through_podtwin, output   # TCP, by a staging-only name
    assert "orders udp echo: hello" in through_podtwin, output          # UDP
    assert "FAILED" not in result.stdout, output
    assert demo_objects() == [], "the demo left objects behind"
    session_objects = docker("ps", "-a", "--filter", "label=podtwin.target=container/podtwin-demo-api",
                             "--format", "{{.Names}}").stdout.split()
    assert session_objects == [], "the demo's podtwin session left containers behind"
    sessions = tmp_path / "sessions"
    assert not sessions.is_dir() or not any(sessions.iterdir()), list(sessions.iterdir())


def test_demo_removes_a_previous_runs_leftovers(tmp_path):
    """A demo killed before its clean-up leaves objects; the next run starts by removing them."""
    docker("rm", "-f", "podtwin-demo-api", check=False)
    docker("network", "rm", "podtwin-demo-net", check=False)
    docker("network", "create", "--internal", "--label", DEMO_LABEL, "podtwin-demo-net")
    try:
        docker("run", "-d", "--name", "podtwin-demo-api", "--label", DEMO_LABEL, "--network", "podtwin-demo-net",
               "podtwin-test/busybox:latest", "sleep", "300")
        result = subprocess.run([sys.executable, "-m", "podtwin.runner.tools.demo"], capture_output=True, text=True,
                                timeout=150, env={**os.environ, "PODTWIN_STATE_DIR": str(tmp_path)},
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert demo_objects() == []
    finally:
        docker("rm", "-f", "podtwin-demo-api", check=False)
        docker("network", "rm", "podtwin-demo-net", check=False)
