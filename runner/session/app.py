"""The app container's part of a session, the same for every kind of target: run the user's
image, unchanged, in the sidecar's network namespace with the target's environment; stop it when
the agent goes or says the session cannot go on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol

from podtwin.runner.config.models import PodtwinConfig
from podtwin.runner.env import apply_env
from podtwin.runner.errors import AppStartError, PropagationRefused, SessionError
from podtwin.runner.progress import Progress
from podtwin.runner.session.teardown import Teardown
from podtwin.runner.state.session import Session

if TYPE_CHECKING:
    from podtwin.runner.adapters.docker_engine import DockerEngine


class AppOptions(Protocol):
    """What the app container takes from the run options (``api.RunOptions`` has them)."""

    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    interactive: bool
    tty: bool
    entrypoint: str | None
    workdir: str | None
    user: str | None
    as_target_user: bool
    volumes: tuple[str, ...]
    name: str | None


class FileBind(NamedTuple):
    """One of the target's files for the app: bound from the session volume (``source``, on the
    daemon's side) at ``path``, or copied from the sidecar's mount (``in_sidecar``) where the
    engine refuses mount propagation."""
    source: str
    path: str
    writable: bool
    in_sidecar: str


SNAPSHOT_LIMIT = 64 * 1024 * 1024   # a snapshot copy is for config, secrets and tokens, not data


class App:
    """The app container's part of a session, the same for every kind of target: reacting to the
    agent (a lost link, a fatal notice such as a refused port) by stopping the app, and running it."""

    def __init__(self, engine: "DockerEngine", progress: Progress, extra: dict | None = None) -> None:
        self.engine, self.progress = engine, progress
        self.extra = extra or {}   # the app's share of container.cli_extra_args (SDK keywords)
        self.id: str | None = None
        self.fatal: list[tuple[str, str]] = []   # (why the session ended, the fix)

    def stop(self) -> None:
        if self.id:
            self.engine.stop(self.id, timeout=2)

    LINK_LOST = ("the link to the agent was lost (the agent or the target stopped)",
                 "run the session again; `podtwin sessions` shows what is still running")

    def link_lost(self, why: str) -> None:
        self.fatal.append((f"the link to the agent was lost: {why}", self.LINK_LOST[1]))
        self.stop()

    def _watch_sidecar(self, sidecar_id: str, done: threading.Event) -> None:
        """The sidecar holds the app's network bridge and its view of the target's files: if it
        stops while the app runs (its link to the agent closed: exit 1; killed, out of memory),
        the session ends rather than run on with neither."""
        code = self.engine.wait_exit(sidecar_id)
        if done.is_set():
            return
        if code == 1:
            self.fatal.append(self.LINK_LOST)
        else:
            self.fatal.append((f"the sidecar stopped ({'removed' if code is None else f'exit {code}'}): the "
                               "app's network bridge and the target's files went with it",
                               "run the session again; `podtwin doctor` checks what the sidecar needs"))
        self.stop()

    def on_notice(self, level: str, message: str) -> None:
        if level == "fatal":  # e.g. a port another session already steals: end the session
            self.fatal.append((message, "stop the other session (`podtwin sessions`), or use "
                                        "feature.network.incoming.port_mapping/ignore_ports"))
            self.stop()
        elif level in ("error", "warning"):
            self.progress.warn(f"podtwin: {message}")
        else:
            self.progress(message)

    def run(self, session: Session, opts: AppOptions, cfg: PodtwinConfig, remote_env: dict,
            sidecar_id: str, teardown: Teardown, files: list[FileBind] | None = None,
            identity: tuple[str, tuple[str, ...]] = ("", ()),
            detached: Callable[[str], None] | None = None) -> int:
        """Once the sidecar has bridged the network: create the app container and run it.
        ``identity``: the user and extra groups to run it as (``--as-target-user``). With
        ``detached``, the app is started without attaching to it, ``detached(app id)`` is told,
        and the session lasts until the app exits or this process gets SIGTERM."""
        env = apply_env(remote_env, cfg.feature.env, opts.env)

        def create(binds: list[FileBind]) -> str:
            return self.engine.create_app(
                session, opts.image, list(opts.command), env, sidecar_id, tty=opts.tty,
                interactive=opts.interactive, entrypoint=[opts.entrypoint] if opts.entrypoint else None,
                workdir=opts.workdir, user=opts.user or identity[0] or None, volumes=list(opts.volumes),
                extra=self.extra, files=[(b.source, b.path, b.writable) for b in binds], group_add=identity[1],
                name=opts.name)

        # Without the target's files nothing about the app waits for the sidecar: create it
        # meanwhile (it only joins the sidecar's namespace once started).
        early = None
        if not files:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="podtwin-app-create")
            early = pool.submit(create, [])
            pool.shutdown(wait=False)   # the one call still runs to its end
        try:
            self.engine.wait_for_line(sidecar_id, "PODTWIN_SIDECAR_READY", cfg.agent.startup_timeout, "sidecar")
        except BaseException:
            if early is not None and early.exception() is None:   # not wanted after all: undo it
                self.engine.remove(early.result())
            raise
        self.progress("network bridged; starting the app")
        if files and session.files.files_missing.exists():
            missing = set(json.loads(session.files.files_missing.read_text()))
            for path in sorted(missing):
                self.progress.warn(f"{path}: the target has no such path; not mounted")
            files = [bind for bind in files if bind.path not in missing]
        files = files or []
        copy = files if files and os.environ.get("PODTWIN_FS_COPY") == "1" else []
        if early is not None:
            app_id = early.result()
        else:
            try:
                app_id = create([] if copy else files)
            except PropagationRefused:
                copy = files
                app_id = create([])
        self.id = app_id
        teardown.add("app container", lambda: self.engine.remove(app_id))
        if copy:
            self._copy_files(copy, sidecar_id, app_id)
        attached = threading.Event()
        threading.Thread(target=self._watch_sidecar, args=(sidecar_id, attached), name="podtwin-sidecar-watch",
                         daemon=True).start()
        try:
            code = (in_background(self.engine, app_id, detached) if detached
                    else attach(self.engine, app_id, opts.interactive))
        finally:
            attached.set()
        failed = self.engine.start_failure(app_id) if code != 0 else None
        if failed is not None:
            exit_code, why = failed
            raise AppStartError(f"the app's command could not be started in {opts.image}: {_exec_reason(why)}",
                                "check the command and the image's entrypoint (--entrypoint)", exit_code)
        if self.fatal:
            raise SessionError(*self.fatal[0])
        return code


    def _copy_files(self, files: list[FileBind], sidecar_id: str, app_id: str) -> None:
        """Where the engine refuses mount propagation (Docker Desktop, rootless engines), or with
        PODTWIN_FS_COPY=1: copy the read-only exports into the app before it starts (a tar from the
        sidecar's mount), and say that they are a snapshot. Writable ones cannot be copied back."""
        copied = [b for b in files if not b.writable]
        for b in files:
            if b.writable:
                self.progress.warn(f"{b.path}: not available: a writable path needs mount propagation, which "
                                   "this engine refuses (use --fs read to get a read-only copy)")
        if not copied:
            return
        first = copied[0]
        root = first.in_sidecar[:len(first.in_sidecar) - len(first.path)] or "/"   # the sidecar's mount
        try:
            self.engine.copy_between(sidecar_id, root, [b.path.lstrip("/") for b in copied], app_id, SNAPSHOT_LIMIT)
        except SessionError as exc:
            raise SessionError(f"the target's files could not be copied into the app: {exc.message}",
                               "this engine refuses mount propagation; run with --fs local to go without them")
        self.progress.warn(f"this Docker engine refuses mount propagation: {', '.join(b.path for b in copied)} "
                           "copied into the app as a snapshot (changes in the target will not show)")


def attach(engine, app_id: str, interactive: bool) -> int:
    """Run the app in the foreground through the docker CLI, which handles TTYs, stdin and signal
    forwarding exactly as `docker run` does. Ctrl-C/SIGTERM stop the app (SIGTERM, then SIGKILL
    after 2 s: a PID 1 without handlers ignores SIGINT) and podtwin exits with 130."""
    cmd = ["docker", "start", "--attach"] + (["--interactive"] if interactive else []) + [app_id]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)
    return _until_exit(engine, app_id, proc.wait)


