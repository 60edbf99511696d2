"""The Python API behind the CLI: ``run(RunOptions) -> exit code``, ``list_sessions``, ``clean``.

Usable without click; the CLI only parses options into these calls and turns errors into lines.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from podtwin.runner.config.loader import load_config
from podtwin.runner.config.models import PodtwinConfig
from podtwin.runner.errors import EXIT_INFRA, EXIT_INTERRUPTED, ConfigError, DockerUnavailable, PodtwinError
from podtwin.runner.session.housekeeping import clean, clean_targets, kube_for_listing, list_sessions
from podtwin.runner.progress import Progress
from podtwin.runner.targets import Target, Targetless, parse_target


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
    as_target_user: bool = False
    volumes: tuple[str, ...] = ()
    network: str | None = None
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    cwd: Path = field(default_factory=Path.cwd)
    overrides: dict = field(default_factory=dict)
    env_files: tuple[Path, ...] = ()     # docker run --env-file: below -e
    name: str | None = None              # the app container's name
    docker_args: tuple[str, ...] = ()    # more docker run flags, as container.cli_extra_args takes them
    detach: bool = False                 # docker run -d: the session runs on in the background


def resolve_config(opts: RunOptions, progress: Progress) -> tuple[PodtwinConfig, Target]:
    cfg, warnings = load_config(opts.config_file, opts.profile, opts.cwd, opts.overrides)
    if opts.docker_args:   # after the config's own: -p, -l, --cap-add, ... from the command line
        container = cfg.container.model_copy(update={"cli_extra_args": [*cfg.container.cli_extra_args,
                                                                          *opts.docker_args]})
        cfg = cfg.model_copy(update={"container": container})
    for warning in warnings:
        progress.warn(warning)
    target = parse_target(opts.target) if opts.target else cfg.target_spec()
    if target is None:   # as in mirrord: no target is a targetless session on the cluster
        kubeconfig = opts.kubeconfig or cfg.kubeconfig_path() or os.environ.get("KUBECONFIG") or "~/.kube/config"
        if not any(Path(f).expanduser().is_file() for f in kubeconfig.split(os.pathsep)):
            raise ConfigError("no target given (and no kubeconfig for a targetless session)",
                              "pass --target container/NAME or KIND/NAME, or set `target` in the config file")
        progress("no target given: a targetless session (an agent pod of its own; `--target` names one)")
        target = Targetless()
    return cfg, target


def check_config(config_file: Path | None, profile: str | None, cwd: Path,
                 target: str | None = None) -> tuple[PodtwinConfig, list[str]]:
    """Load and check the configuration exactly as a session would, touching nothing (no Docker,
    no cluster): the config, the warnings for keys podtwin does not act on."""
    from podtwin.runner.session.pipeline import derived_settings

    cfg, warnings = load_config(config_file, profile, cwd)
    if target:
        parse_target(target)
    derived_settings(cfg)
    return cfg, warnings


def run(opts: RunOptions, detached=None) -> int:
    """One session (``session.pipeline``); the app's exit code. With ``opts.detach`` the session
    goes on in a process of its own (``run_detached``) and this returns once the app runs."""
    if opts.detach:
        return run_detached(opts)
    progress = Progress(opts.quiet)
    if opts.env_files:   # as docker run: the files' values, then -e over them
        from podtwin.runner.env import read_env_file
        merged: dict[str, str] = {}
        for path in opts.env_files:
            merged.update(read_env_file(path if path.is_absolute() else opts.cwd / path))
        opts = dataclasses.replace(opts, env={**merged, **opts.env})
    cfg, target = resolve_config(opts, progress)
    from podtwin.runner.config.image import podtwin_image_name
    from podtwin.runner.session import pipeline

    return pipeline.run(opts, cfg, target, _docker_engine, podtwin_image_name(), progress, detached=detached)


_STARTED = b"\0podtwin-detached-app "


def run_detached(opts: RunOptions) -> int:
    """``docker run -d``'s contract: print the app container's id once it runs, exit 0, and leave
    it running; the session (its link, agent, rules, mounts) lives on in a child process of its
    own session (no terminal), which ends it when the app exits or on ``podtwin stop``, and whose
    guard covers it as any runner's. Start-up progress and errors come here first, then the
    child's log (``<state dir>/detached/<pid>.log``) has the rest."""
    if opts.interactive:
        raise ConfigError("-d and -i cannot go together: a detached app has no terminal to read",
                          "leave out -i, or run in the foreground")
    import signal
    import sys

    from podtwin.runner.state.session import state_dir

    logs = state_dir() / "detached"
    logs.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the session's process
        os.close(read)
        os.setsid()
        code = EXIT_INFRA
        try:
            log = os.open(logs / f"{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(log, 1)
            os.dup2(write, 2)

            def started(app_id: str) -> None:
                sys.stderr.flush()
                os.write(2, _STARTED + app_id.encode() + b"\n")
                os.dup2(log, 2)   # from now on, to the log: nobody reads the pipe
                os.close(write)

            code = run(dataclasses.replace(opts, detach=False), detached=started)
        except PodtwinError as exc:
            print(exc.one_line(), file=sys.stderr)
            code = exc.exit_code
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except BaseException:   # noqa: BLE001 - the child must never return into the parent's code
            import traceback
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            if code in (0, EXIT_INTERRUPTED):   # ended as asked: the log has nothing to tell
                (logs / f"{os.getpid()}.log").unlink(missing_ok=True)
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if line.startswith(_STARTED):
                    app_id = line[len(_STARTED):].decode().strip()
                    print(app_id, flush=True)
                    return 0
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)   # Ctrl-C before the app ran: the session is undone
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or EXIT_INFRA


def stop(ref: str, timeout: float = 60) -> str:
    """End a session (``podtwin stop``): its id, or its app container's name or id."""
    from podtwin.runner.session.housekeeping import stop_session

    return stop_session(ref, timeout)


def compose(files: tuple[str, ...], project_name: str | None, profiles: tuple[str, ...], env_files: tuple[str, ...],
            project_directory: str | None, command: str, args: tuple[str, ...], quiet: bool = False,
            cwd: Path | None = None) -> int:
    """``podtwin compose``: compose's own exit code (``compose.project``)."""
    from podtwin.runner.compose.project import main
    from podtwin.runner.compose.tool import ProjectArgs
    from podtwin.runner.config.image import podtwin_image_name

    project = ProjectArgs(files, project_name, profiles, env_files, project_directory, cwd or Path.cwd())
    return main(project, command, args, Progress(quiet), _docker_engine, podtwin_image_name())


def _docker_engine():
    """The Docker engine a session runs on; asked only once the input alone has been checked."""
    if shutil.which("docker") is None:
        raise DockerUnavailable("the `docker` command is not on PATH",
                                "install the Docker CLI (podtwin uses it to attach to the app)")
    from podtwin.runner.adapters.docker_engine import DockerEngine

    return DockerEngine()


__all__ = ["RunOptions", "run", "run_detached", "stop", "compose", "check_config", "list_sessions", "clean", "clean_targets", "kube_for_listing",
           "PodtwinError"]
