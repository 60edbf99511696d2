"""One session, top to bottom, the same for every target: resolve the target, start the agent,
start the sidecar, open the link, start the app, tear everything down.

``plan`` checks everything that can be refused before anything exists; ``open_bridge`` makes the
session (agent, sidecar, link) and records how to undo each step; ``run`` adds the app. A compose
project of several sessions (issue 12) is one ``plan`` and ``open_bridge`` per engaged service in
one teardown, with compose running the services where ``run`` runs the app.

What differs between a Docker and a Kubernetes target is the pair of backends (``backends``):
where the agent runs and how the session's socket reaches it. Every step that makes something
records how to undo it first (``Teardown``); a detached reaper removes what is left if this
process itself is killed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from podtwin.agent.link import wire
from podtwin.runner import backends
from podtwin.runner.backends.base import Placement, Resolved, Transport
from podtwin.runner.config.docker_args import ExtraRunArgs, parse_extra_args
from podtwin.runner.env import check_sizes, read_env_file
from podtwin.runner.errors import AgentError, ConfigError
from podtwin.runner.link.loop import LoopThread
from podtwin.runner.link.owner import OwnerLink
from podtwin.runner.session import reaper
from podtwin.runner.session.app import App, AppOptions, FileBind
from podtwin.runner.progress import Progress
from podtwin.runner.session.teardown import Teardown
from podtwin.runner.sidecar.settings import FilesSettings, SidecarSettings
from podtwin.runner.state.session import Session, check_state_dir

from podtwin.runner.adapters.docker_engine import FILES_MOUNT

if TYPE_CHECKING:
    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.config.models import PodtwinConfig
    from podtwin.runner.targets import Target


class SessionOptions(AppOptions):
    """What a session takes from the run options (``api.RunOptions`` has them)."""

    network: str | None
    namespace: str | None
    kubeconfig: str | None
    context: str | None


@dataclass(frozen=True)
class Plan:
    """A session checked and ready to start: nothing exists yet."""

    opts: SessionOptions
    cfg: "PodtwinConfig"
    target: "Target"
    placement: Placement
    transport: Transport
    found: Resolved
    settings: SidecarSettings
    extra: ExtraRunArgs
    engine: "DockerEngine"


@dataclass(frozen=True)
class Bridge:
    """A session whose network is bridged: the app (or several, in a compose project) runs in
    the sidecar's network namespace with the target's environment."""

    session: Session
    sidecar_id: str
    remote: wire.Info   # the target's info: env, pid, hostname, resolver files
    files: list[FileBind]   # the target's files
    files_volume: str | None   # where the sidecar mounts them (the daemon's path), if it does


def run(opts: SessionOptions, cfg: "PodtwinConfig", target: "Target", make_engine: Callable[[], "DockerEngine"],
        image: str, progress: Progress, detached: Callable[[str], None] | None = None) -> int:
    """One ``podtwin container run``: plan, bridge, run the app, tear down. ``image``: the local
    podtwin image (the sidecar's; a Docker target's agent runs the agent image built beside it
    unless agent.image says); ``make_engine``: the Docker
    engine, asked once the input alone has been checked; ``detached``: the app runs unattached
    (``App.run``)."""
    p = plan(opts, cfg, target, make_engine, image, progress)
    engine = p.engine
    app = App(engine, progress, p.extra.app)
    with Teardown(progress) as teardown:
        bridge = open_bridge(p, engine, progress, teardown, on_lost=app.link_lost, on_notice=app.on_notice)
        return app.run(bridge.session, opts, cfg, bridge.remote.env, bridge.sidecar_id, teardown, bridge.files,
                       identity=target_identity(opts, p.found, progress), detached=detached)


def target_identity(opts: SessionOptions, found: Resolved, progress: Progress) -> tuple[str, tuple[str, ...]]:
    """The user and groups the app runs as with --as-target-user (nothing without it)."""
    if not opts.as_target_user:
        return "", ()
    if not found.user and not found.groups:
        progress.warn(f"{found.description} names no user or groups (runAsUser, fsGroup, --user): "
                      "the app runs as its image's user")
        return "", ()
    progress("the app runs as the target's user" + (f" {found.user}" if found.user else " (the image's)")
             + (f", with groups {', '.join(found.groups)}" if found.groups else ""))
    return found.user, found.groups


def plan(opts: SessionOptions, cfg: "PodtwinConfig", target: "Target", make_engine: Callable[[], "DockerEngine"],
         image: str, progress: Progress, app: bool = True) -> Plan:
    """Everything that can be refused before anything is made: first what the input alone can
    refuse (options, derived settings, the state directory), then, asking the Docker engine
    ``make_engine`` gives, the backends, the images, the target. ``app``: the session runs an app
    container of its own (``opts`` name its image); in a compose project compose runs it."""
    if app:
        check_options(opts)
    settings, extra = derived_settings(cfg)
    check_state_dir()
    engine = make_engine()
    placement, transport = backends.for_target(
        target, cfg, image, engine, namespace=opts.namespace or cfg.target.namespace,
        kubeconfig=opts.kubeconfig or cfg.kubeconfig_path(), context=opts.context or cfg.kube_context)
    for image_name in placement.local_images():
        engine.require_image(image_name, "build it with `podtwin images build`")
    if app:
        engine.require_image(opts.image, f"build or pull it first (`docker pull {opts.image}`)")
    found = placement.resolve(progress)
    if not placement.serves_incoming:
        settings = settings.model_copy(update={"incoming": None})
    if opts.network:
        engine.require_network(opts.network)
    files, notices = FilesSettings.from_config(cfg, found.mounts, FILES_MOUNT) if placement.serves_files else (None, [])
    for notice in notices:
        progress.warn(notice)
    if files is not None:
        progress("the target's files: "
                 + ", ".join(e.path + (" (writable)" if e.writable else "") for e in files.exports))
        settings = settings.model_copy(update={"files": files})
    return Plan(opts, cfg, target, placement, transport, found, settings, extra, engine)


def derived_settings(cfg: "PodtwinConfig") -> tuple[SidecarSettings, ExtraRunArgs]:
    """What a session derives from its config (and may refuse): the sidecar's settings, and
    container.cli_extra_args split between the sidecar and the app. An env_file is read here
    too, so a bad one is refused before anything starts (the app's start reads it again)."""
    if cfg.feature.env.env_file is not None:
        check_sizes(read_env_file(cfg.feature.env.env_file))
    check_sizes(cfg.feature.env.override)
    return SidecarSettings.from_config(cfg), parse_extra_args(cfg.container.cli_extra_args)


def check_options(opts: SessionOptions) -> None:
    """The run options that no target could make work."""
    if not opts.image.strip():
        raise ConfigError("no image given", "write the app's IMAGE after the options, e.g. myimage:dev")
    check_sizes(opts.env)
    if opts.user and opts.as_target_user:
        raise ConfigError("--user and --as-target-user both name the app's user", "keep one of them")
    network = opts.network or ""
    if network in ("host", "none") or network.startswith("container:"):
        why = {"host": "the sidecar would put its rules on this machine's own network",
               "none": "the app would have no network to reach the target through"}.get(
                   network, "the app shares the sidecar's network namespace, not another container's")
        raise ConfigError(f"--network {network} cannot be used: {why}",
                          "leave --network out, or name a Docker network to reach local services on")


def open_bridge(p: Plan, engine: "DockerEngine", progress: Progress, teardown: Teardown,
                on_lost: Callable[[str], None], on_notice: Callable[[str, str], None],
                start_sidecar: bool = True) -> Bridge:
    """Start the agent and the sidecar and open the link, recording each undo in ``teardown``.
    ``on_lost(why)``: the link to the agent is gone for good (it broke and did not come back
    within agent.reconnect_grace, or the agent ended); ``on_notice``: the agent has something to say.
    Without ``start_sidecar`` the sidecar is left to whoever runs the app (a compose project's
    service, ``engine.sidecar_spec``): it finds the agent through the session directory."""
    session = Session.create(str(p.target))
    teardown.add("session directory", session.remove_dir)
    reaper.spawn(session.id, session.runner_pid, session.dir)
    session.write_keys(agent_host_key=p.placement.runner_makes_host_key)
    files_volume, binds = None, []
    if p.settings.files is not None:
        # The target's files: the sidecar mounts them on a session volume, the app binds them.
        files_volume = engine.create_files_volume(session)
        teardown.add("files volume", lambda: engine.remove_files_volume(session.name("fs"), p.placement.sidecar_image))
        root, in_sidecar = p.settings.files.root(files_volume), p.settings.files.root()
        binds = [FileBind(root + e.path, e.path, e.writable, in_sidecar + e.path) for e in p.settings.files.exports]
    # The sidecar starts alongside the agent, at the same time: it waits for the agent's host key
    # and socket. Its undo is recorded whichever of the two starts fails.
    p.settings.write(session.files.sidecar_settings)
    sidecar_id = ""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="podtwin-sidecar-start") as pool:
        sidecar = pool.submit(engine.start_sidecar, session, p.placement.sidecar_image, p.found.hostname,
                              p.opts.network, ports=p.extra.ports, files_volume=files_volume) if start_sidecar else None
        try:
            teardown.setup(p.placement, session, progress)
        finally:
            if sidecar is not None:
                try:
                    sidecar_id = sidecar.result()
                finally:
                    if sidecar.exception() is None:   # started (exception() waits for the start)
                        # Its id from the future itself: a Ctrl-C while result() waited left
                        # sidecar_id empty, and the undo removed nothing ("Resource ID was not provided").
                        teardown.add("sidecar container", lambda: engine.remove(sidecar.result()))
    ready = p.placement.wait_ready(progress)

    loop = LoopThread()
    teardown.add("link thread", loop.stop)
    teardown.setup(p.transport, session, ready, loop)
    owner = OwnerLink(loop, session.files, on_lost, on_notice=on_notice, report=progress.warn,
                      grace=p.cfg.agent.reconnect_grace, agent_gone=p.placement.agent_gone)
    teardown.add("link", owner.close)
    try:
        remote = owner.connect(ready.host_key, p.cfg.agent.startup_timeout)
    except AgentError as exc:
        why = p.transport.failure()   # e.g. port-forward forbidden, an exec'd relay that failed
        if why:
            raise AgentError(f"{p.transport.what} to the agent failed: {why}", p.transport.hint) from exc
        raise
    progress(f"agent ready; target process {remote.pid} has {len(remote.env)} environment variables")
    return Bridge(session, sidecar_id, remote, binds, files_volume)
