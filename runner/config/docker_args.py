"""``container.cli_extra_args``: extra ``docker run`` flags, split between the two containers a
session runs locally.

The app container runs in the sidecar's network namespace, so flags about the network (publishing
a port, above all) belong to the sidecar: ``-p 8080:80`` publishes the app's port 80, since the
app listens in the sidecar's namespace. Everything else listed here applies to the app container.
A flag podtwin does not know, or one that would undo what the session is for (another network, a
hostname or DNS of its own), is refused in one line rather than dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from podtwin.runner.errors import ConfigError

KEY = "container.cli_extra_args"

# flag -> (SDK keyword, kind): how each supported app flag becomes a docker SDK argument
_APP_FLAGS: dict[str, tuple[str, str]] = {
    "-v": ("volumes", "list"), "--volume": ("volumes", "list"),
    "-l": ("labels", "map"), "--label": ("labels", "map"),
    "--cap-add": ("cap_add", "list"), "--cap-drop": ("cap_drop", "list"),
    "--device": ("devices", "list"), "--security-opt": ("security_opt", "list"),
    "--tmpfs": ("tmpfs", "tmpfs"), "--shm-size": ("shm_size", "value"),
    "-m": ("mem_limit", "value"), "--memory": ("mem_limit", "value"),
    "--cpus": ("nano_cpus", "cpus"), "--read-only": ("read_only", "flag"), "--init": ("init", "flag"),
}
_SIDECAR_FLAGS = ("-p", "--publish")
_NETWORK_FLAGS = ("--network", "--net", "-h", "--hostname", "--dns", "--dns-search", "--dns-option",
                  "--add-host", "--ip", "--ip6", "--mac-address", "--network-alias", "--link")
_PUBLISH = re.compile(r"^(?:(?:(?P<ip>[0-9.]+):)?(?P<host>\d*):)?(?P<port>\d+)(?:/(?P<proto>tcp|udp))?$")


@dataclass(frozen=True)
class ExtraRunArgs:
    ports: dict[str, object] = field(default_factory=dict)   # SDK ``ports`` for the sidecar
    app: dict[str, object] = field(default_factory=dict)     # SDK keywords for the app container

    @property
    def publishes(self) -> bool:
        return bool(self.ports)


def parse_extra_args(args: list[str]) -> ExtraRunArgs:
    """Split ``docker run`` flags (``-p 8080:80``, ``--publish=8080:80``, ``-v a:b``...) into the
    sidecar's published ports and the app container's settings; ConfigError for anything else."""
    ports: dict[str, object] = {}
    app: dict[str, object] = {}
    items = list(args)
    while items:
        item = items.pop(0)
        flag, eq, inline = item.partition("=") if item.startswith("--") else (item, "", "")
        if not flag.startswith("-"):
            raise ConfigError(f"{KEY}: {item!r} is not a flag",
                              "give flags and their values, e.g. [\"-p\", \"8080:80\"]")
        if flag in _NETWORK_FLAGS:
            raise ConfigError(f"{KEY}: {flag} is not allowed: the app lives in the target's network",
                              "remove it (use --network for a local network to reach)")
        kind = "publish" if flag in _SIDECAR_FLAGS else _APP_FLAGS.get(flag, (None, None))[1]
        if kind is None:
            raise ConfigError(f"{KEY}: {flag} is not supported",
                              "supported: " + ", ".join(sorted({*_SIDECAR_FLAGS, *_APP_FLAGS})))
        if kind == "flag":
            app[_APP_FLAGS[flag][0]] = True
            continue
        if eq:
            value = inline
        elif items:
            value = items.pop(0)
        else:
            raise ConfigError(f"{KEY}: {flag} needs a value", f"write [\"{flag}\", \"VALUE\"]")
        if kind == "publish":
            _publish(ports, value)
            continue
        name = _APP_FLAGS[flag][0]
        if kind == "list":
            app.setdefault(name, []).append(value)
        elif kind == "map":
            key, _, val = value.partition("=")
            app.setdefault(name, {})[key] = val
        elif kind == "tmpfs":
            path, _, options = value.partition(":")
            app.setdefault(name, {})[path] = options
        elif kind == "cpus":
            try:
                app[name] = int(float(value) * 1e9)
            except ValueError:
                raise ConfigError(f"{KEY}: --cpus {value!r} is not a number", "write e.g. --cpus 1.5") from None
        else:
            app[name] = value
    return ExtraRunArgs(ports, app)


def _publish(ports: dict[str, object], value: str) -> None:
    m = _PUBLISH.match(value)
    if not m:
        raise ConfigError(f"{KEY}: -p {value!r} is not [IP:][HOST_PORT:]PORT[/tcp|udp]",
                          "write e.g. -p 8080:80 or -p 127.0.0.1:8080:80")
    key = f"{m['port']}/{m['proto'] or 'tcp'}"
    host = int(m["host"]) if m["host"] else None
    if not 0 < int(m["port"]) < 65536 or (host is not None and not 0 < host < 65536):
        raise ConfigError(f"{KEY}: -p {value!r} has a port out of range", "ports are 1-65535")
    ports[key] = (m["ip"], host) if m["ip"] else host
