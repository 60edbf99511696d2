"""The agent's small image: its name beside the podtwin image's, and what goes into it."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from podtwin.runner.config.image import agent_image_name
from podtwin.runner.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_the_agent_image_is_named_beside_the_podtwin_image():
    assert agent_image_name("podtwin:0.1.0") == "podtwin-agent:0.1.0"
    assert agent_image_name("podtwin:dev") == "podtwin-agent:dev"
    assert agent_image_name("registry:5000/team/pt:1.2") == "registry:5000/team/pt-agent:1.2"
    assert agent_image_name("registry:5000/team/pt") == "registry:5000/team/pt-agent"
    with pytest.raises(ConfigError, match="by digest"):
        agent_image_name("podtwin@sha256:" + "0" * 64)


def test_the_image_carries_every_third_party_package_the_agent_imports():
    """images/agent_rootfs.py copies AGENT_REQUIREMENTS (and their own requirements) only: an
    import of anything else in podtwin.agent would fail in the agent's image."""
    sys.path.insert(0, str(REPO / "images"))
    try:
        from agent_rootfs import AGENT_REQUIREMENTS
    finally:
        sys.path.pop(0)
    imported = set()
    for path in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("podtwin", "__future__")}
    assert third_party == set(AGENT_REQUIREMENTS), third_party
