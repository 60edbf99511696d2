"""`pip install podtwin` is all a user needs (issue #15): a wheel built from this tree, installed
into a fresh virtualenv outside the checkout (no source tree on the path), builds its own image
and runs a session with it against a real Docker target."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import APP_IMAGE, docker, session_containers
from podtwin.runner.config.image import agent_image_name

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_outside_the_checkout_builds_its_image_and_runs_a_session(staging, tmp_path, state_dir):
    dist, venv, home = tmp_path / "dist", tmp_path / "venv", tmp_path / "user"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("podtwin-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True,
                               text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PODTWIN_IMAGE", "VIRTUAL_ENV")}
    env["PODTWIN_STATE_DIR"] = str(state_dir)

    def podtwin(*args: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "podtwin"), *args], capture_output=True, text=True, cwd=home,
                              timeout=900, env={**env, **extra})

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import podtwin.runner; print(podtwin.runner.__file__)"],
                           capture_output=True, text=True, cwd=home, env=env).stdout
    assert where.startswith(str(venv)), where              # the wheel's copy, not the checkout's
    version = podtwin("--version")
    assert version.returncode == 0 and version.stdout.startswith("podtwin 0."), version.stderr
    tag = f"podtwin-wheeltest:{version.stdout.split()[1]}"
    completion = podtwin("completion", "bash")
    assert completion.returncode == 0 and "_PODTWIN_COMPLETE=bash_complete" in completion.stdout
    try:
        built = podtwin("images", "build", "--tag", tag)
        assert built.returncode == 0, built.stderr[-2000:]
        assert built.stdout.strip() == f"built {tag} and {agent_image_name(tag)}"
        assert "podtwin-test/busybox:latest: not built (a checkout's test image)" in built.stderr
        in_image = docker("run", "--rm", tag, "python", "-c", "import podtwin.agent; print(podtwin.agent.__file__)")
        assert in_image.stdout.strip() == "/opt/podtwin-src/podtwin/agent/__init__.py"
        in_agent = docker("run", "--rm", agent_image_name(tag), "python", "-c",
                          "import podtwin.agent.__main__, asyncssh; print(podtwin.agent.__file__)")
        assert in_agent.stdout.strip() == "/opt/podtwin-src/podtwin/agent/__init__.py"

        session = podtwin("container", "run", "-q", "--target", f"container/{staging.target}", APP_IMAGE,
                          "sh", "-c", "echo APP_MODE=$APP_MODE", PODTWIN_IMAGE=tag)
        assert session.returncode == 0, session.stderr
        assert "APP_MODE=staging" in session.stdout
        assert not session_containers(), session_containers()
    finally:
        docker("rmi", tag, agent_image_name(tag), check=False)