def in_background(engine, app_id: str, started: Callable[[str], None]) -> int:
    """Start the app unattached, say so, and wait for it to exit; SIGTERM/SIGINT (``podtwin stop``)
    stop it as in ``attach``."""
    engine.start(app_id)
    started(app_id)
    return _until_exit(engine, app_id, lambda: engine.wait_exit(app_id))


def _until_exit(engine, app_id: str, wait: Callable[[], int | None]) -> int:
    """``wait()`` for the app's exit code; the first SIGINT/SIGTERM meanwhile stops the app
    (SIGTERM, SIGKILL after 2 s), and the result is then 130."""
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=engine.stop, args=(app_id, 2), name="podtwin-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if stopping.is_set() else 125 if code is None else code


def _load_prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_prctl = _load_prctl()  # resolved before any fork: the child only makes the call


def die_with_parent() -> None:
    """In the attach child: get SIGKILL if the runner dies, so no orphaned `docker start -a`
    holds the terminal (the guard then removes the container)."""
    PR_SET_PDEATHSIG = 1
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _exec_reason(error: str) -> str:
    """The runtime's reason without its wrapping ("... exec: "x": stat x: no such file ...")."""
    _, found, rest = error.partition("exec: ")
    return (rest if found else error).removesuffix(": unknown").strip()
