"""Config models and loader: formats, discovery, merge order, mirrord compatibility, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from podtwin.runner.config.models import PodtwinConfig, config_schema
from podtwin.runner.config.loader import CONFIG_FILE_NAMES, deep_merge, list_profiles, load_config
from podtwin.runner.errors import ConfigError
from podtwin.runner.targets import DockerTarget, KubeTarget

MIRRORD_SEED = {"target": "deployment/client", "feature": {"network": {"incoming": "steal"}}}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, **kw: object) -> PodtwinConfig:
    path, profile = kw.pop("path", None), kw.pop("profile", None)
    cfg, warnings = load_config(path, profile, tmp_path, {})  # type: ignore[arg-type]
    assert warnings == []
    return cfg


def test_defaults_without_any_source(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.target_spec() is None
    assert cfg.feature.network.incoming.mode == "mirror"
    assert cfg.feature.network.outgoing.tcp and cfg.feature.network.outgoing.udp
    assert cfg.feature.network.dns.enabled and cfg.feature.env.enabled
    assert cfg.agent.image_pull_policy == "IfNotPresent" and cfg.container.cli_extra_args == []


def test_mirrord_seed_file_parses(tmp_path: Path) -> None:
    write(tmp_path / ".mirrord" / "mirrord.json", json.dumps(MIRRORD_SEED))
    cfg = load(tmp_path)
    assert cfg.target_spec() == KubeTarget("deployment", "client")
    assert cfg.feature.network.incoming.mode == "steal"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("podtwin.json", json.dumps(MIRRORD_SEED)),
        ("podtwin.yaml", "target: deployment/client\nfeature:\n  network:\n    incoming: steal\n"),
        ("podtwin.yml", "target: deployment/client\nfeature: {network: {incoming: steal}}\n"),
        ("podtwin.toml", 'target = "deployment/client"\n[feature.network]\nincoming = "steal"\n'),
        (".mirrord/mirrord.yaml", "target: deployment/client\nfeature:\n  network:\n    incoming: steal\n"),
        (".mirrord/mirrord.toml", 'target = "deployment/client"\n[feature.network]\nincoming = "steal"\n'),
    ],
)
def test_every_format_and_discovered_name_loads(tmp_path: Path, name: str, text: str) -> None:
    write(tmp_path / name, text)
    cfg = load(tmp_path)
    assert str(cfg.target_spec()) == "deployment/client"
    assert cfg.feature.network.incoming.mode == "steal"


def test_discovery_takes_the_first_name_found(tmp_path: Path) -> None:
    write(tmp_path / ".mirrord" / "mirrord.json", '{"target": "pod/from-mirrord"}')
    write(tmp_path / "podtwin.toml", 'target = "pod/from-toml"')
    assert str(load(tmp_path).target_spec()) == "pod/from-toml"
    write(tmp_path / "podtwin.yaml", "target: pod/from-yaml")
    assert str(load(tmp_path).target_spec()) == "pod/from-yaml"
    assert CONFIG_FILE_NAMES[0] == "podtwin.json"


def test_explicit_file_wins_over_discovery_and_is_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.json", '{"target": "pod/discovered"}')
    write(tmp_path / "conf" / "dev.yaml", "target: container/dev-db")
    cfg = load(tmp_path, path=Path("conf/dev.yaml"))
    assert cfg.target_spec() == DockerTarget("dev-db")


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Path("nope.json"), None, tmp_path, {})


def test_merge_order_defaults_profile_file_cli(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.yaml", """
target: deployment/api
feature:
  env: {override: {A: file, B: file}}
  network:
    incoming: {ports: [8080]}
    dns: false
