"""The Python API behind the CLI: ``run(RunOptions) -> exit code``.

One session, step by step; every object is recorded in a ``Teardown`` the moment it exists and
removed in reverse order however the session ends (app exit, Ctrl-C, SIGTERM, an error). A
detached guard covers the case where this process itself is killed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import asyncssh

from .config import PodtwinConfig
from .configfile import load_config
from .envfilter import apply_env
from .errors import AgentError, ConfigError, DockerUnavailable, PodtwinError, SessionError
from .link import Link, LinkKeys
from .netfilter import OutgoingFilter
from .session import Session
from .targets import DockerTarget, KubeTarget, parse_target

log = logging.getLogger("podtwin")


@dataclass(frozen=True)
class RunOptions:
    image: str
    command: tuple[str, ...] = ()
    target: str | None = None
    config_file: Path | None = None
    profile: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    interactive: bool = False
    tty: bool = False
    quiet: bool = False
    entrypoint: str | None = None
    workdir: str | None = None
    user: str | None = None
    volumes: tuple[str, ...] = ()
    network: str | None = None
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    cwd: Path = field(default_factory=Path.cwd)
    overrides: dict = field(default_factory=dict)


class Progress:
    """Slow steps say what they do and how long the session has taken so far, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"podtwin [{time.monotonic() - self.start:4.1f}s] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(message if message.startswith("podtwin") else f"podtwin: {message}", file=sys.stderr, flush=True)


class Teardown:
    """Undo steps, run in reverse order; a failing step is logged and the others still run."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self.steps.append((what, undo))

    def run(self, progress: "Progress") -> None:
        """Undo everything; one warning line names what could not be undone."""
        failures = []
        while self.steps:
            what, undo = self.steps.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                failures.append(f"{what}: {exc}")
                log.warning("teardown of %s failed: %s", what, exc)
        if failures:
            progress.warn("podtwin: clean-up was incomplete (" + "; ".join(failures) + ") — run `podtwin clean`")


class OwnerLink:
    """The runner's own connection to the agent, held on a background event loop.

    It is the agent's lifeline: when this process dies, the connection drops and the agent exits.
    """

    def __init__(self, session: Session, on_lost: Callable[[], None],
                 on_notice: Callable[[str, str], None] = lambda level, message: None) -> None:
        self.session = session
        self.on_lost = on_lost
        self.on_notice = on_notice
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="podtwin-link", daemon=True)
        self.link: Link | None = None
        self.closing = False

    def start(self) -> None:
        if not self.thread.is_alive():
            self.thread.start()

    def connect(self, host_key: str, timeout: float) -> dict:
        """Connect over the session's unix socket and fetch the target's info."""
        self.start()
        keys = LinkKeys(str(self.session.dir / "client_key"), host_key)

        async def go() -> dict:
            self.link = await Link.connect_unix(str(self.session.agent_socket), keys, role="runner")
            self.link.control.on_notice = self.on_notice
            self.loop.create_task(self._watch(), name="runner:link-watch")
            return await self.link.control.info()
        try:
            return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout)
        except (asyncssh.Error, OSError, ConnectionError, TimeoutError) as exc:
            raise AgentError(f"could not open the link to the agent ({type(exc).__name__}: {exc})",
                             "run `podtwin doctor`, or rerun with --log-level debug") from exc

    def run(self, coro, timeout: float = 30):
        """Run a coroutine on the link's event loop (e.g. serving the session's socket)."""
        self.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _watch(self) -> None:
        assert self.link is not None
        await self.link.wait_closed()
        if not self.closing:
            self.on_lost()

    def close(self) -> None:
        self.closing = True
        if self.link is not None:
            self.loop.call_soon_threadsafe(self.link.close)
            time.sleep(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def sidecar_settings(cfg: PodtwinConfig) -> dict:
    out = cfg.feature.network.outgoing
    rules = OutgoingFilter.from_config(out).kernel_rules()
    return {
        "tcp": out.tcp,
        "udp": out.udp,
        "dns": cfg.feature.network.dns.enabled,
        "local_cidrs": [list(r) for r in rules.keep_local],
        "remote_cidrs": None if rules.redirect_only is None else [list(r) for r in rules.redirect_only],
        "proxy_decides": rules.proxy_decides,
        "outgoing": out.model_dump(mode="json"),
        "dns_config": cfg.feature.network.dns.model_dump(mode="json"),
    }


def incoming_settings(cfg: PodtwinConfig, progress: Progress) -> dict | None:
    """What the sidecar takes of the target's incoming traffic, or None."""
    inc = cfg.feature.network.incoming
    if inc.mode == "off":
        return None
    http_filter = None
    if inc.http_filter is not None:
        if inc.mode != "steal":
            raise ConfigError("feature.network.incoming.http_filter works with mode steal only",
                              "set feature.network.incoming.mode to steal, or remove the filter")
        http_filter = inc.http_filter.model_dump(mode="json", exclude_none=True)
    return {"mode": inc.mode, "ports": inc.ports, "ignore_ports": inc.ignore_ports,
            "port_mapping": [list(pair) for pair in inc.port_mapping], "http_filter": http_filter}


