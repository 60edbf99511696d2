"""The podtwin image's names.

* ``podtwin_image_name()``: the local image `podtwin images build` makes and every session runs
  on this machine (the sidecar, and a Docker target's agent): ``podtwin:<version>``.
  PODTWIN_IMAGE names another tag: a second work tree on one engine, say.
* ``cluster_agent_image()``: the agent's image in a Kubernetes cluster, which the cluster's nodes
  must be able to pull: ``agent.image`` wins, then PODTWIN_AGENT_IMAGE, then the release's name,
  ``ghcr.io/podtwin/podtwin:<version>``. `podtwin images build` tags the local image with that
  name too, so `podtwin images load` puts it on a local cluster's nodes under it, and
  `podtwin images push REGISTRY/REPO` copies it to a registry the cluster can reach.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

DEV_IMAGE = "podtwin:dev"   # a checkout's habit: also tagged by every build
RELEASE_REPOSITORY = "ghcr.io/podtwin/podtwin"


def podtwin_image_name() -> str:
    """The local image sessions run: ``podtwin:<version>``, or PODTWIN_IMAGE."""
    return os.environ.get("PODTWIN_IMAGE") or f"podtwin:{podtwin_version()}"


def podtwin_version() -> str:
    try:
        return version("podtwin")
    except PackageNotFoundError:   # a source tree on sys.path, not installed
        return "0.0.0"


def release_image_name() -> str:
    """What a release of this version publishes, and the local build is also tagged as."""
    return f"{RELEASE_REPOSITORY}:{podtwin_version()}"


def cluster_agent_image() -> str:
    return os.environ.get("PODTWIN_AGENT_IMAGE") or release_image_name()