""")
    overrides = {"feature": {"env": {"override": {"B": "cli"}}}, "target": {"namespace": "dev"}}
    cfg, warnings = load_config(None, "steal", tmp_path, overrides)
    assert warnings == []
    incoming = cfg.feature.network.incoming
    assert incoming.mode == "steal"  # from the profile's shorthand, kept although the file set ports
    assert incoming.ports == [8080]  # from the file
    assert cfg.feature.network.dns.enabled is False  # file over default
    assert cfg.feature.env.override == {"A": "file", "B": "cli"}  # dicts merge key by key, cli wins
    assert cfg.target.path == "deployment/api" and cfg.target.namespace == "dev"


def test_file_beats_profile_and_cli_beats_file(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.json", '{"feature": {"network": {"incoming": "mirror"}}}')
    cfg, _ = load_config(None, "steal", tmp_path, {})
    assert cfg.feature.network.incoming.mode == "mirror"
    cfg, _ = load_config(None, "steal", tmp_path, {"feature": {"network": {"incoming": {"mode": "off"}}}})
    assert cfg.feature.network.incoming.mode == "off"


def test_lists_are_replaced_not_appended() -> None:
    assert deep_merge({"a": {"l": [1, 2], "k": 1}}, {"a": {"l": [3]}}) == {"a": {"l": [3], "k": 1}}


def test_unknown_profile_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, "stael", tmp_path, {})
    assert "stael" in info.value.message
    for name in ("steal", "mirror", "outgoing-only"):
        assert name in info.value.hint


def test_every_profile_is_valid_and_described(tmp_path: Path) -> None:
    profiles = list_profiles()
    assert {"steal", "mirror", "outgoing-only", "local-dns", "env-only"} <= set(profiles)
    for name, description in profiles.items():
        cfg = load(tmp_path, profile=name)
        assert description and cfg.description == description
    assert load(tmp_path, profile="outgoing-only").feature.network.incoming.mode == "off"
    env_only = load(tmp_path, profile="env-only").feature.network
    assert not env_only.outgoing.tcp and not env_only.dns.enabled


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "podtwin.yaml", "feature:\n  network:\n    outgoing:\n      tpc: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(None, None, tmp_path, {})
    assert str(cfg_file) in info.value.message
    assert "feature.network.outgoing.tpc" in info.value.message
    assert "unknown key" in info.value.message and info.value.hint


def test_unsupported_mirrord_keys_warn_and_are_ignored(tmp_path: Path) -> None:
    write(tmp_path / ".mirrord" / "mirrord.json", json.dumps({
        **MIRRORD_SEED,
        "operator": True,
        "agent": {"flush_connections": True, "ttl": 5, "log_level": "debug"},
        "feature": {"network": {"incoming": {"mode": "steal", "on_concurrent_steal": "override"}},
                    "copy_target": {"scale_down": True}, "hostname": True},
        "experimental": {"tcp_ping4_mock": True},
        "container": {"cli_image": "x", "cli_extra_args": ["-p", "8080:80"]},
    }))
    cfg, warnings = load_config(None, None, tmp_path, {})
    assert "podtwin: operator is not supported yet (ignored)" in warnings
    for key in ("agent.flush_connections", "agent.log_level", "feature.copy_target", "feature.hostname",
                "experimental", "container.cli_image", "feature.network.incoming.on_concurrent_steal"):
        assert f"podtwin: {key} is not supported yet (ignored)" in warnings
    assert len(warnings) == len(set(warnings)) == 8
    assert cfg.agent.ttl == 5 and cfg.container.cli_extra_args == ["-p", "8080:80"]
    assert cfg.feature.network.incoming.mode == "steal"


def test_dropping_a_traffic_filter_is_refused_not_ignored(tmp_path: Path) -> None:
    overrides = {"feature": {"network": {"incoming": {"http_filter": {"body_filter": {"body": "json"}}}}}}
    with pytest.raises(ConfigError, match="body filters"):
        load_config(None, None, tmp_path, overrides)


def test_schema_key_is_accepted(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.json", '{"$schema": "./schema.json", "target": "pod/a"}')
    assert str(load(tmp_path).target_spec()) == "pod/a"


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("podtwin.json", '{\n  "target": "pod/a",\n  oops\n}', ":3:"),
        ("podtwin.yaml", "target: pod/a\nfeature: [\n", ":3:"),
        ("podtwin.toml", 'target = "pod/a"\nfeature = \n', "line 2"),
    ],
)
def test_parse_errors_name_the_file_and_line(tmp_path: Path, name: str, text: str, where: str) -> None:
    write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_config(None, None, tmp_path, {})
    assert name in info.value.message and where in info.value.message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(None, None, tmp_path, {})


def at(dotted: str, value: object) -> dict:
    """`at("a.b", 1)` -> `{"a": {"b": 1}}`: one setting given on the command line."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value  # type: ignore[return-value]


NET = "feature.network"


