"""The `podtwin` command: parses options and calls ``podtwin.runner.api``. Nothing else lives here.

Every PodtwinError becomes one line on stderr and a non-zero exit code, here and only here.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import click

from podtwin.runner import api
from podtwin.runner.errors import EXIT_INFRA, EXIT_INTERRUPTED, ConfigError, PodtwinError


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key:
            raise ConfigError(f"bad -e {item!r}", "write -e KEY=VALUE")
        if not sep:  # docker's `-e KEY` passes the local value through
            import os
            if key not in os.environ:
                continue
            value = os.environ[key]
        env[key] = value
    return env


def _version_message() -> str:
    from podtwin.runner.config.image import agent_image_name, cluster_agent_image, podtwin_image_name
    return (f"podtwin {version('podtwin')}\nimages: {podtwin_image_name()} (sidecar), {agent_image_name()} "
            f"(agent; in clusters: {cluster_agent_image()})\nPython {sys.version.split()[0]}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("podtwin"), prog_name="podtwin", message=_version_message().replace("%", "%%"))
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Runner log verbosity.")
def main(log_level: str) -> None:
    """Run a local container as if it were inside a target pod or container.

    \b
    Example:
      podtwin container run --target deploy/api myimage:dev
      podtwin doctor
    """
    logging.basicConfig(level=log_level.upper(), format="podtwin %(levelname)s %(name)s: %(message)s")


class _ContainerGroup(click.Group):
    """`container run`, and mirrord's form `container [OPTIONS] -- docker run [FLAGS] IMAGE [CMD...]`:
    the docker command's flags become `container run`'s own where it has them, and
    container.cli_extra_args's (--cap-add, -m, ...) otherwise, which names what it refuses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args and not (args and args[0] in self.commands):
            cut = args.index("--")
            docker = args[cut + 1:]
            if docker[:2] != ["docker", "run"]:
                raise click.UsageError("after --, give the `docker run` command: podtwin container [OPTIONS] -- "
                                       "docker run [FLAGS] IMAGE [COMMAND...]", ctx)
            args = ["run", *args[:cut], *_docker_run_args(docker[2:])]
        return super().parse_args(ctx, args)


# docker run flags `container run` has itself (the rest go through --docker-arg)
_OWN_FLAGS = {"-e", "--env", "--env-file", "-p", "--publish", "--name", "-l", "--label", "-d", "--detach",
              "-i", "--interactive", "-t", "--tty", "--rm", "--entrypoint", "-w", "--workdir", "-u", "--user",
              "-v", "--volume", "--network", "-q", "--quiet"}
# docker run's flags that take no value
_BOOLEAN = {"-d", "--detach", "-i", "--interactive", "-t", "--tty", "--rm", "-q", "--quiet", "--init", "--read-only",
            "--privileged", "-P", "--publish-all", "--no-healthcheck", "--oom-kill-disable", "--sig-proxy"}


def _docker_run_args(args: list[str]) -> list[str]:
    """docker run's flags and IMAGE [CMD...] as `container run` takes them."""
    out: list[str] = []
    while args:
        item = args.pop(0)
        if not item.startswith("-") or item == "--":
            return [*out, "--", item, *args] if item != "--" else [*out, "--", *args]
        flag, eq, _ = item.partition("=")
        combined = not item.startswith("--") and len(item) > 2 and all(f"-{c}" in _BOOLEAN for c in item[1:])
        takes_value = not eq and flag not in _BOOLEAN and not combined and not (
            not item.startswith("--") and len(item) > 2)   # -p8080:80, -eA=1: the value is attached
        own = flag in _OWN_FLAGS or combined or (not item.startswith("--") and flag[:2] in _OWN_FLAGS)
        value = [args.pop(0)] if takes_value and args else []
        out += [item, *value] if own else [f"--docker-arg={item}", *(f"--docker-arg={v}" for v in value)]
    return out


@main.group(cls=_ContainerGroup)
def container() -> None:
    """Run a local container bridged to a target; mirrord's `container -- docker run ...` form too.

    \b
    Example:
      podtwin container run --target container/api myimage:dev
      podtwin container --target deploy/api -- docker run -e A=1 -p 8080:80 myimage:dev
    """


@container.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--target", "target", metavar="TARGET",
              help="What to run as: container/NAME (Docker), or pod/NAME, deploy/NAME, sts/NAME, job/NAME, "
                   "cronjob/NAME, svc/NAME [/container/C] (Kubernetes). Overrides `target` in the config.")
