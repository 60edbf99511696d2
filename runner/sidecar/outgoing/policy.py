"""Which outgoing connections and DNS queries go through the target, and which stay local.

Pure decision logic, fed by `feature.network.outgoing` and `feature.network.dns` (mirrord's
semantics). The sidecar's proxy asks `OutgoingFilter.decide()` per connection and
`DnsFilter.decide()` per query; `OutgoingFilter.kernel_rules()` tells it which decisions can be
made once, up front, as iptables rules instead.

Filter entries follow mirrord: `[tcp://|udp://][name|address|subnet/mask][:port]`, e.g.
`db.internal:5432`, `10.0.0.0/8`, `:53`, `udp://1.1.1.0/24:1337`, `*.svc.cluster.local`.
IPv6 with a port is written in brackets: `[fd00::1]:80`, `[fd00::/8]:443`.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Decision = Literal["remote", "local"]
Proto = Literal["tcp", "udp"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
_ANY_V4, _ANY_V6 = "0.0.0.0/0", "::/0"
LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class FilterEntry:
    """One parsed filter entry; every part that is set must match."""

    text: str
    proto: Proto | None = None
    network: Network | None = None
    name: str | None = None  # lowercase, no trailing dot; may start with "*."
    port: int | None = None

    def matches(self, host: str | None, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                port: int | None, proto: Proto | None) -> bool:
        # A constraint we cannot check (unknown name, unknown port) is a non-match: an entry only
        # applies when everything it states is known to hold.
        if self.proto is not None and self.proto != proto:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if self.name is not None:
            return host is not None and name_matches(self.name, host)
        return True


def parse_filter_entry(text: str) -> FilterEntry:
    """Parse one mirrord-style filter entry; raise ValueError saying what is wrong."""
    rest = text.strip()
    if not rest:
        raise ValueError("empty filter entry")
    proto: Proto | None = None
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme.lower() not in ("tcp", "udp"):
            raise ValueError(f"{text!r}: protocol must be tcp:// or udp://, not {scheme}://")
        proto = scheme.lower()  # type: ignore[assignment]
    port_text: str | None = None
    if rest.startswith("["):  # [ipv6] or [ipv6/len], optionally followed by :port
        close = rest.find("]")
        if close < 0 or (rest[close + 1:] and not rest[close + 1:].startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        addr, port_text = rest[1:close], (rest[close + 2:] if rest[close + 1:] else None)
    elif rest.count(":") > 1:  # a bare IPv6 address or subnet cannot carry a port
        addr = rest
    elif ":" in rest:
        addr, port_text = rest.rsplit(":", 1)
    else:
        addr = rest
    port = _parse_port(text, port_text) if port_text is not None else None
    if not addr:
        if port is None:
            raise ValueError(f"{text!r}: give an address, a name or a :port")
        return FilterEntry(text, proto, None, None, port)
    try:
        return FilterEntry(text, proto, ipaddress.ip_network(addr, strict=False), None, port)
    except ValueError:
        pass
    name = normalise_name(addr)
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if labels[-1].isdigit():   # no top-level domain is all digits: a mistyped address (300.1.1.1, 10.0.0.1/33)
        raise ValueError(f"{text!r}: {addr!r} is not a valid IP address or subnet")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r}: {addr!r} is neither an IP address, a subnet nor a host name")
    return FilterEntry(text, proto, None, name, port)


def _parse_port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return int(port_text)


def normalise_name(name: str) -> str:
    """DNS names compare case-insensitively and with or without the root dot."""
    return name.strip().lower().rstrip(".")


def name_matches(pattern: str, host: str) -> bool:
    """`*.example.com` matches any name below example.com (not example.com itself)."""
    host = normalise_name(host)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def _split(cfg_filter: Any) -> tuple[Decision | None, tuple[FilterEntry, ...]]:
    """(which list was given, its parsed entries) from a `{remote: [...]}|{local: [...]}` model."""
    if cfg_filter is None:
        return None, ()
    for side in ("remote", "local"):
        entries = getattr(cfg_filter, side, None)
        if entries is not None:
            return side, tuple(parse_filter_entry(e) for e in entries)  # type: ignore[return-value]
    return None, ()


def _always_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Loopback and 0.0.0.0 mean "this network namespace": the proxy cannot reach the target's
    # loopback from here, so these connections always stay local.
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or bool(mapped and mapped.is_loopback)


class NetRule(NamedTuple):
    """A rule the kernel can apply: destination subnet, optional port, optional protocol."""

    cidr: str
    port: int | None = None
    proto: Proto | None = None  # None: both tcp and udp


@dataclass(frozen=True)
class KernelRules:
    """What the sidecar can decide with iptables instead of asking `decide()` per connection.

    Apply in order: RETURN everything in `keep_local`; then, if `redirect_only` is not None,
    redirect only those and RETURN the rest; otherwise redirect all the rest to the proxy. When
    `proxy_decides` is True the filter has host-name entries the kernel cannot see, so the proxy
    must call `OutgoingFilter.decide()` for each connection it receives.
    """

    keep_local: tuple[NetRule, ...]
    redirect_only: tuple[NetRule, ...] | None
    proxy_decides: bool
    reason: str


@dataclass(frozen=True)
class OutgoingFilter:
    """Decides, per outgoing connection, whether it leaves from the target or from here."""

    tcp: bool = True
    udp: bool = True
    side: Decision | None = None  # which list the filter gave; None: no filter
    entries: tuple[FilterEntry, ...] = ()

    @classmethod
    def from_config(cls, cfg: Any) -> OutgoingFilter:
        """Build from `feature.network.outgoing` (or a whole PodtwinConfig)."""
        if hasattr(cfg, "feature"):
            cfg = cfg.feature.network.outgoing
        side, entries = _split(cfg.filter)
        return cls(tcp=cfg.tcp, udp=cfg.udp, side=side, entries=entries)

    def decide(self, host: str | None, ip: str, port: int, proto: Proto) -> Decision:
        """`host` is the name the app resolved, when the proxy knows it (from DNS answers)."""
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
        if _always_local(addr):
            return "local"
        if not (self.tcp if proto == "tcp" else self.udp):
            return "local"
        if self.side is None:
            return "remote"
        hit = any(e.matches(host, addr, port, proto) for e in self.entries)
        if self.side == "remote":
            return "remote" if hit else "local"
        return "local" if hit else "remote"

    def kernel_rules(self) -> KernelRules:
        """The decisions iptables can make; see KernelRules for how to apply them."""
        keep = [NetRule(c) for c in LOOPBACK_CIDRS]
        enabled: list[Proto] = [p for p in ("tcp", "udp") if getattr(self, p)]
        for p in ("tcp", "udp"):
            if p not in enabled:
                keep += [NetRule(_ANY_V4, None, p), NetRule(_ANY_V6, None, p)]  # type: ignore[arg-type]
        if not enabled:
            return KernelRules(tuple(keep), (), False, "tcp and udp are both local")
        named = [e for e in self.entries if e.name is not None]
        ip_rules = [r for e in self.entries if e.name is None for r in _rules_for(e, enabled)]
        if self.side is None:
            return KernelRules(tuple(keep), None, False, "no filter: everything else is remote")
        if self.side == "local":
            keep += ip_rules
            if named:
                return KernelRules(tuple(keep), None, True,
                                   f"local filter has host names ({_texts(named)}): the proxy decides")
            return KernelRules(tuple(keep), None, False, "local filter: only IP/port entries")
        if named:
            return KernelRules(tuple(keep), None, True,
                               f"remote filter has host names ({_texts(named)}): the proxy decides")
        return KernelRules(tuple(keep), tuple(ip_rules), False, "remote filter: only these go remote")

    def local_cidrs(self) -> list[NetRule]:
        """The (cidr, port, proto) rules that must stay local: `kernel_rules().keep_local`."""
        return list(self.kernel_rules().keep_local)


def _rules_for(entry: FilterEntry, enabled: list[Proto]) -> list[NetRule]:
    protos: list[Proto | None] = [entry.proto] if entry.proto else (
        [None] if len(enabled) == 2 else list(enabled))
    nets = [str(entry.network)] if entry.network is not None else [_ANY_V4, _ANY_V6]
    return [NetRule(n, entry.port, p) for n in nets for p in protos if p is None or p in enabled]


def _texts(entries: list[FilterEntry]) -> str:
    return ", ".join(e.text for e in entries)


@dataclass(frozen=True)
class DnsFilter:
    """Decides whether a name is resolved by the target's resolver or by the local one."""

    enabled: bool = True
    side: Decision | None = None
    entries: tuple[FilterEntry, ...] = ()

    @classmethod
    def from_config(cls, cfg: Any) -> DnsFilter:
        """Build from `feature.network.dns` (or a whole PodtwinConfig)."""
        if hasattr(cfg, "feature"):
            cfg = cfg.feature.network.dns
        side, entries = _split(cfg.filter)
        return cls(enabled=cfg.enabled, side=side, entries=entries)

    def decide(self, name: str, port: int | None = None) -> Decision:
        """`port` is the service port when known (getaddrinfo); a DNS packet carries none, so
        entries with a port never match plain queries."""
        name = normalise_name(name)
        if not self.enabled or name == "localhost" or name.endswith(".localhost"):
            return "local"
        if self.side is None:
            return "remote"
        try:
            literal = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        hit = any(e.matches(name, literal, port, None) for e in self.entries)
        if self.side == "remote":
            return "remote" if hit else "local"
        return "local" if hit else "remote"
