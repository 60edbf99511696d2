"""The sidecar's kernel rules, as data: an iptables-restore script and the policy routes for UDP.

Pure functions of the settings, so they are unit-tested without a kernel. The sidecar applies them
in its own network namespace (which the app shares), and removes them on exit; they would die with
the namespace anyway.

TCP: nat OUTPUT REDIRECT to the transparent proxy; the proxy reads SO_ORIGINAL_DST.
UDP: NAT would hide the original destination from a UDP socket, so UDP uses TPROXY: mark in
mangle OUTPUT, route marked packets to ``lo`` (policy table), and TPROXY them in PREROUTING to the
relay socket, which reads IP_ORIGDSTADDR.
The same rules go into ip6tables for IPv6 when the target has IPv6 (``v6``); IPv6 CIDRs of the
filter go there, IPv4 ones into iptables.
Exempt everywhere: loopback and the namespace's own addresses (so the app's own listeners and
replies stay local), packets the sidecar itself marks ``BYPASS_MARK`` (its own sockets), and the
CIDRs the user's filter keeps local.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHAIN_NAT = "PODTWIN_OUT"
CHAIN_MANGLE = "PODTWIN_UDP_OUT"
CHAIN_TPROXY = "PODTWIN_UDP_IN"
TPROXY_MARK = 0x1
BYPASS_MARK = 0x2
ROUTE_TABLE = 100
# The app's IPv6 address when its network has none (Docker's default bridge): a unique local
# address on lo, so that resolvers ask for AAAA records (getaddrinfo's AI_ADDRCONFIG), and a
# default route, so that connections reach the rules that hand them to the proxies.
APP_IPV6 = "fd70:6f64:7477::1"
TCP_PROXY_PORT = 15001
UDP_PROXY_PORT = 15002


@dataclass(frozen=True)
class RuleSettings:
    tcp: bool = True
    udp: bool = True
    # (cidr, port or None, "tcp"/"udp" or None for both): these stay local
    local_cidrs: tuple[tuple[str, int | None, str | None], ...] = ()
    # when not None, only these go remote and everything else stays local
    remote_cidrs: tuple[tuple[str, int | None, str | None], ...] | None = None
    tcp_port: int = TCP_PROXY_PORT
    udp_port: int = UDP_PROXY_PORT
    extra: dict = field(default_factory=dict)


def _select(rules, proto: str, v6: bool = False):
    """The rules of one family (IPv4 for iptables, IPv6 for ip6tables) that apply to ``proto``."""
    return [(cidr, port) for cidr, port, p in rules if (p in (None, proto)) and (":" in cidr) == v6]


def _exemptions(proto: str, s: RuleSettings, target: str, v6: bool = False) -> list[str]:
    lines = [
        *(["-d ::1/128 -j RETURN", "-d fe80::/10 -j RETURN", "-d ff00::/8 -j RETURN"] if v6
          else ["-d 127.0.0.0/8 -j RETURN"]),
        "-m addrtype --dst-type LOCAL -j RETURN",
        f"-m mark --mark {BYPASS_MARK:#x} -j RETURN",
    ]
    for cidr, port in _select(s.local_cidrs, proto, v6):
        lines.append(f"-d {cidr} -p {proto}" + (f" --dport {port}" if port else "") + " -j RETURN")
    if s.remote_cidrs is not None:
        for cidr, port in _select(s.remote_cidrs, proto, v6):
            lines.append(f"-d {cidr} -p {proto}" + (f" --dport {port}" if port else "") + f" {target}")
        lines.append("-j RETURN")
    else:
        lines.append(f"-p {proto} {target}")
    return lines


def iptables_script(s: RuleSettings, v6: bool = False) -> str:
    """What `iptables-restore --noflush` (``v6``: `ip6tables-restore`) gets to install the rules
    (atomically, per table). The proxies listen on 127.0.0.1 and ::1 alike."""
    out: list[str] = []
    if s.tcp:
        out += ["*nat", f":{CHAIN_NAT} - [0:0]", f"-A OUTPUT -p tcp -j {CHAIN_NAT}"]
        out += [f"-A {CHAIN_NAT} {rule}" for rule in
                _exemptions("tcp", s, f"-j REDIRECT --to-ports {s.tcp_port}", v6)]
        out.append("COMMIT")
    if s.udp:
        out += ["*mangle", f":{CHAIN_MANGLE} - [0:0]", f":{CHAIN_TPROXY} - [0:0]",
                f"-A OUTPUT -p udp -j {CHAIN_MANGLE}",
                f"-A PREROUTING -p udp -m mark --mark {TPROXY_MARK:#x} -j {CHAIN_TPROXY}"]
        out += [f"-A {CHAIN_MANGLE} {rule}" for rule in
                _exemptions("udp", s, f"-j MARK --set-mark {TPROXY_MARK:#x}", v6)]
        out.append(f"-A {CHAIN_TPROXY} -p udp -j TPROXY --on-ip {'::1' if v6 else '127.0.0.1'} "
                   f"--on-port {s.udp_port} --tproxy-mark {TPROXY_MARK:#x}")
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def iptables_undo_script(s: RuleSettings) -> str:
    """Removes exactly what ``iptables_script`` added: the jumps first, then the chains."""
    out: list[str] = []
    if s.tcp:
        out += ["*nat", f"-D OUTPUT -p tcp -j {CHAIN_NAT}", f"-F {CHAIN_NAT}", f"-X {CHAIN_NAT}", "COMMIT"]
    if s.udp:
        out += ["*mangle", f"-D OUTPUT -p udp -j {CHAIN_MANGLE}",
                f"-D PREROUTING -p udp -m mark --mark {TPROXY_MARK:#x} -j {CHAIN_TPROXY}",
                f"-F {CHAIN_MANGLE}", f"-X {CHAIN_MANGLE}", f"-F {CHAIN_TPROXY}", f"-X {CHAIN_TPROXY}",
                "COMMIT"]
    return "\n".join(out) + "\n"