@click.option("-f", "--config-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Config file (JSON, YAML or TOML; mirrord's format is accepted).")
@click.option("--profile", help="A ready-made profile from profiles/ (see `podtwin config profiles`).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Set an environment variable in the app; wins over the target's and the config's.")
@click.option("--env-file", "env_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Read KEY=VALUE lines into the app's environment, as docker run does (-e wins).")
@click.option("-p", "--publish", "publish", multiple=True, metavar="[IP:]HOST:APP",
              help="Publish an app port on this machine, as docker run -p (on the sidecar, which owns the "
                   "app's network).")
@click.option("--name", help="Name of the app container (default: podtwin-<session>-app).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label on the app container.")
@click.option("-d", "--detach", is_flag=True,
              help="Run in the background and print the app container's id, as docker run -d; "
                   "`podtwin stop ID` ends the session.")
@click.option("--docker-arg", "docker_args", multiple=True, hidden=True,
              help="A docker run flag for the app or the sidecar, as container.cli_extra_args takes them.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and connect it to the app.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal for the app.")
@click.option("--rm", is_flag=True, help="Accepted for docker compatibility: the app container is always removed.")
@click.option("--entrypoint", help="Override the image's entrypoint.")
@click.option("-w", "--workdir", help="Working directory inside the app container.")
@click.option("-u", "--user", help="User (name|uid[:group|gid]) to run the app as.")
@click.option("--as-target-user", is_flag=True,
              help="Run the app as the target does: its user and group (a pod's runAsUser/runAsGroup, a "
                   "container's --user) and its extra groups (fsGroup, supplementalGroups, --group-add).")
