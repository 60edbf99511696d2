"""The compose project podtwin runs: the user's project, as ``docker compose config`` resolved it,
with each engaged service bridged to its target. Pure logic: a model (dict) in, a model out.

For an engaged service S, the project gains a service ``podtwin-S``, the session's sidecar, which
owns S's network namespace; S joins it (``network_mode: service:podtwin-S``) once it is healthy.
Docker refuses a hostname, DNS servers, extra hosts, published or exposed ports and network
aliases on a container that joins another's network, so those move to the sidecar, with S's
own name as an alias on each of its networks: other services still reach S by name. S keeps
everything else; it gains the target's environment for the keys it does not set itself (the
compose file wins, as Telepresence does) and the target's files at their real paths, except
where it declares a volume of its own on that path (the user's declaration wins).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from podtwin.runner.adapters.docker_engine import SidecarSpec as Sidecar   # a session's sidecar, as a service
from podtwin.runner.sidecar import READY_FILE

EXTENSION = "x-podtwin"
SIDECAR_PREFIX = "podtwin-"

# What Docker refuses on a container that joins another's network (``network_mode: service:``):
# moved to the sidecar, which owns the namespace.
MOVED_TO_SIDECAR = ("ports", "expose", "hostname", "domainname", "dns", "dns_search", "dns_opt",
                    "extra_hosts", "mac_address", "links")
# ...and what goes with the network itself.
DROPPED_FROM_SERVICE = ("networks", "network_mode", *MOVED_TO_SIDECAR)


@dataclass(frozen=True)
class Engaged:
    """What a session brings to its service: the sidecar, the target's hostname (the service's
    own wins), environment (the service's own values win) and files (source on the daemon's
    side, path in the app, writable), and labels that name the session on the service's
    container (so the session's guard finds it)."""

    sidecar: Sidecar
    hostname: str = ""
    env: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str, bool]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 60.0


def engaged_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that carry ``x-podtwin`` (a target at least, or the project's defaults'),
    with their extension merged over the project's top-level one."""
    defaults = model.get(EXTENSION) or {}
    out = {}
    for name, service in (model.get("services") or {}).items():
        if EXTENSION in service:
            own = service.get(EXTENSION)
            own = {} if own is None else own if isinstance(own, dict) else {"target": own}
            out[name] = {**defaults, **own}
    return out


def local_names(model: dict[str, Any]) -> list[str]:
    """Every name the project's services are reached by: service names, network aliases,
    container names, hostnames and extra hosts' names. They stay local in an engaged service."""
    names: set[str] = set()
    for name, service in (model.get("services") or {}).items():
        names.add(name)
        for key in ("container_name", "hostname"):
            if service.get(key):
                names.add(str(service[key]))
        networks = service.get("networks") or {}
        if isinstance(networks, dict):
            for net in networks.values():
                names.update(str(a) for a in ((net or {}).get("aliases") or []))
        names.update(_extra_host_names(service.get("extra_hosts")))
        names.update(str(link).split(":")[-1] for link in service.get("links") or [])
    return sorted(n.lower() for n in names)


def _extra_host_names(extra: Any) -> list[str]:
    if isinstance(extra, dict):
        return [str(k) for k in extra]
    return [str(e).replace("=", ":").split(":", 1)[0] for e in extra or []]


def sidecar_name(service: str) -> str:
    return SIDECAR_PREFIX + service


def check_service(name: str, service: dict[str, Any], model: dict[str, Any]) -> str | None:
    """Why an engaged service cannot be bridged (None if it can)."""
    mode = service.get("network_mode")
    if mode:
        return (f"service {name!r} has network_mode: {mode}; a bridged service joins podtwin's sidecar "
                "instead (remove network_mode, or remove x-podtwin from it)")
    if sidecar_name(name) in (model.get("services") or {}):
        return f"service {name!r}: the project already has a service named {sidecar_name(name)!r}"
    for other, svc in (model.get("services") or {}).items():
        if svc.get("network_mode") in (f"service:{name}", f"container:{service.get('container_name')}"):
            return (f"service {other!r} shares {name!r}'s network (network_mode: {svc['network_mode']}), which "
                    f"is podtwin's sidecar's once {name!r} is bridged; engage {other!r} instead, or neither")
    return None


