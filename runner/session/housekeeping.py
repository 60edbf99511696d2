"""Sessions after the fact: list them by the labels on what they made (containers, networks,
agent Jobs), and remove what the dead ones left behind."""
from __future__ import annotations

import shutil
import socket
from typing import Callable

from podtwin.runner.errors import ConfigError, PodtwinError, SessionError
from podtwin.runner.state.session import (LABEL_HOST, LABEL_ROLE, LABEL_SESSION, LABEL_TARGET,
                                          dir_owner_alive, runner_alive, sessions_dir)
from podtwin.runner.targets import DockerTarget, parse_target


def kube_for_listing(kubeconfig: str | None = None, context: str | None = None):
    """(the cluster, None) when a kubeconfig is usable and its cluster answers within seconds,
    else (None, why): `sessions` and `clean` then cover the Docker engine only, and say so."""
    from podtwin.runner.adapters.kube import KubeEngine

    try:
        return KubeEngine(kubeconfig, context, probe_timeout=3), None
    except PodtwinError as exc:
        return None, exc.message


def list_sessions(kube=None) -> list[dict]:
    """Sessions by their labelled objects: Docker containers and networks, and (given a cluster)
    agent Jobs in every namespace we may list."""
    from podtwin.runner.adapters.docker_engine import DockerEngine

    sessions: dict[str, dict] = {}

    def entry(labels: dict) -> dict:
        sid = labels.get(LABEL_SESSION, "?")
        return sessions.setdefault(sid, {"session": sid, "target": labels.get(LABEL_TARGET, ""),
                                         "alive": runner_alive(labels), "objects": [], "jobs": []})

    for obj in DockerEngine().session_objects():
        entry(obj.labels)["objects"].append(f"{obj.labels.get(LABEL_ROLE, obj.kind)}:{obj.name}")
    if kube is not None:
        for ns, name, labels in kube.session_jobs():
            found = entry(labels)
            found["objects"].append(f"agent-job:{ns}/{name}")
            found["jobs"].append((ns, name, labels))
            if "/" not in found["target"]:  # Kubernetes label values hold no '/': it became '_'
                found["target"] = found["target"].replace("_", "/")
    return sorted(sessions.values(), key=lambda s: s["session"])


def clean_targets(targets: tuple[str, ...]) -> set[str]:
    """The Docker containers ``clean --target`` sweeps; anything else is refused in one line."""
    sweep = {t.name for t in map(parse_target, targets) if isinstance(t, DockerTarget)}
    if len(sweep) != len(set(targets)):
        raise ConfigError("clean --target takes container/NAME targets only",
                          "a Kubernetes target's rules go with its agent pod (its rules guard)")
    return sweep


def clean(all_sessions: bool = False, kube=None, targets: tuple[str, ...] = ()) -> list[str]:
    """Remove what sessions whose runner is gone left behind (with all=True, every session of this
    machine's): containers, networks and session directories; agent Jobs given a cluster; and
    dead sessions' incoming rules in the namespaces of their Docker targets (and of ``targets``).
    Every step is tried; what failed is raised together at the end."""
    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.config.image import agent_image_name

    sweep = clean_targets(targets)
    engine = DockerEngine()
    removed: list[str] = []
    errors: list[str] = []
    live = set()
    if sweep:
        engine.require_image(agent_image_name(), "build it with `podtwin images build`")

    def attempt(what: str, step: Callable[[], list[str] | None]) -> None:
        try:
            removed.extend(step() or [])
        except Exception as exc:  # noqa: BLE001 - one failure must not keep the rest
            errors.append(f"{what}: {getattr(exc, 'message', None) or exc}")

    def delete_job(ns: str, name: str) -> list[str]:
        kube.delete_job(ns, name)
        return [f"agent Job {ns}/{name}"]

    host = socket.gethostname()
    for entry in list_sessions(kube):
        if entry["alive"] and not all_sessions:
            live.add(entry["session"])
            continue
        if entry["target"].startswith("container/"):
            sweep.add(entry["target"].split("/", 1)[1])
        attempt(f"session {entry['session']}", lambda sid=entry["session"]: engine.clean_session(sid))
        for ns, name, labels in entry["jobs"]:
            if labels.get(LABEL_HOST) != host:   # another machine's session: never ours to end
                continue
            attempt(f"agent Job {ns}/{name}", lambda ns=ns, name=name: delete_job(ns, name))
    for name in sorted(sweep):
        if engine.is_running(name):
            attempt(f"rules in {name}", lambda name=name: engine.sweep_rules(name, agent_image_name()))
        elif any(t.endswith("/" + name) for t in targets):
            errors.append(f"container {name!r} is not running (its rules went with its network namespace)")
    root = sessions_dir()
    if root.is_dir():
        for path in root.iterdir():
            if path.name not in live and (all_sessions or not dir_owner_alive(path)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"session directory {path.name}")
    if errors:
        raise SessionError("clean-up was incomplete: " + "; ".join(errors) + (
            " (removed: " + ", ".join(removed) + ")" if removed else ""), "fix the cause and run `podtwin clean` again")
    return removed


def stop_session(ref: str, timeout: float = 60) -> str:
    """End a running session as Ctrl-C would (``podtwin stop``): ``ref`` is its id, or the name
    or id of one of its containers (the app's, as ``docker run -d`` printed it). Waits until its
    runner has removed everything; returns the session's id."""
    import os
    import signal

    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.session.reaper import wait_for_exit
    from podtwin.runner.state.session import LABEL_RUNNER_PID

    ref = ref.strip()
    if not ref:
        raise ConfigError("no session named", "give a session's id (`podtwin sessions`), or its app container's name")
    matches: dict[str, dict] = {}
    for obj in DockerEngine().session_objects():
        sid = obj.labels.get(LABEL_SESSION, "")
        if (ref == sid or ref == obj.name
                    or (obj.kind == "container" and len(ref) >= 6 and obj.id.startswith(ref))):
            matches[sid] = obj.labels
    if not matches:
        raise ConfigError(f"no podtwin session {ref!r} on this machine",
                          "`podtwin sessions` lists them (a session's id, or its app container's name or id)")
    if len(matches) > 1:
        raise ConfigError(f"{ref!r} names several sessions ({', '.join(sorted(matches))})", "give a session's id")
    sid, labels = next(iter(matches.items()))
    if labels.get(LABEL_HOST) != socket.gethostname():
        raise SessionError(f"session {sid} runs on {labels.get(LABEL_HOST)}, not here", "stop it there")
    if not runner_alive(labels):
        raise SessionError(f"session {sid}'s runner is gone", "`podtwin clean` removes what it left")
    pid = int(labels[LABEL_RUNNER_PID])
    os.kill(pid, signal.SIGTERM)
    if not wait_for_exit(pid, timeout):
        raise SessionError(f"session {sid} did not end within {timeout:.0f}s",
                           "`podtwin sessions` shows it; `podtwin clean --all` removes it")
    return sid