@pytest.mark.parametrize(
    ("setting", "value", "key", "text"),
    [
        ("feature.env", {"include": "A", "exclude": "B"}, "feature.env", "mutually exclusive"),
        ("feature.env.include", 5, "feature.env.include", ""),
        (f"{NET}.incoming", "grab", f"{NET}.incoming.mode", "steal"),
        (f"{NET}.incoming", {"ports": [80], "ignore_ports": [81]}, f"{NET}.incoming", "mutually exclusive"),
        (f"{NET}.incoming.port_mapping", [[1, 70000]], f"{NET}.incoming.port_mapping[0][1]", ""),
        (f"{NET}.incoming.http_filter", {"header_filter": "a", "path_filter": "b"},
         f"{NET}.incoming.http_filter", "only one"),
        (f"{NET}.outgoing.filter", {"remote": ["a"], "local": ["b"]}, f"{NET}.outgoing.filter", "exactly one"),
        (f"{NET}.outgoing.filter.local", ["10.0.0.0/8:99999"], f"{NET}.outgoing.filter", "10.0.0.0/8:99999"),
        (f"{NET}.dns.filter.local", ["tcp://a"], f"{NET}.dns.filter", "protocol"),
        ("feature.fs", "remote", "feature.fs.mode", ""),
        ("target", "rollout/api", "target.path", "Rollouts"),
        ("agent.image_pull_policy", "Sometimes", "agent.image_pull_policy", ""),
    ],
)
def test_validation_errors_are_one_line_with_the_key(
    tmp_path: Path, setting: str, value: object, key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, None, tmp_path, at(setting, value))
    assert "\n" not in info.value.one_line()
    assert info.value.message.startswith(f"command line: {key}: ")
    assert text in info.value.message and info.value.hint


def test_conflict_across_layers_names_all_sources(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "podtwin.json", '{"feature": {"env": {"include": "A"}}}')
    with pytest.raises(ConfigError) as info:
        load_config(None, None, tmp_path, {"feature": {"env": {"exclude": "B"}}})
    assert f"{cfg_file} < command line: feature.env: " in info.value.message
    # a higher layer can clear the lower one's value with null
    cfg, _ = load_config(None, None, tmp_path, {"feature": {"env": {"include": None, "exclude": "B"}}})
    assert cfg.feature.env.exclude == ["B"] and cfg.feature.env.include is None


def test_shorthands_expand_like_mirrord() -> None:
    cfg = PodtwinConfig.model_validate({
        "target": {"path": {"deployment": "api", "container": "app"}, "namespace": "shop"},
        "feature": {"env": False, "fs": "write", "network": {"incoming": False, "outgoing": False, "dns": False}},
    })
    assert cfg.target_spec() == KubeTarget("deployment", "api", "app") and cfg.target.namespace == "shop"
    assert cfg.feature.env.enabled is False and cfg.feature.fs.mode == "write"
    net = cfg.feature.network
    assert net.incoming.mode == "off" and not net.outgoing.tcp and not net.outgoing.udp and not net.dns.enabled
    off = PodtwinConfig.model_validate({"feature": {"network": False, "fs": False}}).feature
    assert off.network.incoming.mode == "off" and not off.network.dns.enabled and off.fs.mode == "local"


def test_yaml_bare_off_means_mode_off(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.yaml", "feature:\n  network:\n    incoming:\n      mode: off\n")
    assert load(tmp_path).feature.network.incoming.mode == "off"


def test_env_patterns_and_yaml_values_are_normalised(tmp_path: Path) -> None:
    write(tmp_path / "podtwin.yaml", "feature:\n  env:\n    include: 'A;B_*; '\n    override: {PORT: 8080, DEBUG: true}\n    env_file: .env\n")
    env = load(tmp_path).feature.env
    assert env.include == ["A", "B_*"]
    assert env.override == {"PORT": "8080", "DEBUG": "true"}
    assert env.env_file == tmp_path / ".env"  # relative to the working directory


def test_agent_fields_with_mirrord_meanings() -> None:
    agent = PodtwinConfig.model_validate({"agent": {
        "image": {"registry": "internal.repo/podtwin-agent", "tag": "1.2"},
        "ttl": 30, "startup_timeout": 120, "communication_timeout": 10, "namespace": "tools",
        "ephemeral": True, "privileged": True, "labels": {"team": "x"}, "annotations": {"a": "b"},
        "image_pull_policy": "Always", "image_pull_secrets": [{"name": "regcred"}],
        "tolerations": [{"operator": "Exists"}], "node_selector": {"kubernetes.io/os": "linux"},
        "resources": {"requests": {"cpu": "1m"}, "limits": {"memory": "100Mi"}},
    }}).agent
    assert agent.image == "internal.repo/podtwin-agent:1.2"
    assert agent.image_pull_secrets[0].name == "regcred" and agent.resources and agent.resources.limits == {"memory": "100Mi"}


def test_incoming_and_fs_objects_parse() -> None:
    feature = PodtwinConfig.model_validate({"feature": {
        "network": {"incoming": {"mode": "steal", "port_mapping": [[9333, 80]], "ignore_ports": [9999],
                                 "http_filter": {"any_of": [{"header": "^x-user: me$"}, {"path": "^/api"}], "ports": [80]}}},
        "fs": {"mode": "localwithoverrides", "read_only": ".+\\.yaml", "not_found": ["\\.config/gcloud"],
               "mapping": {"^/tmp/(.*)": "/var/tmp/$1"}},
    }}).feature
    incoming = feature.network.incoming
    assert incoming.port_mapping == [(9333, 80)] and incoming.ignore_ports == [9999]
    assert incoming.http_filter and incoming.http_filter.any_of and incoming.http_filter.any_of[1].path == "^/api"
    assert feature.fs.read_only == [".+\\.yaml"] and feature.fs.mode == "localwithoverrides"


def test_config_is_frozen() -> None:
    cfg = PodtwinConfig()
    with pytest.raises(Exception):
        cfg.kube_context = "x"  # type: ignore[misc]


def test_schema_documents_every_field() -> None:
    schema = config_schema()
    assert schema["additionalProperties"] is False
    assert "target" in schema["properties"] and "$schema" in schema["properties"]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), f"{name} has no description"
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    json.dumps(schema)  # serialisable


