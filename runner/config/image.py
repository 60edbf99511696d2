"""The podtwin images' names.

* ``podtwin_image_name()``: the local image `podtwin images build` makes for the sidecar (and
  compose's sidecar services): ``podtwin:<version>``. PODTWIN_IMAGE names another tag: a second
  work tree on one engine, say.
* ``agent_image_name()``: the agent's small image, built beside it from its files: the same name
  with ``-agent`` (``podtwin-agent:<version>``). A Docker target's agent runs it (``agent.image``
  names another).
* ``cluster_agent_image()``: the agent's image in a Kubernetes cluster, which the cluster's nodes
  must be able to pull: ``agent.image`` wins, then PODTWIN_AGENT_IMAGE, then the release's name,
  ``ghcr.io/podtwin/podtwin-agent:<version>``. `podtwin images build` tags the local agent image
  with that name too, so `podtwin images load` puts it on a local cluster's nodes under it, and
  `podtwin images push REGISTRY/REPO` copies it to a registry the cluster can reach.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from podtwin.runner.errors import ConfigError

DEV_IMAGE = "podtwin:dev"   # a checkout's habit: also tagged by every build
RELEASE_REPOSITORY = "ghcr.io/podtwin/podtwin-agent"


def podtwin_image_name() -> str:
    """The local image sessions run the sidecar on: ``podtwin:<version>``, or PODTWIN_IMAGE."""
    return os.environ.get("PODTWIN_IMAGE") or f"podtwin:{podtwin_version()}"


def agent_image_name(image: str | None = None) -> str:
    """The agent image built beside ``image`` (default: the sessions' podtwin image):
    ``podtwin:0.1.0`` -> ``podtwin-agent:0.1.0``, ``registry:5000/team/pt`` -> ``.../pt-agent``."""
    image = image or podtwin_image_name()
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        raise ConfigError(f"{image}: an image named by digest has no agent image beside it",
                          "name the podtwin image by tag (PODTWIN_IMAGE=name:tag), or set agent.image")
    name, sep, tag = image.rpartition(":") if ":" in last else (image, "", "")
    return f"{name}-agent{sep}{tag}"


def podtwin_version() -> str:
    try:
        return version("podtwin")
    except PackageNotFoundError:   # a source tree on sys.path, not installed
        return "0.0.0"


def release_image_name() -> str:
    """The agent's image as a release of this version publishes it; the local agent image is
    also tagged with it."""
    return f"{RELEASE_REPOSITORY}:{podtwin_version()}"


def cluster_agent_image() -> str:
    return os.environ.get("PODTWIN_AGENT_IMAGE") or release_image_name()
