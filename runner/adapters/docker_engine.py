"""Everything podtwin asks of the Docker engine. The only module that imports ``docker``.

Errors from the SDK are translated here into ``PodtwinError``s with a hint, so callers never see
docker exceptions.
"""
from __future__ import annotations

import difflib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import docker
import docker.errors
from docker.types import Mount

from podtwin.runner.config.image import podtwin_image_name
from podtwin.runner.errors import (AgentError, DockerUnavailable, ImageMissing, PropagationRefused, SessionError,
                                  TargetError)
from podtwin.runner.state.files import MOUNT_POINT, SessionFiles
from podtwin.runner.state.session import LABEL_ROLE, LABEL_SESSION, Session

log = logging.getLogger("podtwin.docker")


@dataclass(frozen=True)
class DockerTargetInfo:
    id: str
    name: str
    hostname: str
    mounts: tuple[tuple[str, bool], ...] = ()   # (path in the container, writable): binds and volumes
    user: str = ""                               # its --user, as docker inspect has it
    groups: tuple[str, ...] = ()                 # its --group-add


FILES_MOUNT = "/podtwin/fs"   # in the sidecar: the session volume, shared (rshared) with the daemon


@dataclass(frozen=True)
class SidecarSpec:
    """A session's sidecar container: what ``docker run`` or a compose service needs."""

    image: str
    command: list[str]
    container_name: str
    labels: dict[str, str]
    cap_add: list[str]              # with every other capability dropped
    devices: list[str]              # host:container:permissions
    security_opt: list[str]
    binds: list[tuple[str, str, str]]   # (source on the daemon's side, target, propagation or "")
    sysctls: dict[str, str] = field(default_factory=dict)


def _sidecar_sysctls() -> dict[str, str]:
    """IPv6 on in the app's namespace (Docker turns it off on a network without IPv6): the
    sidecar bridges the app's IPv6 to a target that has it. Not asked of a kernel without IPv6."""
    return {"net.ipv6.conf.all.disable_ipv6": "0"} if os.path.exists("/proc/sys/net/ipv6") else {}


@dataclass(frozen=True)
class LeftoverObject:
    kind: str  # "container", "network" or "volume"
    id: str
    name: str
    labels: dict


