"""Target strings parsed into frozen, typed specs.

A target names the thing whose world the local container borrows: a Docker container
(`container/NAME`) or a Kubernetes workload (`pod/NAME`, `deployment/NAME/container/CNAME`, ...).
Strings are parsed once, here, so the rest of podtwin only sees `DockerTarget` or `KubeTarget`.
Parsing is pure: it never asks Docker or the cluster whether the target exists.

`str(target)` gives the canonical spelling back, and `parse_target(str(t)) == t` always holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Union

from podtwin.runner.errors import TargetError

KubeKind = Literal["pod", "deployment", "statefulset", "replicaset", "job", "cronjob", "service"]

# Every spelling we accept for a Kubernetes kind, mapped to its canonical name. Includes kubectl's
# short names and mirrord's snake_case spellings so a mirrord config works unchanged.
KIND_ALIASES: dict[str, KubeKind] = {
    "pod": "pod", "pods": "pod", "po": "pod",
    "deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
    "statefulset": "statefulset", "statefulsets": "statefulset", "sts": "statefulset",
    "stateful_set": "statefulset",
    "replicaset": "replicaset", "replicasets": "replicaset", "rs": "replicaset",
    "replica_set": "replicaset",
    "job": "job", "jobs": "job",
    "cronjob": "cronjob", "cronjobs": "cronjob", "cj": "cronjob", "cron_job": "cronjob",
    "service": "service", "services": "service", "svc": "service",
}

# Kinds mirrord knows that podtwin deliberately does not handle (yet): a clear error beats a
# confusing "unknown kind".
UNSUPPORTED_KINDS: dict[str, str] = {
    "rollout": "Argo Rollouts are not supported yet; target one of its pods with pod/NAME",
    "rollouts": "Argo Rollouts are not supported yet; target one of its pods with pod/NAME",
    "labels": "label selectors are not supported yet; target a pod or workload by name",
}

ACCEPTED_FORMS = (
    "container/NAME, pod/NAME, deployment/NAME (deploy/), statefulset/NAME (sts/), "
    "replicaset/NAME (rs/), job/NAME, cronjob/NAME, service/NAME (svc/); "
    "Kubernetes forms take an optional /container/CNAME; or targetless"
)

# Docker container names (what `docker run --name` accepts) and container ids.
_DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# Kubernetes object names are DNS-1123 subdomains; container names are DNS-1123 labels.
_KUBE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KUBE_CONTAINER = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class DockerTarget:
    """A running local Docker container, by name or id."""

    name: str

    def __str__(self) -> str:
        return f"container/{self.name}"


@dataclass(frozen=True)
class KubeTarget:
    """A Kubernetes pod or workload, optionally narrowed to one of its containers."""

    kind: KubeKind
    name: str
    container: str | None = None

    def __str__(self) -> str:
        base = f"{self.kind}/{self.name}"
        return f"{base}/container/{self.container}" if self.container else base


@dataclass(frozen=True)
class Targetless:
    """No target (mirrord's targetless mode): an agent pod of the session's own in a namespace;
    the app gets no environment from it, its outgoing traffic and DNS leave from that pod."""

    def __str__(self) -> str:
        return "targetless"


Target = Union[DockerTarget, KubeTarget, Targetless]


def parse_target(s: str) -> Target:
    """Parse a target string; raise TargetError naming the accepted forms when it is malformed."""
    text = s.strip() if isinstance(s, str) else ""
    parts = text.split("/")
    kind_word = parts[0].lower() if parts else ""

    if kind_word in UNSUPPORTED_KINDS:
        raise TargetError(f"target {s!r}: {UNSUPPORTED_KINDS[kind_word]}", f"use {ACCEPTED_FORMS}")
    if text.lower() == "targetless":
        return Targetless()

    if kind_word == "container":
        if len(parts) != 2 or not _DOCKER_NAME.fullmatch(parts[1]):
            raise _bad(s, "a Docker target is container/NAME with a valid container name or id")
        return DockerTarget(parts[1])

    kind = KIND_ALIASES.get(kind_word)
    if kind is None:
        raise _bad(s, f"unknown kind {parts[0]!r}" if len(parts) > 1 else "no kind given")
    if len(parts) == 2:
        name, container = parts[1], None
    elif len(parts) == 4 and parts[2].lower() == "container":
        name, container = parts[1], parts[3]
    else:
        raise _bad(s, f"expected {kind}/NAME or {kind}/NAME/container/CNAME")
    if not _KUBE_NAME.fullmatch(name) or len(name) > 253:
        raise _bad(s, f"{name!r} is not a valid Kubernetes name (lowercase letters, digits, '-', '.')")
    if container is not None and (not _KUBE_CONTAINER.fullmatch(container) or len(container) > 63):
        raise _bad(s, f"{container!r} is not a valid container name (lowercase letters, digits, '-')")
    return KubeTarget(kind, name, container)


def target_from_mirrord_path(path: dict[str, object]) -> str:
    """Turn mirrord's object form of a target path into the string form.

    mirrord accepts `{"deployment": "api", "container": "app"}` as well as
    `"deployment/api/container/app"`; we normalise to the string and parse that.
    """
    container = path.get("container")
    kinds = [k for k in path if k != "container"]
    if len(kinds) != 1 or not isinstance(path[kinds[0]], str):
        raise TargetError(
            f"target path {path!r} must name exactly one kind, e.g. {{\"pod\": \"NAME\"}}",
            f"use {ACCEPTED_FORMS}",
        )
    text = f"{kinds[0]}/{path[kinds[0]]}"
    if container is not None:
        text += f"/container/{container}"
    return text


def _bad(s: str, why: str) -> TargetError:
    return TargetError(f"cannot parse target {s!r}: {why}", f"use {ACCEPTED_FORMS}")
