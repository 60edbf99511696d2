"""``podtwin compose``: a compose project whose ``x-podtwin`` services run as podtwin sessions.

One session per engaged service (``session.pipeline``'s ``plan`` and ``open_bridge``, without a
sidecar container of its own), all opened at once; then the generated project (``generate``)
is run by compose itself, attached; then ``compose down`` (the user's volumes kept) and every
session's teardown. If a session's link is lost, the project is stopped and the line names the
service. A killed podtwin is covered by each session's guard, which also takes the project down.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from podtwin.runner.compose import generate as gen
from podtwin.runner.compose.tool import Compose, ProjectArgs, find_compose, resolve
from podtwin.runner.config.loader import load_config
from podtwin.runner.env import apply_env
from podtwin.runner.errors import ConfigError, PodtwinError, SessionError
from podtwin.runner.progress import Progress
from podtwin.runner.session import pipeline
from podtwin.runner.session.app import die_with_parent
from podtwin.runner.session.teardown import Teardown
from podtwin.runner.state.session import Session, sessions_dir

if TYPE_CHECKING:
    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.config.models import PodtwinConfig

# `up` flags that take a value (to tell them from service names)
_UP_VALUE_FLAGS = {"--exit-code-from", "--scale", "-t", "--timeout", "--wait-timeout", "--pull", "--attach",
                   "--no-attach"}
_UP_REFUSED = {"-d": "detached", "--detach": "detached", "--wait": "detached (--wait)"}
# commands that would run an engaged service without its session
_NEEDS_SESSION = ("run", "create", "start", "restart", "watch", "scale")


@dataclass(frozen=True)
class ServiceOptions:
    """A compose service's session: what ``pipeline.plan`` reads of the run options (compose
    runs the app, so there is no image or command of podtwin's to check)."""

    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    network: str | None = None
    image: str = ""
    as_target_user: bool = False


@dataclass
class Service:
    name: str
    cfg: "PodtwinConfig"
    plan: pipeline.Plan | None = None
    bridge: pipeline.Bridge | None = None


def main(args: ProjectArgs, command: str, rest: tuple[str, ...], progress: Progress,
         make_engine: Callable[[], "DockerEngine"], image: str) -> int:
    compose = find_compose()
    model = resolve(compose, args)
    engaged = gen.engaged_services(model)
    if command in ("up", "config") and engaged:
        services = configure(model, engaged, args, progress)
        if command == "config":
            return print_config(model, services, rest, make_engine, image, progress)
        return up(compose, args, model, services, rest, make_engine, image, progress)
    if command in _NEEDS_SESSION and engaged:
        raise ConfigError(f"`podtwin compose {command}` is not supported with x-podtwin services yet",
                          "use `podtwin compose up` (or plain `docker compose` without the bridge)")
    return subprocess.call([*compose.argv, *args.argv(), command, *rest], cwd=args.cwd)


def configure(model: dict[str, Any], engaged: dict[str, dict[str, Any]], args: ProjectArgs,
              progress: Progress) -> list[Service]:
    """Each engaged service's podtwin config: its ``x-podtwin`` over the project's, over a config
    file or profile it names. Its filters keep the project's names and networks local."""
    names = gen.local_names(model)
    out = []
    for name, ext in engaged.items():
        why = gen.check_service(name, model["services"][name], model)
        if why:
            raise ConfigError(why, "see docs/compose.md")
        cfg = service_config(name, ext, args.directory(), progress)
        if cfg.target_spec() is None:
            raise ConfigError(f"service {name!r}: x-podtwin names no target",
                              "add `target: deploy/NAME` (or container/NAME) under its x-podtwin")
        out.append(Service(name, cfg))
    progress(f"bridging {', '.join(s.name for s in out)}; local names: {', '.join(names)}")
    return out


def service_config(name: str, ext: dict[str, Any], directory: Path, progress: Progress) -> "PodtwinConfig":
    ext = dict(ext)
    config_file = ext.pop("config", None)
    profile = ext.pop("profile", None)
    overrides: dict[str, Any] = {}
    if "target" in ext:
        overrides["target"] = ext.pop("target")
    if "namespace" in ext:
        target = overrides.get("target")
        target = {"path": target} if isinstance(target, str) else dict(target or {})
        overrides["target"] = {**target, "namespace": ext.pop("namespace")}
    if "context" in ext:
        overrides["kube_context"] = ext.pop("context")
    overrides.update(ext)
    try:
        # only the file x-podtwin names: one found in the project's directory could be anything
        # (a compose file called podtwin.yaml, another service's config)
        cfg, warnings = load_config(Path(config_file) if config_file else None, profile, directory, overrides,
                                    discover=False)
    except PodtwinError as exc:
        raise ConfigError(f"service {name!r}: {exc.message}", exc.hint) from exc
    for warning in warnings:
        progress.of(name).warn(warning)
    return cfg