class DockerEngine:
    def __init__(self, client: "docker.DockerClient | None" = None) -> None:
        try:
            self.client = client or docker.from_env(timeout=60)
        except docker.errors.DockerException as exc:
            raise DockerUnavailable(f"the Docker engine does not answer ({_short(exc)})") from exc
        try:
            self.client.ping()
        except docker.errors.DockerException as exc:
            self.client.close()
            raise DockerUnavailable(f"the Docker engine does not answer ({_short(exc)})") from exc

    # -- images ---------------------------------------------------------------------------
    def require_image(self, name: str, hint: str) -> None:
        try:
            self.client.images.get(name)
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"image {name!r} is not present locally", hint) from exc
        except docker.errors.APIError as exc:
            raise ImageMissing(f"image {name!r} cannot be inspected ({_short(exc)})", hint) from exc

    # -- targets --------------------------------------------------------------------------
    def get_target(self, name: str) -> DockerTargetInfo:
        try:
            c = self.client.containers.get(name)
        except docker.errors.NotFound as exc:
            names = [n.lstrip("/") for c in self.client.api.containers(all=True) for n in c.get("Names") or []]
            close = difflib.get_close_matches(name, names, n=3)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else "check the name with `docker ps`")
            raise TargetError(f"target container {name!r} not found", hint) from exc
        if c.status != "running":
            raise TargetError(f"target container {name!r} is not running (it is {c.status})",
                              f"start it with `docker start {name}`")
        mounts = tuple((m["Destination"], bool(m.get("RW", True))) for m in c.attrs.get("Mounts") or []
                       if m.get("Type") in ("bind", "volume") and m.get("Destination", "/") != "/")
        return DockerTargetInfo(c.id, c.name, c.attrs["Config"].get("Hostname", ""), mounts,
                                user=c.attrs["Config"].get("User") or "",
                                groups=tuple(c.attrs["HostConfig"].get("GroupAdd") or ()))

    # -- session containers ---------------------------------------------------------------
    def _session_mount(self, session: Session) -> Mount:
        return Mount(target=MOUNT_POINT, source=str(session.dir), type="bind")

    def start_agent(self, session: Session, target: DockerTargetInfo, image: str,
                    startup_timeout: float, communication_timeout: float, reconnect_grace: float,
                    incoming: str | None = None, writes_files: bool = False) -> str:
        """The agent joins the target's network and PID namespaces: it sees the target's main
        process as PID 1 and every socket it opens is the target's. It reads the target's
        environ and files whatever user the target runs as (SYS_PTRACE, DAC_READ_SEARCH), and
        writes them with ``writes_files`` (DAC_OVERRIDE, FOWNER). To steal it also needs NET_ADMIN
        (the nat rules); to mirror, NET_RAW (the packet capture)."""
        files = SessionFiles.in_container()
        container = self._run(
            image,
            ["python", "-m", "podtwin.agent", "--listen", f"unix:{files.agent_socket}",
             "--authorized-keys", str(files.client_public_key), "--target-pid", "1",
             "--handoff", f"unix:{files.handoff_socket}",
             "--host-key", str(files.agent_host_key),
             "--startup-timeout", str(startup_timeout),
             "--communication-timeout", str(communication_timeout),
             "--reconnect-grace", str(reconnect_grace), "--runner-lock", str(files.owner),
             *(["--incoming", incoming, "--session", session.id] if incoming else [])],
            name=session.name("agent"), labels=session.labels("agent"),
            network_mode=f"container:{target.id}", pid_mode=f"container:{target.id}",
            cap_add=["SYS_PTRACE", *_file_caps(writes_files), *_INCOMING_CAPS.get(incoming, []),
                     *_session_dir_caps()],
            cap_drop=["ALL"],
            mounts=[self._session_mount(session)],
        )
        return container.id

    def require_network(self, name: str) -> None:
        try:
            self.client.networks.get(name)
        except docker.errors.NotFound as exc:
            raise TargetError(f"docker network {name!r} not found",
                              "create it, or check the name with `docker network ls`") from exc

    def start_rules_guard(self, session: Session, target: DockerTargetInfo, image: str,
                          startup_timeout: float) -> str:
        """A container of its own in the target's network namespace, so that killing or deleting
        the agent's container does not take it along: it removes the session's rules."""
        container = self._run(
            image, ["python", "-m", "podtwin.agent.incoming.steal.rules_guard", "--session", session.id,
                    "--startup-timeout", str(startup_timeout)],
            name=session.name("rules-guard"), labels=session.labels("rules-guard"),
            network_mode=f"container:{target.id}", cap_add=["NET_ADMIN"], cap_drop=["ALL"],
        )
        return container.id

    def sweep_rules(self, target: str, image: str) -> list[str]:
        """Remove dead sessions' incoming rules in a running container's network namespace (a
        one-off container there, as the rules guard runs); what it removed, one line each."""
        try:
            out = self.client.containers.run(
                image, ["python", "-m", "podtwin.agent.incoming.steal.nat", "sweep"], remove=True,
                network_mode=f"container:{target}", cap_add=["NET_ADMIN"], cap_drop=["ALL"],
                labels={"podtwin.role": "rules-sweep"})
        except docker.errors.NotFound as exc:
            raise TargetError(f"container {target!r} not found",
                              "check the name with `docker ps`") from exc
        except docker.errors.APIError as exc:
            raise SessionError(f"cannot sweep the rules of {target}: {_short(exc)}") from exc
        except docker.errors.ContainerError as exc:
            raise SessionError(f"the rules sweep in {target} failed: {_short(exc)}") from exc
        return [f"{line} (in {target})" for line in out.decode().splitlines() if line.strip()]

    def remove_when_exited(self, container_id: str, timeout: float) -> None:
        """Let a container finish its own clean-up, then remove it whatever its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.is_running(container_id):
            time.sleep(0.05)
        self.remove(container_id)

    def sidecar_spec(self, session: Session, image: str, files_volume: str | None = None) -> "SidecarSpec":
        """How a session's sidecar runs, wherever it is started (``start_sidecar`` here, a
        service of a generated compose project there). It owns the app's network namespace
        (NET_ADMIN for its rules). With ``files_volume`` (a session volume's path on the daemon's
        side) it also mounts the target's files there with FUSE: /dev/fuse, SYS_ADMIN for the
        mount, AppArmor's default profile (which denies mount) lifted, and the volume bound
        rshared so the mounts reach the daemon, which binds them into the app."""
        caps, devices, security = ["NET_ADMIN", "NET_BIND_SERVICE", *_session_dir_caps()], [], []
        binds = [(str(session.dir), MOUNT_POINT, "")]
        if files_volume:
            caps.append("SYS_ADMIN")
            devices, security = ["/dev/fuse:/dev/fuse:rwm"], ["apparmor=unconfined"]
            binds.append((files_volume, FILES_MOUNT, "rshared"))
        return SidecarSpec(image, ["python", "-m", "podtwin.runner.sidecar", "--session-dir", MOUNT_POINT],
                           session.name("sidecar"), session.labels("sidecar"), caps, devices, security, binds,
                           _sidecar_sysctls())

    def start_sidecar(self, session: Session, image: str, hostname: str, network: str | None = None,
                      ports: dict | None = None, files_volume: str | None = None) -> str:
        """The sidecar (``sidecar_spec``) on ``network`` (docker's default bridge if None), so
        local services on that network stay reachable with a local filter; it publishes
        ``ports`` (SDK form) for the app, which listens in its namespace."""
        spec = self.sidecar_spec(session, image, files_volume)
        container = self._run(
            spec.image, spec.command, name=spec.container_name, labels=spec.labels,
            hostname=hostname or None, network=network, ports=ports or None,
            cap_add=spec.cap_add, cap_drop=["ALL"], devices=spec.devices or None,
            security_opt=spec.security_opt or None, sysctls=spec.sysctls or None,
            mounts=[Mount(target=target, source=source, type="bind", propagation=propagation or None)
                    for source, target, propagation in spec.binds],
        )
        return container.id

    # -- the session volume for the target's files ---------------------------------------------
    def create_files_volume(self, session: Session) -> str:
        """A local volume of the session's; its path lies on the daemon's data root, which the
        daemon makes a shared mount: FUSE mounts made there by the sidecar reach the daemon's
        namespace, and so binds into the app. Returns that path."""
        try:
            volume = self.client.volumes.create(session.name("fs"), labels=session.labels("files"))
        except docker.errors.APIError as exc:
            raise SessionError(f"cannot create the session's files volume: {_short(exc)}") from exc
        return volume.attrs["Mountpoint"]

    def volume_root(self) -> str:
        """Where the engine keeps local volumes (on the daemon's side)."""
        return self.client.info().get("DockerRootDir", "/var/lib/docker") + "/volumes"

    def remove_files_volume(self, name: str, image: str) -> None:
        """Remove a session's files volume. A FUSE mount left on it by a killed sidecar stays in
        the daemon's namespace and keeps it busy: a one-off container with the same shared bind
        lazily unmounts it first (the unmount propagates back)."""
        try:
            volume = self.client.volumes.get(name)
        except docker.errors.NotFound:
            return
        try:
            volume.remove(force=True)
            return
        except docker.errors.APIError:
            pass
        self.client.containers.run(
            image, ["sh", "-c", f"for m in {FILES_MOUNT}/*; do umount -l \"$m\" 2>/dev/null; done; true"],
            remove=True, cap_add=["SYS_ADMIN"], cap_drop=["ALL"], security_opt=["apparmor=unconfined"],
            mounts=[Mount(target=FILES_MOUNT, source=volume.attrs["Mountpoint"], type="bind", propagation="rshared")],
            labels={"podtwin.role": "files-unmount"})
        volume.remove(force=True)

    def probe_files(self, image: str) -> tuple[str | None, str | None]:
        """What a session's files need of this engine, tried as a session does it: a container
        with /dev/fuse and SYS_ADMIN mounts on a volume bound rshared, and another container, bound
        rslave to it, sees the mount. Returns (why /dev/fuse fails, why propagation fails), None
        for what works. Leaves nothing: the containers and the volume are removed."""
        volume = self.client.volumes.create(labels={"podtwin.role": "doctor"})
        path = volume.attrs["Mountpoint"]
        probe = None
        try:
            probe = self.client.containers.create(
                image, ["sh", "-c", f"exec 3<>/dev/fuse || exit 3; mkdir -p {FILES_MOUNT}/m && "
                                    f"mount -t tmpfs probe {FILES_MOUNT}/m && echo seen > {FILES_MOUNT}/m/x || exit 4; "
                                    "echo MOUNTED; exec sleep 60"],
                cap_add=["SYS_ADMIN"], cap_drop=["ALL"], security_opt=["apparmor=unconfined"],
                devices=["/dev/fuse:/dev/fuse:rwm"], labels={"podtwin.role": "doctor"},
                mounts=[Mount(target=FILES_MOUNT, source=path, type="bind", propagation="rshared")])
            try:
                probe.start()
            except docker.errors.APIError as exc:   # no /dev/fuse on the host: the device cannot be added
                return _short(exc), None
            deadline = time.monotonic() + 30
            while b"MOUNTED" not in probe.logs() and time.monotonic() < deadline:
                probe.reload()
                if probe.status == "exited":
                    code = probe.wait()["StatusCode"]
                    logs = probe.logs().decode(errors="replace").strip().splitlines()
                    why = logs[-1] if logs else f"exit {code}"
                    return (why, None) if code == 3 else (None, f"a mount in a container failed: {why}")
                time.sleep(0.1)
            seen = self.client.containers.run(
                image, ["sh", "-c", "cat /probe/m/x 2>/dev/null || true"], remove=True, cap_drop=["ALL"],
                labels={"podtwin.role": "doctor"},
                mounts=[Mount(target="/probe", source=path, type="bind", read_only=True, propagation="rslave")])
            if b"seen" not in seen:
                return None, "a mount made in one container does not reach another (mount propagation)"
            return None, None
        except docker.errors.APIError as exc:
            return None, _short(exc)
        finally:
            if probe is not None:
                try:
                    probe.exec_run(["umount", "-l", f"{FILES_MOUNT}/m"])
                except docker.errors.APIError:
                    pass   # it has exited: its mount went with it
                try:
                    probe.remove(force=True)
                except docker.errors.APIError:
                    pass
            try:
                volume.remove(force=True)
            except docker.errors.APIError:
                pass

    def _run(self, image: str, command: list[str], **kwargs):
        try:
            return self.client.containers.run(image, command, detach=True, auto_remove=True,
                                              init=False, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"image {image!r} is not present locally",
                               "build it with `podtwin images build`") from exc
        except docker.errors.APIError as exc:
            raise SessionError(f"cannot start {kwargs.get('name')}: {_short(exc)}") from exc

    def wait_for_line(self, container_id: str, prefix: str, timeout: float, what: str) -> str:
        """Follow a container's output until a line starts with ``prefix``.

        The log stream is followed from the start in a thread, so even a container that fails at
        once (and is auto-removed) leaves its last words in the error message."""
        lines: queue.Queue[str | None] = queue.Queue()

        def follow() -> None:
            try:
                stream = self.client.api.logs(container_id, stream=True, follow=True,
                                              stdout=True, stderr=True)
                buf = b""
                for chunk in stream:
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for line in done:
                        lines.put(line.decode(errors="replace"))
                if buf:
                    lines.put(buf.decode(errors="replace"))
            except docker.errors.APIError:
                pass
            finally:
                lines.put(None)

        threading.Thread(target=follow, name=f"logs-{what}", daemon=True).start()
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"the {what} was not ready within {timeout:.0f}s: {_tail(seen)}",
                                 "raise agent.startup_timeout, or look at the container's logs")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AgentError(f"the {what} exited during start-up: {_tail(seen)}",
                                 "run `podtwin doctor`, or rerun with --log-level debug")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
            seen.append(line)

    def create_app(self, session: Session, image: str, command: list[str] | None, env: dict[str, str],
                   sidecar_id: str, tty: bool, interactive: bool, entrypoint: list[str] | None = None,
                   workdir: str | None = None, user: str | None = None,
                   volumes: list[str] | None = None, extra: dict | None = None,
                   files: list[tuple[str, str, bool]] | None = None, group_add: tuple[str, ...] = (),
                   name: str | None = None) -> str:
        """``extra``: more SDK keywords from container.cli_extra_args (volumes and labels add to
        the session's own). ``files``: (source on the daemon's side, path in the app, writable):
        the target's files, bound rslave so a remount in the sidecar reaches the app too."""
        extra = dict(extra or {})
        mounts = [Mount(target=dst, source=src, type="bind", read_only=not writable, propagation="rslave")
                  for src, dst, writable in files or []]
        if mounts:
            extra["mounts"] = mounts
        if group_add:
            extra["group_add"] = list(group_add)
        volumes = [*(volumes or []), *extra.pop("volumes", [])]
        labels = {**extra.pop("labels", {}), **session.labels("app")}
        try:
            c = self.client.containers.create(
                image, command or None, name=name or session.name("app"), labels=labels,
                environment=env, network_mode=f"container:{sidecar_id}", tty=tty,
                stdin_open=interactive, entrypoint=entrypoint, working_dir=workdir, user=user,
                volumes=volumes or None, **extra,
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"app image {image!r} is not present locally",
                               f"build or pull it first (`docker pull {image}`)") from exc
        except docker.errors.APIError as exc:
            if mounts and "bind source path does not exist" in str(exc):
                raise PropagationRefused(f"the target's files did not reach the daemon: {_short(exc)}") from exc
            raise SessionError(f"cannot create the app container: {_short(exc)}") from exc
        return c.id

    def copy_between(self, source_id: str, root: str, paths: list[str], dest_id: str, limit: int) -> None:
        """``paths`` (relative to ``root``) from a running container into another, at the same
        paths below ``/``: a tar made in the source (it sees its own mounts, which the engine's
        archive API does not), unpacked by the engine in the destination (created, not started)."""
        api = self.client.api
        try:
            exec_id = api.exec_create(source_id, ["tar", "-C", root, "-cf", "-", *paths], stderr=False)["Id"]
            data = bytearray()
            for chunk in api.exec_start(exec_id, stream=True):   # never more than the limit in memory
                data += chunk
                if len(data) > limit:
                    raise SessionError(f"more than a snapshot holds ({limit // 2**20} MiB)")
            code = api.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.APIError as exc:
            raise SessionError(_short(exc)) from exc
        if code != 0:
            raise SessionError(f"tar in the sidecar exited {code}")
        try:
            self.client.api.put_archive(dest_id, "/", bytes(data))
        except docker.errors.APIError as exc:
            raise SessionError(_short(exc)) from exc

    def wait_exit(self, container_id: str) -> int | None:
        """Block until the container stops; its exit code (None: it was already gone)."""
        try:
            return self.client.api.wait(container_id, timeout=None)["StatusCode"]
        except docker.errors.NotFound:
            return None
        except (docker.errors.APIError, OSError):   # the engine went away: the session is lost too
            return None

    def start(self, container_id: str) -> None:
        try:
            self.client.containers.get(container_id).start()
        except docker.errors.APIError as exc:
            raise SessionError(f"cannot start the app: {_short(exc)}") from exc

    def stop(self, container_id: str, timeout: int = 3) -> None:
        try:
            self.client.containers.get(container_id).stop(timeout=timeout)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("stop %s: %s", container_id[:12], _short(exc))

    def remove(self, container_id: str) -> None:
        try:
            self.client.containers.get(container_id).remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise SessionError(f"cannot remove container {container_id[:12]}: {_short(exc)}") from exc

    def start_failure(self, container_id: str) -> tuple[int, str] | None:
        """(exit code, why) when the container could not be started at all (its command is not
        in the image: 127, not executable: 126, as the daemon records them); None otherwise."""
        try:
            state = self.client.containers.get(container_id).attrs.get("State", {})
        except docker.errors.NotFound:
            return None
        if not state.get("Error"):
            return None
        return int(state.get("ExitCode") or 125), str(state["Error"])

    def failed_with(self, container_id: str) -> tuple[int, str] | None:
        """(exit code, its last meaningful output line) of a container that exited with an
        error; None if it runs, exited 0, or is gone."""
        try:
            c = self.client.containers.get(container_id)
            code = int(c.attrs.get("State", {}).get("ExitCode") or 0)
            if c.status != "exited" or code == 0:
                return None
            return code, _tail(c.logs(tail=20).decode(errors="replace").splitlines())
        except docker.errors.APIError:
            return None

    def is_running(self, container_id: str) -> bool:
        try:
            return self.client.containers.get(container_id).status == "running"
        except docker.errors.NotFound:
            return False

    # -- sessions and clean-up ------------------------------------------------------------
    def session_objects(self, session_id: str | None = None) -> list[LeftoverObject]:
        selector = LABEL_SESSION if session_id is None else f"{LABEL_SESSION}={session_id}"
        out: list[LeftoverObject] = []
        # The low-level list: containers.list() inspects each one afterwards, which races with
        # the session's own --rm containers going away.
        for c in self.client.api.containers(all=True, filters={"label": selector}):
            name = (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")
            out.append(LeftoverObject("container", c["Id"], name, dict(c.get("Labels") or {})))
        for n in self.client.networks.list(filters={"label": selector}):
            out.append(LeftoverObject("network", n.id, n.name, dict(n.attrs.get("Labels") or {})))
        for v in self.client.volumes.list(filters={"label": selector}):
            out.append(LeftoverObject("volume", v.id, v.name, dict(v.attrs.get("Labels") or {})))
        return out

    def remove_object(self, obj: LeftoverObject) -> None:
        try:
            if obj.kind == "container":
                self.client.containers.get(obj.id).remove(force=True)
            elif obj.kind == "volume":
                self.remove_files_volume(obj.name, podtwin_image_name())
            else:
                self.client.networks.get(obj.id).remove()
        except docker.errors.NotFound:
            pass

    def clean_session(self, session_id: str) -> list[str]:
        """Remove every object of a session: app first, then sidecar, agent, networks."""
        order = {"app": 0, "sidecar": 1, "agent": 2, "rules-guard": 3}
        objects = sorted(self.session_objects(session_id),
                         key=lambda o: (o.kind != "container", order.get(o.labels.get(LABEL_ROLE, ""), 9)))
        removed, errors = [], []
        for obj in objects:
            try:
                if obj.labels.get(LABEL_ROLE) == "rules-guard":
                    self.remove_when_exited(obj.id, 5)  # it is removing the session's rules
                self.remove_object(obj)
                removed.append(obj.name)
            except docker.errors.APIError as exc:
                errors.append(f"{obj.name}: {_short(exc)}")
        if errors:
            raise SessionError("could not remove " + "; ".join(errors), "run `podtwin clean` again")
        return removed


_INCOMING_CAPS = {"steal": ["NET_ADMIN"], "mirror": ["NET_RAW"]}


def _file_caps(writes: bool) -> list[str]:
    """An agent's rights over the target's files: read them whoever owns them (a non-root
    target's /proc/PID/environ is 0400 its own), and change them in a session that writes."""
    return ["DAC_READ_SEARCH", *(["DAC_OVERRIDE", "FOWNER"] if writes else [])]


def _session_dir_caps() -> list[str]:
    """The session directory (0700) and key (0600) belong to the user running podtwin. Container
    root reaches them without extra rights only when that user is root; otherwise it needs
    DAC_OVERRIDE, which in these containers reaches nothing more than what they already see."""
    return [] if os.geteuid() == 0 else ["DAC_OVERRIDE"]


def _tail(lines: list[str]) -> str:
    """The last meaningful line a container printed (tracebacks end with the error itself)."""
    useful = [ln.strip() for ln in lines if ln.strip()]
    return useful[-1][:300] if useful else "no output"


def _short(exc: Exception) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip().splitlines()[0][:300] if text else type(exc).__name__
