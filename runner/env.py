"""Which environment variables the local container gets: the target's, filtered (mirrord semantics).

Layers, lowest first (a later layer wins):

1. the target's variables, kept by `include` or dropped by `exclude` (never both);
   a few variables that describe the *image* or the *host*, not the workload (`NEVER_COPIED`),
   are dropped unless `include` names them exactly;
2. `env_file` entries (KEY=VALUE lines);
3. `unset`: names removed from the result so far (case-insensitive, as in mirrord);
4. `override` values;
5. `-e NAME=VALUE` given on the podtwin command line.

`unset` sits below `override` and `-e` on purpose: a value you typed yourself always wins.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from podtwin.runner.errors import ConfigError

# Dropped from the target's environment unless `include` lists them by exact name. The local
# image is run unchanged, so its own values must survive:
# - PATH, and the toolchain paths mirrord also drops (JAVA_HOME, CLASSPATH, JAVA_EXE, PYTHONPATH):
#   the remote image's paths may not exist in the local image, and the binary would not start;
# - HOME: belongs to the image's user; a wrong HOME breaks caches and config lookups;
# - HOSTNAME: Docker sets it to the local container's own name; copying the pod's would make the
#   app believe it has a hostname it cannot resolve locally;
# - HOMEPATH: mirrord's Windows counterpart of HOME, kept for parity.
NEVER_COPIED = frozenset(
    {"PATH", "HOME", "HOSTNAME", "HOMEPATH", "JAVA_HOME", "JAVA_EXE", "CLASSPATH", "PYTHONPATH"}
)


def split_patterns(value: str | Iterable[str] | None) -> list[str]:
    """`"A;B_*"` or `["A", "B_*"]` -> `["A", "B_*"]` (empties dropped)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in item.split(";") if p.strip()]


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    # Only `*` (any run) and `?` (one character) are special, as in mirrord; everything else is
    # literal, so `[` in a name cannot turn into a character class the way fnmatch would.
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Case-sensitive wildcard match of one variable name against any pattern."""
    return any(_compile(p).fullmatch(name) for p in patterns)


def read_env_file(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines: `#` comments, blank lines, `export ` prefixes and matching quotes
    around the value are accepted (the dotenv conventions mirrord's env_file follows)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read env_file {path}: {exc.strerror or exc}",
                          "fix feature.env.env_file or create the file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"env_file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                          "save it as UTF-8") from exc
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE, got {raw.strip()!r}",
                              "each line of an env_file is NAME=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def apply_env(
    remote: Mapping[str, str],
    env_cfg: Any,
    cli_env: Mapping[str, str] | None = None,
    *,
    env_file_values: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for the local container (see the module doc for the layer order).

    `env_cfg` is `feature.env` of a PodtwinConfig. `env_file_values` lets a caller that already
    read the env file pass its contents; otherwise `env_cfg.env_file` is read here.
    """
    result: dict[str, str] = {}
    if getattr(env_cfg, "enabled", True):
        include = split_patterns(env_cfg.include)
        exclude = split_patterns(env_cfg.exclude)
        exact = set(include)  # names that bypass NEVER_COPIED
        for name, value in remote.items():
            if include and not matches_any(name, include):
                continue
            if exclude and matches_any(name, exclude):
                continue
            if name in NEVER_COPIED and name not in exact:
                continue
            result[name] = value

    if env_file_values is None and env_cfg.env_file is not None:
        env_file_values = read_env_file(Path(env_cfg.env_file))
    result.update(env_file_values or {})

    gone = {n.upper() for n in split_patterns(env_cfg.unset)}
    result = {k: v for k, v in result.items() if k.upper() not in gone}

    result.update(env_cfg.override or {})
    result.update(cli_env or {})
    check_sizes(result)
    return result


# Linux refuses to start a program with one environment string over 32 pages (MAX_ARG_STRLEN);
# the app would fail with "argument list too long", naming nothing.
MAX_ENV_STRING = 32 * 4096


def check_sizes(env: Mapping[str, str]) -> None:
    """One line naming the variable that no program could be started with."""
    for name, value in env.items():
        size = len(name.encode()) + len(value.encode()) + 2   # NAME=VALUE and its NUL
        if size > MAX_ENV_STRING:
            raise ConfigError(f"environment variable {name} is {size:,} bytes; Linux starts no program with "
                              f"one over {MAX_ENV_STRING:,}",
                              "shorten it, or pass the data in a file (-v) instead")
