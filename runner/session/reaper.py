"""The session guard: a detached process that cleans up after a runner that died without doing so.

The runner starts it at the beginning of a session. It waits for the runner's process to end
(pidfd, so no polling and no PID-reuse race), then removes every Docker object labelled with the
session and the session directory. After a normal exit the runner has already removed them, and
the guard finds nothing to do. The agent and sidecar also exit on their own when the runner's link
drops; the guard is what removes the app container, which knows nothing about podtwin.
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from podtwin.runner.errors import PodtwinError
from podtwin.runner.state.files import SessionFiles
from podtwin.runner.state.session import state_dir

log = logging.getLogger("podtwin.guard")


def spawn(session_id: str, runner_pid: int, session_dir: Path) -> subprocess.Popen:
    """Start the guard fully detached: its own session, no terminal, so Ctrl-C does not reach it."""
    log_path = state_dir() / "guard.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "podtwin.runner.session.reaper", "--session", session_id,
             "--pid", str(runner_pid), "--session-dir", str(session_dir)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            close_fds=True)


def wait_for_exit(pid: int, timeout: float | None = None) -> bool:
    """True once the process has ended; False if ``timeout`` seconds passed first."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if poller.poll(None if left is None else left * 1000):
                return True
            if left == 0.0:
                return False
    finally:
        os.close(fd)


def clean(session_id: str, session_dir: Path, attempts: int = 5) -> None:
    from podtwin.runner.adapters.docker_engine import DockerEngine

    _compose_down(session_dir)
    # beside the Docker clean-up, not after it: the agent removes its rules in the target now,
    # and a cluster that does not answer does not keep the app container running meanwhile
    kube = threading.Thread(target=_clean_kube, args=(session_id, session_dir), name="guard-kube")
    kube.start()

    for attempt in range(attempts):
        try:
            removed = DockerEngine().clean_session(session_id)
            if removed:
                log.info("session %s: removed %s", session_id, ", ".join(removed))
            break
        except PodtwinError as exc:
            log.warning("session %s: %s (attempt %d)", session_id, exc.message, attempt + 1)
            time.sleep(1 + attempt)
        except Exception as exc:  # noqa: BLE001 - the guard is the last line of defence: retry
            log.warning("session %s: %r (attempt %d)", session_id, exc, attempt + 1)
            time.sleep(1 + attempt)
    kube.join()
    shutil.rmtree(session_dir, ignore_errors=True)


def _compose_down(session_dir: Path) -> None:
    """A compose project's session: take the whole project down as ``podtwin compose up`` would
    have (containers and networks; the user's volumes stay)."""
    marker = SessionFiles(session_dir).compose_marker
    if not marker.exists():
        return
    try:
        import json

        where = json.loads(marker.read_text())
        subprocess.run([*where["argv"], "-p", where["project"], "-f", where["file"], "--project-directory",
                        where["directory"], "down", "--remove-orphans", "--timeout", "1"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        log.info("compose project %s: down", where["project"])
    except Exception as exc:  # noqa: BLE001 - best effort; the labelled containers go next anyway
        log.warning("compose project: could not take it down: %r", exc)


def _clean_kube(session_id: str, session_dir: Path) -> None:
    """A Kubernetes session's agent Job: it exits by itself once the link drops, but one that
    never started (the runner died while it was being scheduled) would stay."""
    marker = SessionFiles(session_dir).kube_marker
    if not marker.exists():
        return
    try:
        import json

        from podtwin.runner.adapters.kube import KubeEngine

        where = json.loads(marker.read_text())
        kube = KubeEngine(where.get("kubeconfig"), where.get("context"))
        for ns, name, _ in kube.session_jobs(session_id):
            kube.delete_job(ns, name)
            log.info("session %s: deleted Job %s/%s", session_id, ns, name)
        if "end" in where:
            _end_agent(kube, where["end"], SessionFiles(session_dir))
            log.info("session %s: ended its ephemeral agent", session_id)
    except Exception as exc:  # noqa: BLE001 - best effort; `podtwin clean` covers the rest
        log.warning("session %s: could not remove its agent: %r", session_id, exc)


def _end_agent(kube, end: dict, files: SessionFiles) -> None:
    """An agent nobody can delete (an ephemeral container), waiting for its runner to reconnect:
    connect as the runner would (the session's key is the proof) and end the session."""
    from types import SimpleNamespace

    from podtwin.runner.backends.base import AgentReady
    from podtwin.runner.backends.kube_streams import TRANSPORTS
    from podtwin.runner.link.client import Link, LinkKeys
    from podtwin.runner.link.loop import LoopThread

    ready = AgentReady(**end["ready"])
    # The runner's own way in: the transport serves the session's socket (the dead runner's is
    # stale) with one API-server stream per connection.
    loop, transport = LoopThread("podtwin-guard"), TRANSPORTS[end["transport"]](kube)
    try:
        transport.setup(SimpleNamespace(files=files), ready, loop)

        async def go() -> None:
            link = await Link.connect_unix(str(files.agent_socket), LinkKeys(str(files.client_key), ready.host_key),
                                           role="guard", wait=10)
            await link.end()
        loop.run(go(), timeout=30)
    finally:
        transport.restore()
        loop.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podtwin-guard")
    p.add_argument("--session", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--session-dir", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s guard %(levelname)s %(message)s")
    wait_for_exit(args.pid)
    clean(args.session, args.session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