def _plan(service: Service, names: tuple[str, ...], make_engine, image: str, progress: Progress) -> pipeline.Plan:
    target = service.cfg.target_spec()
    assert target is not None
    try:
        p = pipeline.plan(ServiceOptions(), service.cfg, target, make_engine, image, progress.of(service.name),
                          app=False)
    except PodtwinError as exc:
        raise type(exc)(f"service {service.name!r}: {exc.message}", exc.hint) from exc
    settings = p.settings.model_copy(update={"local_names": names, "local_subnets": True})
    return replace(p, settings=settings)


def print_config(model: dict[str, Any], services: list[Service], rest: tuple[str, ...],
                 make_engine, image: str, progress: Progress) -> int:
    """The generated project, as ``up`` runs it, without starting anything: each target is
    checked, and what only a started session knows (its id, the target's environment) is left
    out or shown as a placeholder."""
    names = tuple(gen.local_names(model))
    engaged = {}
    for service in services:
        p = _plan(service, names, make_engine, image, progress)
        engine = p.engine
        session = Session("SESSION", str(p.target), sessions_dir() / "SESSION")
        files_volume = f"{engine.volume_root()}/{session.name('fs')}/_data" if p.settings.files else None
        engaged[service.name] = _engaged(p, engine, session, files_volume, {})
    out = yaml.safe_dump(gen.generate(model, engaged), sort_keys=False, default_flow_style=False)
    header = ("# generated by podtwin compose: what `podtwin compose up` runs, with SESSION standing for each\n"
              "# session's id and without the targets' environment, which is read when the sessions start\n")
    sys.stdout.write(out if "-q" in rest or "--quiet" in rest else header + out)
    return 0


def _engaged(p: pipeline.Plan, engine: "DockerEngine", session: Session, files_volume: str | None,
             env: dict[str, str]) -> gen.Engaged:
    spec = engine.sidecar_spec(session, p.placement.sidecar_image, files_volume)
    files = []
    if p.settings.files is not None and files_volume:
        root = p.settings.files.root(files_volume)
        files = [(root + e.path, e.path, e.writable) for e in p.settings.files.exports]
    return gen.Engaged(spec, p.found.hostname, env, files, session.labels("app"),
                       float(p.cfg.agent.startup_timeout))


def up(compose: Compose, args: ProjectArgs, model: dict[str, Any], services: list[Service],
       rest: tuple[str, ...], make_engine, image: str, progress: Progress) -> int:
    for flag, what in _UP_REFUSED.items():
        if flag in rest:
            raise ConfigError(f"podtwin compose up runs attached; {flag} ({what}) is not supported yet",
                              "leave it out: the sessions last as long as `podtwin compose up` runs")
    wanted = _started_services(model, rest)
    services = [s for s in services if wanted is None or s.name in wanted]
    names = tuple(gen.local_names(model))
    for service in services:
        service.plan = _plan(service, names, make_engine, image, progress)
    engine = services[0].plan.engine if services else make_engine()
    runner = _ComposeRun(compose, model["name"], progress)
    with contextlib.ExitStack() as stack:
        teardowns = [stack.enter_context(Teardown(progress.of(s.name))) for s in services]

        def open_one(i: int) -> None:
            s = services[i]
            s.bridge = pipeline.open_bridge(
                s.plan, engine, progress.of(s.name), teardowns[i], start_sidecar=False,
                on_lost=lambda why, name=s.name: runner.fail(
                    f"service {name!r}: the link to its agent was lost: {why}"),
                on_notice=lambda level, message, name=s.name: _notice(runner, progress.of(name), name, level, message))
        with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
            list(pool.map(open_one, range(len(services))))   # the first failure is raised here
        engaged = {}
        for s in services:
            assert s.plan is not None and s.bridge is not None
            env = apply_env(s.bridge.remote.env, s.cfg.feature.env, {})
            engaged[s.name] = _engaged(s.plan, engine, s.bridge.session, s.bridge.files_volume, env)
            _stub_file_paths(engaged[s.name])
        text = yaml.safe_dump(gen.generate(model, engaged), sort_keys=False, default_flow_style=False)
        files = []
        for s in services:
            assert s.bridge is not None
            path = s.bridge.session.dir / "compose.yaml"
            path.write_text(text)
            s.bridge.session.files.compose_marker.write_text(json.dumps(
                {"argv": list(compose.argv), "project": model["name"], "file": str(path),
                 "directory": str(args.directory())}))
            files.append(path)
        stack.callback(runner.down, files[0], args.directory())   # runs before the sessions' teardowns
        stack.callback(_report_sidecars, engine, services, progress)
        progress("sessions ready; starting the project with docker compose")
        code = runner.up(files[0], args.directory(), rest)
    if runner.fatal:
        raise SessionError(runner.fatal[0], "run `podtwin compose up` again; `podtwin sessions` shows what is left")
    return code