def generate(model: dict[str, Any], engaged: dict[str, Engaged]) -> dict[str, Any]:
    """The project to run: ``model`` (compose's own ``config`` output) with every service in
    ``engaged`` bridged. ``profiles`` are dropped: the model holds the active services only."""
    out = {k: v for k, v in model.items() if k != EXTENSION}
    services: dict[str, Any] = {}
    for name, service in (model.get("services") or {}).items():
        service = {k: v for k, v in service.items() if k not in (EXTENSION, "profiles")}
        if name in engaged:
            sidecar, service = _bridge(name, service, engaged[name])
            services[sidecar_name(name)] = sidecar
        services[name] = service
    out["services"] = services
    return out


def _bridge(name: str, service: dict[str, Any], e: Engaged) -> tuple[dict[str, Any], dict[str, Any]]:
    s = e.sidecar
    networks = service.get("networks")
    if not isinstance(networks, dict) or not networks:   # compose's config names `default` when unset
        networks = {"default": None}
    sidecar_networks = {}
    for net, opts in networks.items():
        opts = dict(opts or {})
        # container_name too: Docker resolves a container's name only on its own networks
        opts["aliases"] = _unique([name, *([service["container_name"]] if service.get("container_name") else []),
                                   *(opts.get("aliases") or [])])
        sidecar_networks[net] = opts
    sidecar: dict[str, Any] = {
        "image": s.image,
        "command": list(s.command),
        "container_name": s.container_name,
        "labels": dict(s.labels),
        "cap_drop": ["ALL"],
        "cap_add": list(s.cap_add),
        "networks": sidecar_networks,
        "init": False,
        "restart": "no",
        "attach": False,   # its lines are podtwin's business; a failure is reported by podtwin
        "volumes": [_bind(src, dst, prop) for src, dst, prop in s.binds],
        # The sidecar is ready once the link, the network rules and the mounts are: until then
        # failures do not count (start_period); after that, a few in a row make it unhealthy.
        "healthcheck": {"test": ["CMD", "test", "-e", READY_FILE], "interval": "250ms",
                        "timeout": "5s", "retries": 3, "start_period": f"{int(e.startup_timeout)}s"},
    }
    if s.devices:
        sidecar["devices"] = list(s.devices)
    if s.security_opt:
        sidecar["security_opt"] = list(s.security_opt)
    if s.sysctls:
        sidecar["sysctls"] = dict(s.sysctls)
    for key in MOVED_TO_SIDECAR:
        if key in service:
            sidecar[key] = service[key]
    if "hostname" not in sidecar and e.hostname:
        sidecar["hostname"] = e.hostname

    app = {k: v for k, v in service.items() if k not in DROPPED_FROM_SERVICE}
    app["network_mode"] = f"service:{sidecar_name(name)}"
    depends = app.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {d: {"condition": "service_started"} for d in depends}
    app["depends_on"] = {**depends, sidecar_name(name): {"condition": "service_healthy"}}
    env = dict(service.get("environment") or {})
    for key, value in e.env.items():
        if key not in env:
            env[key] = escape(value)
    if env:
        app["environment"] = env
    if e.labels:
        app["labels"] = {**(service.get("labels") or {}), **e.labels}
    volumes = list(service.get("volumes") or [])
    declared = {_target(v) for v in volumes} | {str(t).split(":")[0].rstrip("/") for t in _list(service.get("tmpfs"))}
    for source, path, writable in e.files:
        if path.rstrip("/") in declared:
            continue   # the user's declaration wins
        volumes.append({**_bind(source, path, "rslave"), "read_only": not writable})
    if volumes:
        app["volumes"] = volumes
    return sidecar, app


def escape(value: str) -> str:
    """A value compose must take literally: ``$`` starts an interpolation in a compose file."""
    return value.replace("$", "$$")


def _bind(source: str, target: str, propagation: str) -> dict[str, Any]:
    bind: dict[str, Any] = {"type": "bind", "source": source, "target": target}
    if propagation:
        bind["bind"] = {"propagation": propagation}
    return bind


def _target(volume: Any) -> str:
    if isinstance(volume, dict):
        return str(volume.get("target", "")).rstrip("/")
    parts = str(volume).split(":")
    return (parts[1] if len(parts) > 1 else parts[0]).rstrip("/")


def _list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value or [])


def _unique(items: list[Any]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if str(item) not in seen:
            seen.append(str(item))
    return seen