def test_docs_list_every_key() -> None:
    from pydantic import BaseModel

    docs = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{name}"
            assert f"`{dotted}`" in docs, f"docs/config.md does not mention {dotted}"
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):  # a section: its keys must be listed too
                walk(type(default), f"{dotted}.")

    walk(PodtwinConfig, "")


# -- files that are not config files: one line each, never a traceback ---------------------------
@pytest.mark.parametrize("name,text", [("c.json", '{"target": "container/x"}'), ("c.yaml", "target: container/x\n"),
                                       ("c.toml", 'target = "container/x"\n')])
def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-16")
    with pytest.raises(ConfigError) as err:
        load_config(Path(name), None, tmp_path)
    assert "is not UTF-8 text" in err.value.message and name in err.value.message
    assert err.value.hint == "save it as UTF-8"


@pytest.mark.parametrize("name,text", [("deep.json", "[" * 5000 + "]" * 5000),
                                       ("deep2.json", '{"a":' * 5000 + "1" + "}" * 5000),
                                       ("deep.yaml", "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 3000)))])
def test_a_file_nested_thousands_deep_is_refused(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Path(name), None, tmp_path)
    assert err.value.message == f"{tmp_path / name} is nested too deeply to be a config file"


def test_a_device_or_fifo_is_not_a_config_file(tmp_path: Path) -> None:
    import os
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (Path("/dev/null"), fifo):
        with pytest.raises(ConfigError) as err:
            load_config(path, None, tmp_path)
        assert "is not a regular file" in err.value.message


@pytest.mark.parametrize("config,key", [
    ({"feature": {"network": {"outgoing": {"tcp": "yes"}}}}, "feature.network.outgoing.tcp"),
    ({"agent": {"startup_timeout": True}}, "agent.startup_timeout"),
    ({"agent": {"startup_timeout": 1e30}}, "agent.startup_timeout"),
    ({"agent": {"startup_timeout": 3601}}, "agent.startup_timeout"),
    ({"agent": {"communication_timeout": "10"}}, "agent.communication_timeout"),
    ({"agent": {"ephemeral": 1}}, "agent.ephemeral"),
    ({"feature": {"network": {"incoming": {"mode": "steal", "ports": [True]}}}}, "feature.network.incoming.ports[0]"),
])
def test_values_of_the_wrong_type_or_out_of_bounds_are_refused(tmp_path: Path, config: dict, key: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        load_config(Path("c.json"), None, tmp_path)
    assert f": {key}: " in err.value.message, err.value.message


@pytest.mark.parametrize("incoming,key,says", [
    ({"mode": "steal", "http_filter": {"header_filter": "("}}, "feature.network.incoming.http_filter.header_filter", "not a valid regex"),
    ({"mode": "steal", "http_filter": {"path_filter": "[z-a]"}}, "feature.network.incoming.http_filter.path_filter", "not a valid regex"),
    ({"mode": "steal", "http_filter": {"method_filter": ""}}, "feature.network.incoming.http_filter.method_filter", "non-empty token"),
    ({"mode": "steal", "http_filter": {"any_of": [{"header": "x-a"}, {"path": "(("}]}},
     "feature.network.incoming.http_filter.any_of[1].path", "not a valid regex"),
    ({"mode": "steal", "port_mapping": [[8080, 80], [9090, 80]]}, "feature.network.incoming", "remote port 80"),
])
def test_http_filters_and_port_mappings_are_checked_at_load(tmp_path: Path, incoming: dict, key: str, says: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    with pytest.raises(ConfigError) as err:
        load_config(Path("c.json"), None, tmp_path)
    assert f": {key}: " in err.value.message and says in err.value.message, err.value.message


def test_an_empty_profile_name_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile ''"):
        load_config(None, "", tmp_path)
