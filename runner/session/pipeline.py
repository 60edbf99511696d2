"""One session, top to bottom, the same for every target: resolve the target, start the agent,
start the sidecar, open the link, start the app, tear everything down.

What differs between a Docker and a Kubernetes target is the pair of backends (``backends``):
where the agent runs and how the session's socket reaches it. Every step that makes something
records how to undo it first (``Teardown``); a detached reaper removes what is left if this
process itself is killed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from podtwin.runner import backends
from podtwin.runner.errors import AgentError
from podtwin.runner.link.loop import LoopThread
from podtwin.runner.link.owner import OwnerLink
from podtwin.runner.session import reaper
from podtwin.runner.session.app import App, AppOptions
from podtwin.runner.progress import Progress
from podtwin.runner.session.teardown import Teardown
from podtwin.runner.sidecar.settings import SidecarSettings
from podtwin.runner.state.session import Session

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


def run(opts: SessionOptions, cfg: "PodtwinConfig", target: "Target", engine: "DockerEngine",
        image: str, progress: Progress) -> int:
    """``image``: the local podtwin image (the sidecar's; the agent's unless agent.image says)."""
    settings = SidecarSettings.from_config(cfg)          # refuses a bad config before anything starts
    placement, transport = backends.for_target(
        target, cfg, image, engine, namespace=opts.namespace or cfg.target.namespace,
        kubeconfig=opts.kubeconfig, context=opts.context or cfg.kube_context)
    engine.require_image(placement.sidecar_image, "build it with `podtwin images build`")
    engine.require_image(opts.image, f"build or pull it first (`docker pull {opts.image}`)")
    found = placement.resolve(progress)
    if opts.network:
        engine.require_network(opts.network)

    session = Session.create(str(target))
    with Teardown(progress) as teardown:
        teardown.add("session directory", session.remove_dir)
        reaper.spawn(session.id, session.runner_pid, session.dir)
        session.write_keys()
        teardown.setup(placement, session, progress)
        # The sidecar starts alongside the agent: it waits for the agent's host key and socket.
        settings.write(session.files.sidecar_settings)
        sidecar_id = engine.start_sidecar(session, placement.sidecar_image, found.hostname, opts.network)
        teardown.add("sidecar container", lambda: engine.remove(sidecar_id))
        ready = placement.wait_ready(progress)

        loop = LoopThread()
        teardown.add("link thread", loop.stop)
        teardown.setup(transport, session, ready, loop)
        app = App(engine, progress)
        owner = OwnerLink(loop, session.files, app.link_lost, on_notice=app.on_notice)
        teardown.add("link", owner.close)
        try:
            remote = owner.connect(ready.host_key, cfg.agent.startup_timeout)
        except AgentError as exc:
            why = transport.failure()   # e.g. port-forward forbidden, an exec'd relay that failed
            if why:
                raise AgentError(f"{transport.what} to the agent failed: {why}", transport.hint) from exc
            raise
        progress(f"agent ready; target process {remote.pid} has {len(remote.env)} environment variables")
        return app.run(session, opts, cfg, remote.env, sidecar_id, teardown)