def resolve_config(opts: RunOptions, progress: Progress) -> tuple[PodtwinConfig, DockerTarget]:
    cfg, warnings = load_config(opts.config_file, opts.profile, opts.cwd, opts.overrides)
    for warning in warnings:
        progress.warn(warning)
    target = parse_target(opts.target) if opts.target else cfg.target_spec()
    if target is None:
        raise ConfigError("no target given",
                          "pass --target container/NAME, or set `target` in the config file")
    return cfg, target


def run(opts: RunOptions) -> int:
    from .adapters.docker_engine import DockerEngine
    from .adapters.images import podtwin_image_name

    progress = Progress(opts.quiet)
    cfg, target = resolve_config(opts, progress)
    if shutil.which("docker") is None:
        raise DockerUnavailable("the `docker` command is not on PATH",
                                "install the Docker CLI (podtwin uses it to attach to the app)")
    engine = DockerEngine()
    if isinstance(target, KubeTarget):
        return run_kube(opts, cfg, target, progress, engine)
    image = cfg.agent.image or podtwin_image_name()
    engine.require_image(image, "build it with `podtwin images build`")
    engine.require_image(opts.image, f"build or pull it first (`docker pull {opts.image}`)")
    info = engine.get_target(target.name)
    if opts.network:
        engine.require_network(opts.network)

    session = Session.create(str(target))
    teardown = Teardown()
    teardown.add("session directory", session.remove_dir)
    app = App(engine, progress)
    try:
        from .guard import spawn as spawn_guard
        spawn_guard(session.id, session.runner_pid, session.dir)
        session.write_keys()

        incoming = incoming_settings(cfg, progress)
        if incoming is not None and incoming["mode"] == "steal":
            # Started first so it is removed last: it removes the session's incoming rules from
            # the target's namespace once the agent is gone, however the agent went.
            guard_id = engine.start_rules_guard(session, info, image, cfg.agent.startup_timeout)
            teardown.add("rules guard", lambda: engine.remove_when_exited(guard_id, 5))
        progress(f"session {session.id}: starting the agent in {target}'s namespaces, and the sidecar")
        agent_id = engine.start_agent(session, info, image, cfg.agent.startup_timeout,
                                      cfg.agent.communication_timeout,
                                      incoming=incoming["mode"] if incoming else None)
        # After the link closes the agent removes its rules and exits; give it that moment.
        teardown.add("agent container", lambda: engine.remove_when_exited(agent_id, 3))
        # The sidecar needs nothing from the agent to start (the runner made the agent's host
        # key): start it now, it connects as soon as the agent listens.
        settings = {**sidecar_settings(cfg), "connect_timeout": cfg.agent.startup_timeout,
                    "incoming": incoming}
        (session.dir / "sidecar.json").write_text(json.dumps(settings))
        sidecar_id = engine.start_sidecar(session, image, info.hostname, opts.network)
        teardown.add("sidecar container", lambda: engine.remove(sidecar_id))

        ready = json.loads(engine.wait_for_line(agent_id, "PODTWIN_AGENT_READY ",
                                                cfg.agent.startup_timeout, "agent"))
        host_key = (session.dir / "agent_host_key.pub").read_text().split()[:2]
        if ready["host_key"].split()[:2] != host_key:
            raise AgentError("the agent announced a host key that is not this session's",
                             "make sure nothing else writes to the session directory")

        owner = OwnerLink(session, app.link_lost, on_notice=app.on_notice)
        teardown.add("link", owner.close)
        remote = owner.connect(" ".join(host_key), cfg.agent.startup_timeout)
        progress(f"agent ready; target process {remote['pid']} has {len(remote['env'])} environment variables")
        return app.run(session, opts, cfg, remote["env"], sidecar_id, teardown)
    finally:
        teardown.run(progress)


