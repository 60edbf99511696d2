"""Shapes of real users' mirrord files that podtwin loads as mirrord does (issue #13): the target
object without its `path` wrapper, Tera's get_env templates, the top-level kubeconfig key; and
what a hostile file cannot do (an alias bomb)."""
from __future__ import annotations

import pytest

from podtwin.runner.config.loader import load_config
from podtwin.runner.errors import ConfigError


def load(tmp_path, text: str, name: str = "mirrord.json"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, None, tmp_path)


@pytest.mark.parametrize("target,expected", [
    ('{"deployment": "api", "container": "app"}', "deployment/api/container/app"),
    ('{"stateful_set": "db"}', "statefulset/db"),
    ('{"path": {"pod": "p"}, "namespace": "ns"}', "pod/p"),
    ('"deploy/api"', "deployment/api"),
])
def test_target_shapes(tmp_path, target, expected):
    cfg, _ = load(tmp_path, '{"target": %s}' % target)
    assert str(cfg.target_spec()) == expected


def test_target_object_with_two_kinds_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="exactly one kind"):
        load(tmp_path, '{"target": {"deployment": "a", "pod": "b"}}')


def test_get_env_templates(tmp_path, monkeypatch):
    monkeypatch.setenv("PT_NS", "staging")
    monkeypatch.delenv("PT_MISSING", raising=False)
    cfg, _ = load(tmp_path, '{"target": {"path": "deploy/api", "namespace": "{{ get_env(name="PT_NS") }}"},'
                            ' "agent": {"namespace": "{{get_env(name=\'PT_MISSING\', default=\'dev\')}}"}}')
    assert cfg.target.namespace == "staging" and cfg.agent.namespace == "dev"
    with pytest.raises(ConfigError, match="PT_MISSING is not set and has no default"):
        load(tmp_path, '{"target": "{{ get_env(name="PT_MISSING") }}"}')
    with pytest.raises(ConfigError, match=r"mirrord.json:2: template syntax other than"):
        load(tmp_path, '{"target": "deploy/api",\n "x": "{% if true %}"}')


def test_yaml_templates_too(tmp_path, monkeypatch):
    monkeypatch.setenv("PT_TARGET", "pod/p")
    cfg, _ = load(tmp_path, 'target: "{{ get_env(name="PT_TARGET") }}"\n', "mirrord.yaml")
    assert str(cfg.target_spec()) == "pod/p"


def test_top_level_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, warnings = load(tmp_path, '{"kubeconfig": "~/kube/config"}')
    assert cfg.kubeconfig_path() == str(tmp_path / "kube" / "config") and not warnings
    cfg, _ = load(tmp_path, '{"kubeconfig": "rel/config"}')
    assert cfg.kubeconfig_path() == str(tmp_path / "rel" / "config")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]")
    lines.append("feature: {fs: {read_only: *a11}}")
    with pytest.raises(ConfigError, match="aliases expand to more than"):   # before any value is expanded
        load(tmp_path, "\n".join(lines), "mirrord.yaml")
