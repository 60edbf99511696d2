"""Finding, reading and merging podtwin's settings: built-in defaults < profile < config file <
command line, validated by the models in ``config``. mirrord files work unchanged; the mirrord
keys podtwin does not support yet are reported as warnings instead of failing on them.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from podtwin.runner.config.models import PodtwinConfig
from podtwin.runner.errors import ConfigError

CONFIG_FILE_NAMES = (
    "podtwin.json", "podtwin.yaml", "podtwin.yml", "podtwin.toml",
    ".mirrord/mirrord.json", ".mirrord/mirrord.yaml", ".mirrord/mirrord.toml",
)

# mirrord keys podtwin accepts but does not act on yet: dropped with a warning, never silently.
UNSUPPORTED_MIRRORD_KEYS = (
    "accept_invalid_certificates", "baggage", "ci", "connect_tcp", "experimental",
    "external_proxy", "internal_proxy", "key", "operator", "pause", "profile",
    "sip_binaries", "skip_build_tools", "skip_extra_build_tools", "skip_processes", "skip_sip",
    "startup_retry", "telemetry", "traceparent", "use_proxy",
    "agent.check_out_of_pods", "agent.clean_iptables_on_start",
    "agent.disable_mesh_sidecar_injection",
    "agent.disabled_capabilities", "agent.dns", "agent.exclude_from_mesh", "agent.flush_connections",
    "agent.inject_headers", "agent.json_log", "agent.log_level", "agent.max_body_buffer_size",
    "agent.max_body_buffer_timeout", "agent.metrics", "agent.network_interface", "agent.nftables",
    "agent.priority_class", "agent.security_context", "agent.service_account",
    "container.cli_image", "container.cli_image_lib_path", "container.cli_prevent_cleanup",
    "container.cli_tls_path", "container.host_gateway_detection", "container.override_host_ip",
    "container.platform",
    "feature.copy_target", "feature.db_branches", "feature.hostname", "feature.magic",
    "feature.preview", "feature.split_queues",
    "feature.env.load_from_process", "feature.env.mapping", "feature.fs.readonly_file_buffer",
    "feature.network.ipv6", "feature.network.outgoing.unix_streams",
    "feature.network.incoming.https_delivery", "feature.network.incoming.ignore_localhost",
    "feature.network.incoming.listen_ports", "feature.network.incoming.on_concurrent_steal",
    "feature.network.incoming.tls_delivery",
)

# mirrord keys we refuse rather than ignore: dropping a traffic filter would mirror or steal
# more than the user asked for.
REFUSED_MIRRORD_KEYS = {
    "feature.network.incoming.http_filter.body_filter": "HTTP body filters are not supported yet",
    "feature.network.incoming.http_filter.header_filter_jq": "jq header filters are not supported yet",
    "feature.network.incoming.http_header_filter":
        "use http_filter.header_filter instead (mirrord's newer spelling)",
}

_HINT = "see docs/config.md or `podtwin config schema` for the accepted keys and values"

# mirrord renders its config files as Tera templates before parsing them; what users' files use
# of that is get_env, with or without a default. Other template syntax is named, not guessed at.
_GET_ENV = re.compile(r"""\{\{\s*get_env\(\s*name\s*=\s*(["'`])(?P<name>[^"'`]*)\1\s*"""
                      r"""(?:,\s*default\s*=\s*(["'`])(?P<default>[^"'`]*)\3\s*)?\)\s*\}\}""")
_TEMPLATE = re.compile(r"\{\{|\{%|\{#")
# a YAML document whose aliases expand past this many values is refused (an alias bomb):
# real config files have a few hundred
MAX_EXPANDED_VALUES = 100_000


def render_template(text: str, path: Path) -> str:
    """mirrord's ``{{ get_env(name="X", default="y") }}``: the variable's value, else the default,
    else a one-line error; any other template construct is refused by name."""
    def value(m: re.Match[str]) -> str:
        name, default = m.group("name"), m.group("default")
        found = os.environ.get(name, default)
        if found is None:
            raise ConfigError(f"{path}: {m.group(0)}: {name} is not set and has no default",
                              f'set {name}, or write get_env(name="{name}", default="...")')
        return found
    rendered = _GET_ENV.sub(value, text)
    leftover = _TEMPLATE.search(rendered)
    if leftover:
        line = rendered.count("\n", 0, leftover.start()) + 1
        raise ConfigError(f"{path}:{line}: template syntax other than {{{{ get_env(...) }}}} is not supported",
                          "replace it with a value, or with get_env(name=..., default=...)")
    return rendered


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds once YAML aliases are expanded, counted without expanding
    them (shared subtrees are counted once per reference, from a memo); stops past ``limit``."""
    memo: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in memo:
            return memo[id(node)]
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        memo[id(node)] = total
        return total
    return size(data)


def find_config_file(cwd: Path) -> Path | None:
    """The first of CONFIG_FILE_NAMES that exists in `cwd`."""
    return next((cwd / n for n in CONFIG_FILE_NAMES if (cwd / n).is_file()), None)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one JSON, YAML or TOML file into a dict; ConfigError with the line on bad syntax."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}",
                          "check the -f path") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                          "save it as UTF-8") from exc
    text = render_template(text, path)
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            if _expanded_size(data, MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
                raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values",
                                  "write the settings out; a config file needs no alias chains")
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}",
                              "use a .json, .yaml, .yml or .toml file")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}",
                          "fix the syntax") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}",
                          "fix the syntax") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", "fix the syntax") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path} is nested too deeply to be a config file", _HINT) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}", _HINT)
    return data


def _profiles_dir() -> Any:
    return resources.files("podtwin.runner") / "profiles"


def list_profiles() -> dict[str, str]:
    """Built-in profile names -> their one-line description."""
    found = {}
    for entry in _profiles_dir().iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            found[entry.name[:-5]] = data.get("description", "")
    return dict(sorted(found.items()))


def load_profile(name: str) -> dict[str, Any]:
    """The raw config fragment of a built-in profile."""
    available = list_profiles()
    if name not in available:
        raise ConfigError(f"unknown profile {name!r}",
                          f"available profiles: {', '.join(available) or 'none'}")
    return json.loads((_profiles_dir() / f"{name}.json").read_text(encoding="utf-8"))


def _strip_mirrord_only(data: dict[str, Any], source: str, warnings: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    data.pop("$schema", None)  # editor metadata, not a setting
    for dotted, why in REFUSED_MIRRORD_KEYS.items():
        if _pop(data, dotted):
            raise ConfigError(f"{source}: {dotted}: {why}",
                              "remove it, or express the filter with header/path/method")
    for dotted in UNSUPPORTED_MIRRORD_KEYS:
        if _pop(data, dotted):
            message = f"podtwin: {dotted} is not supported yet (ignored)"
            if message not in warnings:
                warnings.append(message)
    return data


def _pop(data: dict[str, Any], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part)  # type: ignore[assignment]
        if not isinstance(data, dict):
            return False
    if last not in data:
        return False
    del data[last]
    return True


def _validate(data: dict[str, Any], source: str) -> PodtwinConfig:
    try:
        return PodtwinConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        if first["type"] == "extra_forbidden":
            msg, hint = "unknown key (not a podtwin or mirrord setting)", f"check the spelling; {_HINT}"
        else:
            msg, hint = first["msg"].removeprefix("Value error, "), _HINT
        extra = len(errors) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
        raise ConfigError(f"{source}: {key or '(top level)'}: {msg}{more}", hint) from exc


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) in `top` replaces `base`."""
    out = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_maps else value
    return out


def load_config(path: Path | None, profile: str | None, cwd: Path,
                overrides: dict[str, Any] | None = None, discover: bool = True) -> tuple[PodtwinConfig, list[str]]:
    """Built-in defaults < profile < config file (-f, else found in cwd unless not ``discover``)
    < CLI overrides.

    Returns the config and the warnings for mirrord keys podtwin ignores.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if profile is not None:   # --profile '' is a mistake to name, not "no profile"
        layers.append((f"profile {profile!r}", load_profile(profile)))
    if path is not None:
        file: Path | None = Path(path) if Path(path).is_absolute() else cwd / path
        if not file.exists():
            raise ConfigError(f"config file {file} not found", "check the -f path")
        if not file.is_file():
            raise ConfigError(f"config file {file} is not a regular file", "give -f a JSON, YAML or TOML file")
    else:
        file = find_config_file(cwd) if discover else None
    if file is not None:
        layers.append((str(file), read_config_file(file)))
    if overrides:
        layers.append(("command line", overrides))

    warnings: list[str] = []
    merged: dict[str, Any] = {}
    for source, data in layers:
        data = _strip_mirrord_only(data, source, warnings)
        # Validate each layer alone so errors name the right file, then merge its canonical form,
        # so that a profile's `incoming: "steal"` and a file's `incoming: {ports: [80]}` combine.
        canonical = _validate(data, source).model_dump(exclude_unset=True)
        merged = deep_merge(merged, canonical)
    cfg = _validate(merged, " < ".join(s for s, _ in layers) or "defaults")

    if cfg.kubeconfig is not None:
        kubeconfig = Path(cfg.kubeconfig_path() or "")
        if not kubeconfig.is_absolute():
            cfg = cfg.model_copy(update={"kubeconfig": str(cwd / kubeconfig)})
    env = cfg.feature.env
    if env.env_file is not None and not env.env_file.is_absolute():
        env = env.model_copy(update={"env_file": cwd / env.env_file})
        cfg = cfg.model_copy(update={"feature": cfg.feature.model_copy(update={"env": env})})
    return cfg, warnings