class App:
    """The app container's part of a session, the same for every kind of target: reacting to the
    agent (a lost link, a fatal notice such as a refused port) by stopping the app, and running it."""

    def __init__(self, engine, progress: Progress) -> None:
        self.engine, self.progress = engine, progress
        self.id: str | None = None
        self.fatal: list[str] = []

    def stop(self) -> None:
        if self.id:
            self.engine.stop(self.id, timeout=2)

    def link_lost(self) -> None:
        self.progress.warn("podtwin: the link to the agent was lost (the agent or the target stopped);"
                           " stopping the app")
        self.stop()

    def on_notice(self, level: str, message: str) -> None:
        if level == "fatal":  # e.g. a port another session already steals: end the session
            self.fatal.append(message)
            self.stop()
        elif level in ("error", "warning"):
            self.progress.warn(f"podtwin: {message}")
        else:
            self.progress(message)

    def run(self, session: Session, opts: RunOptions, cfg: PodtwinConfig, remote_env: dict,
            sidecar_id: str, teardown: Teardown) -> int:
        """Once the sidecar has bridged the network: create the app container and run it."""
        self.engine.wait_for_line(sidecar_id, "PODTWIN_SIDECAR_READY", cfg.agent.startup_timeout, "sidecar")
        self.progress("network bridged; starting the app")
        env = apply_env(remote_env, cfg.feature.env, opts.env)
        app_id = self.engine.create_app(
            session, opts.image, list(opts.command), env, sidecar_id, tty=opts.tty,
            interactive=opts.interactive, entrypoint=[opts.entrypoint] if opts.entrypoint else None,
            workdir=opts.workdir, user=opts.user, volumes=list(opts.volumes))
        self.id = app_id
        teardown.add("app container", lambda: self.engine.remove(app_id))
        code = attach(self.engine, app_id, opts.interactive)
        if self.fatal:
            raise SessionError(self.fatal[0], "stop the other session (`podtwin sessions`), or use "
                               "feature.network.incoming.port_mapping/ignore_ports")
        return code


def run_kube(opts: RunOptions, cfg: PodtwinConfig, target: KubeTarget, progress: Progress, engine) -> int:
    """A session whose agent is a Job next to the target pod, or an ephemeral container in it
    (see kube_session)."""
    from .adapters.images import podtwin_image_name
    from .adapters.kube import AGENT_PORT, KubeEngine
    from .kube_session import TRANSPORT_HINTS, transport_for, write_kube_marker

    sidecar_image = podtwin_image_name()
    engine.require_image(sidecar_image, "build it with `podtwin images build`")
    engine.require_image(opts.image, f"build or pull it first (`docker pull {opts.image}`)")
    context = opts.context or cfg.kube_context
    progress(f"resolving {target}")
    kube = KubeEngine(opts.kubeconfig, context)
    pod = kube.resolve(target, opts.namespace or cfg.target.namespace)
    progress(f"target: pod {pod.namespace}/{pod.pod}, container {pod.container}, node {pod.node}")
    incoming = incoming_settings(cfg, progress)
    if pod.mesh:
        progress.warn(f"podtwin: the target pod runs a service-mesh proxy ({pod.mesh}): outgoing traffic "
                      "goes through it as the pod's own does" + (
                          "; incoming traffic from meshed clients is mTLS, which podtwin cannot read "
                          "(steal and mirror serve plaintext clients only; see docs/kubernetes.md)"
                          if incoming else ""))

    session = Session.create(str(target))
    teardown = Teardown()
    teardown.add("session directory", session.remove_dir)
    app = App(engine, progress)
    try:
        from .guard import spawn as spawn_guard
        write_kube_marker(session, opts.kubeconfig, context)
        spawn_guard(session.id, session.runner_pid, session.dir)
        session.write_keys()
        public_key = (session.dir / "client_key.pub").read_text().strip()
        image = cfg.agent.image or sidecar_image
        if cfg.agent.ephemeral:
            # Kubernetes cannot remove an ephemeral container: this one exits when the link
            # closes (or if nobody connects within agent.startup_timeout) and stays in the pod's
            # spec as a terminated container.
            progress(f"session {session.id}: adding the agent to pod {pod.pod} as an ephemeral container")
            ns, agent_pod = pod.namespace, pod.pod
            container = kube.start_ephemeral_agent(session, pod, image, cfg.agent, public_key,
                                                   incoming["mode"] if incoming else None)
            guard = session.name("rules-guard") if incoming and incoming["mode"] == "steal" else None
            ready = json.loads(kube.wait_ephemeral_agent(ns, agent_pod, container, cfg.agent.startup_timeout,
                                                         progress, guard=guard))
        else:
            progress(f"session {session.id}: creating the agent Job on node {pod.node}")
            ns, job = kube.start_agent(session, pod, image, cfg.agent, public_key,
                                       incoming["mode"] if incoming else None)
            teardown.add("agent job", lambda: kube.delete_job(ns, job))
            agent_pod, line = kube.wait_agent(ns, job, cfg.agent.startup_timeout, progress)
            ready, container = json.loads(line), "agent"
        host_key = ready["host_key"]
        (session.dir / "agent_host_key.pub").write_text(host_key + "\n")

        transport = transport_for(kube, cfg.agent.transport, ns, agent_pod, container, ready, AGENT_PORT)
        teardown.add(f"{transport.what} streams", transport.close)

        owner = OwnerLink(session, app.link_lost, on_notice=app.on_notice)
        teardown.add("link", owner.close)
        # The session's unix socket, served here over API server streams: the owner link and the
        # sidecar connect to it exactly as they do to a Docker agent's own socket.
        owner.run(transport.serve(str(session.agent_socket)))
        try:
            remote = owner.connect(host_key, cfg.agent.startup_timeout)
        except AgentError as exc:
            if isinstance(transport.last_error, PodtwinError):  # e.g. port-forward forbidden
                raise AgentError(f"{transport.what} to the agent failed: {transport.last_error.message}",
                                 TRANSPORT_HINTS[transport.what]) from exc
            failure = transport.failure()   # e.g. the exec'd relay could not reach the agent
            if failure:
                raise AgentError(f"{transport.what} to the agent failed: {failure}",
                                 TRANSPORT_HINTS[transport.what]) from exc
            raise
        progress(f"agent ready; target process {remote['pid']} has {len(remote['env'])} environment variables")

        settings = {**sidecar_settings(cfg), "connect_timeout": cfg.agent.startup_timeout, "incoming": incoming}
        (session.dir / "sidecar.json").write_text(json.dumps(settings))
        sidecar_id = engine.start_sidecar(session, sidecar_image, remote.get("hostname") or pod.pod, opts.network)
        teardown.add("sidecar container", lambda: engine.remove(sidecar_id))
        return app.run(session, opts, cfg, remote["env"], sidecar_id, teardown)
    finally:
        teardown.run(progress)


