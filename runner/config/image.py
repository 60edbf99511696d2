"""The podtwin image's tag: what `podtwin images build` makes and every session runs (the
sidecar, and the agent unless agent.image names another). PODTWIN_IMAGE names another tag: a
registry copy, or a second work tree on one engine."""
from __future__ import annotations

import os

DEFAULT_IMAGE = "podtwin:dev"


def podtwin_image_name() -> str:
    return os.environ.get("PODTWIN_IMAGE") or DEFAULT_IMAGE