def _report_sidecars(engine: "DockerEngine", services: list[Service], progress: Progress) -> None:
    """A sidecar that failed says why (compose does not show its output: ``attach: false``)."""
    for s in services:
        assert s.bridge is not None
        failed = engine.failed_with(s.bridge.session.name("sidecar"))
        if failed is not None:
            progress.of(s.name).warn(f"its sidecar exited with code {failed[0]}: {failed[1]}")


def _notice(runner: "_ComposeRun", progress: Progress, name: str, level: str, message: str) -> None:
    if level == "fatal":
        runner.fail(f"service {name!r}: {message}")
    elif level in ("error", "warning"):
        progress.warn(message)
    else:
        progress(message)


def _started_services(model: dict[str, Any], rest: tuple[str, ...]) -> set[str] | None:
    """The services `compose up ARGS` starts: those named and what they depend on (None: all)."""
    named, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _UP_VALUE_FLAGS
        else:
            named.append(arg)
    if not named:
        return None
    services = model.get("services") or {}
    seen: set[str] = set()
    todo = list(named)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        depends = (services.get(name) or {}).get("depends_on") or {}
        todo.extend(depends)
    return seen


def _stub_file_paths(e: gen.Engaged) -> None:
    """Docker checks a bind's source when it creates a container, and compose creates the app's
    before the sidecar has mounted the target's files over the session volume: give each path a
    placeholder there (hidden by the mount once it is made)."""
    for source, _, _ in e.files:
        try:
            Path(source).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(f"cannot prepare the session volume for the target's files ({exc.strerror})",
                               "run podtwin as root or in the docker group on the engine's host, or use --fs local")


class _ComposeRun:
    """The running ``compose up``: in a process group of its own, so Ctrl-C reaches it once,
    through podtwin (which stops it as compose's own Ctrl-C does, then takes the project down)."""

    def __init__(self, compose: Compose, project: str, progress: Progress) -> None:
        self.compose, self.project, self.progress = compose, project, progress
        self.proc: subprocess.Popen | None = None
        self.fatal: list[str] = []
        self.interrupted = False
        self.lock = threading.Lock()

    def _argv(self, file: Path, directory: Path, *command: str) -> list[str]:
        return [*self.compose.argv, "-p", self.project, "-f", str(file), "--project-directory", str(directory),
                *command]

    def fail(self, why: str) -> None:
        with self.lock:
            self.fatal.append(why)
        self.progress.warn(why + "; stopping the project")
        self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)

    def up(self, file: Path, directory: Path, rest: tuple[str, ...]) -> int:
        def on_signal(signum, frame) -> None:
            if not self.interrupted:
                self.interrupted = True
                self.stop()
            elif self.proc is not None:   # a second Ctrl-C: as compose's own, stop at once
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.proc = subprocess.Popen(self._argv(file, directory, "up", *rest), process_group=0,
                                         preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
            if self.fatal:   # a session was lost before compose started
                self.stop()
            code = self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 130 if self.interrupted else code

    def down(self, file: Path, directory: Path) -> None:
        """Remove the project's containers and networks (its volumes stay: no -v)."""
        self.progress("removing the project's containers and networks (docker compose down)")
        subprocess.run(self._argv(file, directory, "down", "--remove-orphans", "--timeout", "3"),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