def attach(engine, app_id: str, interactive: bool) -> int:
    """Run the app in the foreground through the docker CLI, which handles TTYs, stdin and signal
    forwarding exactly as `docker run` does. Ctrl-C/SIGTERM stop the app (SIGTERM, then SIGKILL
    after 2 s: a PID 1 without handlers ignores SIGINT) and podtwin exits with 130."""
    cmd = ["docker", "start", "--attach"] + (["--interactive"] if interactive else []) + [app_id]
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=engine.stop, args=(app_id, 2), name="podtwin-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if stopping.is_set() else code


def _load_prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_prctl = _load_prctl()  # resolved before any fork: the child only makes the call


def _die_with_parent() -> None:
    """In the attach child: get SIGKILL if the runner dies, so no orphaned `docker start -a`
    holds the terminal (the guard then removes the container)."""
    PR_SET_PDEATHSIG = 1
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def kube_for_listing(kubeconfig: str | None = None, context: str | None = None):
    """(the cluster, None) when a kubeconfig is usable and its cluster answers within seconds,
    else (None, why): `sessions` and `clean` then cover the Docker engine only, and say so."""
    from .adapters.kube import KubeEngine

    try:
        return KubeEngine(kubeconfig, context, probe_timeout=3), None
    except PodtwinError as exc:
        return None, exc.message


def list_sessions(kube=None) -> list[dict]:
    """Sessions by their labelled objects: Docker containers and networks, and (given a cluster)
    agent Jobs in every namespace we may list."""
    from .adapters.docker_engine import DockerEngine
    from .session import LABEL_ROLE, LABEL_SESSION, LABEL_TARGET, runner_alive

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


def clean(all_sessions: bool = False, kube=None, targets: tuple[str, ...] = ()) -> list[str]:
    """Remove what sessions whose runner is gone left behind (with all=True, every session of this
    machine's): containers, networks and session directories; agent Jobs given a cluster; and
    dead sessions' incoming rules in the namespaces of their Docker targets (and of ``targets``).
    Every step is tried; what failed is raised together at the end."""
    import socket

    from .adapters.docker_engine import DockerEngine
    from .adapters.images import podtwin_image_name
    from .session import LABEL_HOST, dir_owner_alive, sessions_dir
    from .targets import DockerTarget, parse_target

    engine = DockerEngine()
    removed: list[str] = []
    errors: list[str] = []
    live = set()
    sweep = {t.name for t in map(parse_target, targets) if isinstance(t, DockerTarget)}
    if len(sweep) != len(set(targets)):
        raise SessionError("clean --target takes container/NAME targets only",
                           "a Kubernetes target's rules go with its agent pod (its rules guard)")
    if sweep:
        engine.require_image(podtwin_image_name(), "build it with `podtwin images build`")

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
            attempt(f"rules in {name}", lambda name=name: engine.sweep_rules(name, podtwin_image_name()))
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


__all__ = ["RunOptions", "run", "list_sessions", "clean", "PodtwinError"]
