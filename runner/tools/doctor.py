"""`podtwin doctor`: is everything a session needs in place? One line per check, with the fix.

Docker engine, the docker CLI, the podtwin image; and, when a kubeconfig is usable, the cluster
and each permission a Kubernetes session needs in the namespace (SelfSubjectAccessReview).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from podtwin.runner.errors import PodtwinError


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""
    optional: bool = False   # needed only by an optional setting: reported, never a failure

    @property
    def passed(self) -> bool:
        return self.ok or self.optional

    def line(self) -> str:
        mark = "ok  " if self.ok else "no  " if self.optional else "FAIL"
        return f"{mark}  {self.what}" + ("" if self.ok else f" — {self.fix}")


def docker_checks() -> list[Check]:
    from podtwin.runner.adapters.docker_engine import DockerEngine
    from podtwin.runner.config.image import agent_image_name, podtwin_image_name

    checks = [Check(shutil.which("docker") is not None, "docker CLI on PATH",
                    "install the Docker CLI (podtwin attaches to the app with it)")]
    try:
        engine = DockerEngine()
    except PodtwinError as exc:
        return checks + [Check(False, exc.message, exc.hint)]
    checks.append(Check(True, "Docker engine answers"))
    image = podtwin_image_name()
    for name in (image, agent_image_name()):
        try:
            engine.require_image(name, "")
            checks.append(Check(True, f"image {name} present"))
        except PodtwinError:
            checks.append(Check(False, f"image {name} missing", "build it with `podtwin images build`"))
            return checks
    return checks + files_checks(engine, image)


def files_checks(engine, image: str) -> list[Check]:
    """The target's files (feature.fs read/write, the default) need FUSE in a container and mount
    propagation from it to the app; with neither, `feature.fs: local` still runs."""
    fuse, propagation = engine.probe_files(image)
    return [Check(fuse is None, "/dev/fuse usable in a container (the target's files)" if fuse is None
                  else f"/dev/fuse not usable in a container ({fuse})",
                  "load the fuse module on the Docker host (`modprobe fuse`), or run with --fs local"),
            Check(propagation is None, "mount propagation from the sidecar to the app" if propagation is None
                  else f"mount propagation refused: {propagation}",
                  "use an engine that allows rshared binds (rootful Linux Docker), or run with --fs local")]


def kube_checks(kubeconfig: str | None, context: str | None, namespace: str | None) -> list[Check]:
    from podtwin.runner.adapters.kube import (COMMON_PERMISSIONS, EPHEMERAL_PERMISSIONS, EXEC_PERMISSIONS, JOB_PERMISSIONS,
                                PORT_FORWARD_PERMISSIONS, KubeEngine, can_i)

    try:
        kube = KubeEngine(kubeconfig, context)
    except PodtwinError as exc:
        return [Check(False, f"Kubernetes: {exc.message}", exc.hint)]
    ns = namespace or kube.default_namespace
    checks = [Check(True, f"Kubernetes cluster answers (namespace {ns})")]
    allowed: dict[tuple, bool] = {}
    for permission in COMMON_PERMISSIONS + JOB_PERMISSIONS + EPHEMERAL_PERMISSIONS + PORT_FORWARD_PERMISSIONS \
            + EXEC_PERMISSIONS:
        if permission not in allowed:
            allowed[permission] = can_i(kube, *permission, ns)

    def all_allowed(group) -> bool:
        return all(allowed[p] for p in group)

    # A session needs the common permissions, one kind of agent and one transport. The default
    # (Job agent, port-forward) is required unless the user can do with the alternative.
    groups = [(COMMON_PERMISSIONS, "", False),
              (JOB_PERMISSIONS, "the Job agent (the default)", all_allowed(EPHEMERAL_PERMISSIONS)),
              (EPHEMERAL_PERMISSIONS, "agent.ephemeral: true", True),
              (PORT_FORWARD_PERMISSIONS, "port-forward (the default)", all_allowed(EXEC_PERMISSIONS)),
              (EXEC_PERMISSIONS, "agent.transport: exec", True)]
    seen = set()
    for permissions, setting, optional in groups:
        for verb, group, resource, sub in permissions:
            if (verb, group, resource, sub) in seen:
                continue
            seen.add((verb, group, resource, sub))
            name = f"{resource}/{sub}" if sub else resource
            checks.append(Check(allowed[(verb, group, resource, sub)],
                                f"may {verb} {name} in {ns}" + (f" (for {setting})" if setting else ""),
                                "apply the Role in docs/kubernetes.md to your user"
                                + (f", or do without {setting}" if optional else ""), optional=optional))
    return checks


def kubeconfig_present(kubeconfig: str | None) -> bool:
    if kubeconfig:
        return True
    paths = os.environ.get("KUBECONFIG", "").split(os.pathsep) + [str(Path("~/.kube/config").expanduser())]
    return any(p and Path(p).is_file() for p in paths)


def run(kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> list[Check]:
    checks = docker_checks()
    if kubeconfig_present(kubeconfig):
        checks += kube_checks(kubeconfig, context, namespace)
    else:
        checks.append(Check(True, "no kubeconfig: Kubernetes checks skipped (Docker targets only)"))
    return checks