@click.option("-v", "--volume", "volumes", multiple=True, help="Bind mount, as in docker run -v.")
@click.option("-n", "--namespace", help="Kubernetes namespace of the target (default: the context's).")
@click.option("--context", help="kubeconfig context to use (default: the current one).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False),
              help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
@click.option("--network", help="Local Docker network for the app (reach local services; pair with "
              "a `local` outgoing/DNS filter). Default: Docker's default bridge.")
@click.option("--fs", "fs_mode", type=click.Choice(["read", "write", "local", "localwithoverrides"]),
              help="The target's files (feature.fs.mode): read (default: its volume mounts, read-only), write, "
                   "local (none), localwithoverrides (only the paths feature.fs names).")
@click.option("-q", "--quiet", is_flag=True, help="Do not print progress.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def container_run(target, config_file, profile, env, env_files, publish, name, labels, detach, docker_args, interactive,
                  tty, rm, entrypoint, workdir, user, as_target_user, volumes, namespace, context, kubeconfig, network,
                  fs_mode, quiet, image, command) -> None:
    """Run IMAGE [COMMAND...] with the target's environment, network and DNS.

    \b
    Example:
      podtwin container run --target container/api myimage:dev
    """
    if command and command[0] == "--":
        command = command[1:]
    extra = [*docker_args, *(a for v in publish for a in ("-p", v)), *(a for v in labels for a in ("-l", v))]
    opts = api.RunOptions(
        image=image, command=tuple(command), target=target, config_file=config_file, profile=profile,
        env=_env_pairs(env), interactive=interactive, tty=tty, quiet=quiet, entrypoint=entrypoint,
        workdir=workdir, user=user, as_target_user=as_target_user, volumes=tuple(volumes), network=network,
        namespace=namespace,
        context=context, kubeconfig=kubeconfig, cwd=Path.cwd(), env_files=tuple(env_files), name=name,
        docker_args=tuple(extra), detach=detach, overrides={"feature": {"fs": {"mode": fs_mode}}} if fs_mode else {})
    sys.exit(api.run(opts))


@main.command("compose", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-f", "--file", "files", multiple=True, metavar="FILE", help="Compose file(s), as docker compose -f.")
@click.option("-p", "--project-name", help="Project name, as docker compose -p.")
@click.option("--profile", "profiles", multiple=True, help="Profile to enable, as docker compose --profile.")
@click.option("--env-file", "env_files", multiple=True, metavar="FILE",
              help="Interpolation variables, as docker compose --env-file.")
@click.option("--project-directory", metavar="DIR", help="The project's directory, as docker compose's.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print podtwin's progress.")
@click.argument("command", metavar="COMMAND")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
def compose(files, project_name, profiles, env_files, project_directory, quiet, command, args) -> None:
    """Run a compose project whose `x-podtwin` services are bridged to their targets.

    A service with `x-podtwin: {target: deploy/api}` (any podtwin or mirrord key may go there,
    or `config: FILE`) runs as a podtwin session: the target's environment (the compose file's
    values win), network and DNS (the project's own services stay local), incoming traffic and
    files. `up` runs the project attached and removes it at the end; `config` prints the
    project podtwin runs; other commands go to docker compose unchanged.

    \b
    Example:
      podtwin compose up
      podtwin compose -f compose.yaml up --exit-code-from api api
      podtwin compose config
    """
    sys.exit(api.compose(files, project_name, profiles, env_files, project_directory, command, args, quiet))


@main.group()
def config() -> None:
    """Inspect configuration.

    \b
    Example:
      podtwin config check -f .mirrord/mirrord.json
    """


@config.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the config file.

    \b
    Example:
      podtwin config schema > podtwin.schema.json
    """
    from podtwin.runner.config.models import config_schema as schema
    click.echo(json.dumps(schema(), indent=2))


@config.command("check")
@click.option("-f", "--config-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Config file to check (default: the one a session would find in this directory).")
@click.option("--profile", help="A ready-made profile to apply first, as `container run --profile`.")
@click.option("--target", metavar="TARGET", help="A target string to check too.")
def config_check(config_file, profile, target) -> None:
    """Load the configuration exactly as a session would and print the effective settings.

    Keys podtwin does not act on are named on stderr; a bad file is one line and exit code 125,
    so editors and CI can call it. Touches neither Docker nor the cluster.

    \b
    Example:
      podtwin config check -f .mirrord/mirrord.json
    """
    cfg, warnings = api.check_config(config_file, profile, Path.cwd(), target)
    for warning in warnings:
        click.echo(warning if warning.startswith("podtwin") else f"podtwin: {warning}", err=True)
    click.echo(json.dumps(cfg.model_dump(mode="json", exclude_none=True), indent=2))


@config.command("profiles")
def config_profiles() -> None:
    """List the ready-made profiles.

    \b
    Example:
      podtwin config profiles
    """
    from podtwin.runner.config.loader import list_profiles
    for name, description in sorted(list_profiles().items()):
        click.echo(f"{name:20} {description}")


@main.group()
def images() -> None:
    """Build the images podtwin needs.

    \b
    Example:
      podtwin images build
    """


@images.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the images exist.")
@click.option("--tag", metavar="NAME", help="Name of the podtwin image (default: podtwin:<version>, the one "
              "sessions use; set PODTWIN_IMAGE to run sessions with another); the agent's is NAME with -agent.")
def images_build(force: bool, tag: str | None) -> None:
    """Build the podtwin images (the sidecar's, and the agent's small one made from it) and their
    base, offline if need be.

    \b
    Example:
      podtwin images build
    """
    from podtwin.runner.tools.images import build_images
    built = build_images(echo=lambda line: click.echo(line, err=True), force=force, tag=tag)
    from podtwin.runner.config.image import agent_image_name
    click.echo(f"built {built} and {agent_image_name(built)}")


@images.command("push")
@click.argument("repository", metavar="REGISTRY/REPO[:TAG]")
def images_push(repository: str) -> None:
    """Push the agent's image to a registry your cluster pulls from (tag: this version).

    \b
    Example:
      podtwin images push registry.example.com/team/podtwin-agent
    """
    from podtwin.runner.tools.images import push_image
    pushed = push_image(repository, echo=lambda line: click.echo(line, err=True))
    click.echo(f"pushed {pushed}; use it with agent.image: {pushed} (or PODTWIN_AGENT_IMAGE={pushed})")


@images.command("load")
@click.argument("cluster", metavar="kind[:NAME]|minikube[:PROFILE]|k3d[:CLUSTER]|podtwin-test")
def images_load(cluster: str) -> None:
    """Load the agent's image into a local cluster's nodes, under the name sessions use by default.

    \b
    Example:
      podtwin images load kind
      podtwin images load minikube:dev
    """
    from podtwin.runner.tools.images import load_image
    image = load_image(cluster, echo=lambda line: click.echo(line, err=True))
    click.echo(f"loaded {image} into {cluster}")


@main.command("doctor")
@click.option("-n", "--namespace", help="Kubernetes namespace to check permissions in.")
@click.option("--context", help="kubeconfig context to check.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file to check.")
def doctor(namespace, context, kubeconfig) -> None:
    """Check the Docker engine, the podtwin and agent images, the cluster and your permissions.

    \b
    Example:
      podtwin doctor -n staging
    """
    from podtwin.runner.tools import doctor as checks
    results = checks.run(kubeconfig, context, namespace)
    for check in results:
        click.echo(check.line())
    if not all(c.passed for c in results):
        sys.exit(1)


def _cluster(kubeconfig: str | None, context: str | None):
    """The cluster for `sessions`/`clean`, if one is configured and answers (else a note why not)."""
    kube, why = api.kube_for_listing(kubeconfig, context)
    configured = kubeconfig or context or os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists()
    if kube is None and configured:
        click.echo(f"podtwin: agent Jobs not checked: {why}", err=True)
    return kube


@main.command("sessions")
@click.option("--context", help="kubeconfig context whose agent Jobs to list too.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: $KUBECONFIG).")
def sessions(context, kubeconfig) -> None:
    """List podtwin sessions (local containers, and agent Jobs in the cluster) and whether their
    runner is still alive.

    \b
    Example:
      podtwin sessions
    """
    rows = api.list_sessions(_cluster(kubeconfig, context))
    if not rows:
        click.echo("no podtwin sessions")
        return
    for row in rows:
        state = "live" if row["alive"] else "dead"
        click.echo(f"{row['session']}  {state:4}  {row['target']:30}  {' '.join(row['objects'])}")


@main.command("stop")
@click.argument("sessions", nargs=-1, required=True, metavar="SESSION...")
def stop(sessions) -> None:
    """End sessions as Ctrl-C would: a session's id (`podtwin sessions`), or its app container's
    name or id (what `container run -d` printed). Waits until each one has removed what it made.

    \b
    Example:
      podtwin stop 3f2a9c1e
      podtwin stop $(podtwin container run -d --target container/api myimage:dev)
    """
    for ref in sessions:
        click.echo(api.stop(ref))


@main.command("clean")
@click.option("--all", "all_sessions", is_flag=True, help="Also remove sessions whose runner is alive.")
@click.option("--target", "targets", multiple=True, metavar="container/NAME",
              help="Also remove dead sessions' incoming rules in this container's network namespace.")
@click.option("--context", help="kubeconfig context whose agent Jobs to clean too.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: $KUBECONFIG).")
def clean(all_sessions: bool, targets, context, kubeconfig) -> None:
    """Remove what dead sessions left behind: containers, networks, session directories, agent
    Jobs, and incoming rules in their Docker targets.

    \b
    Example:
      podtwin clean
      podtwin clean --all
    """
    api.clean_targets(tuple(targets))   # a bad --target is refused before anything is asked
    removed = api.clean(all_sessions, _cluster(kubeconfig, context), tuple(targets))
    click.echo("\n".join(f"removed {r}" for r in removed) if removed else "nothing to clean")


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (click's own).

    \b
    Example:
      eval "$(podtwin completion bash)"       # in ~/.bashrc
      podtwin completion fish > ~/.config/fish/completions/podtwin.fish
    """
    from click.shell_completion import get_completion_class
    cls = get_completion_class(shell)
    click.echo(cls(main, {}, "podtwin", "_PODTWIN_COMPLETE").source())


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run() -> None:
    """Console-script entry point: one line per error, never a traceback for a known failure."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        main.main(prog_name="podtwin", standalone_mode=False)
    except PodtwinError as exc:
        click.echo(exc.one_line(), err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:   # a bad flag or argument: one line, and docker run's 125 too
        where = exc.ctx.command_path if exc.ctx is not None else "podtwin"
        click.echo(f"podtwin: {exc.format_message().rstrip('.')} — see `{where} --help`", err=True)
        sys.exit(EXIT_INFRA)
    except click.ClickException as exc:
        click.echo(f"podtwin: {exc.format_message()}", err=True)
        sys.exit(EXIT_INFRA)
    except (click.exceptions.Abort, KeyboardInterrupt):   # click turns Ctrl-C into Abort
        click.echo("podtwin: interrupted; everything this session created was removed", err=True)
        _exit_now(EXIT_INTERRUPTED)


def _exit_now(code: int) -> None:
    """Exit with ``code`` once everything is undone, past the interpreter's own exit path: under
    ``python -m``, a Ctrl-C that was caught and handled could still end the process with SIGINT
    (exit -2 instead of 130, in about one start-up interrupt in ten at 0.45-0.55 s; seen on
    Python 3.11.7, with a sys.exit(130), even with SIGINT ignored by then)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
