"""Apply and restore the sidecar's rules: iptables via iptables-restore, policy routes via pyroute2.

Each step is recorded when done and undone in reverse order in ``restore()`` (``UndoStack``); a
failing undo step is logged and the rest still run.
"""
from __future__ import annotations

import logging
import socket
import subprocess
from pyroute2 import IPRoute

from podtwin.agent.undo import UndoStack

from podtwin.runner.sidecar.outgoing.iptables import (APP_IPV6, ROUTE_TABLE, TPROXY_MARK, RuleSettings, iptables_script,
                                                     iptables_undo_script)

RULE_PRIORITY = 100
NO_ROUTE6 = (f"-o lo -m addrtype ! --dst-type LOCAL -m mark ! --mark {TPROXY_MARK:#x} "
             "-m comment --comment podtwin-no-route -j REJECT --reject-with icmp6-no-route")
log = logging.getLogger("podtwin.sidecar.net")


class NetSetup:
    """``v6``: bridge IPv6 too (the target has it): the same rules in ip6tables, and the app's
    namespace gets an IPv6 address and default route where its network gave it none."""

    def __init__(self, settings: RuleSettings, v6: bool = False) -> None:
        self.settings, self.v6 = settings, v6
        self.undo = UndoStack()
        self.undo6 = UndoStack()   # IPv6's steps: undone alone if IPv6 fails half-way

    def apply(self) -> None:
        with IPRoute() as ipr:
            self._tproxy_route(ipr, ipr.link_lookup(ifname="lo")[0], socket.AF_INET, self.undo)
        _restore(iptables_script(self.settings))
        self.undo.push("iptables", lambda: _restore(iptables_undo_script(self.settings)))
        if self.v6:
            try:
                self._apply_v6()
            except Exception as exc:  # noqa: BLE001 - IPv6 is a bonus: IPv4 works without it
                log.warning("IPv6 is not bridged (%s); IPv4 is", exc)
                self.undo6.unwind()
                self.v6 = False

    def _apply_v6(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            if not _has_default_v6(ipr):
                self._add(ipr, "address", "addr", self.undo6, index=lo, address=APP_IPV6, prefixlen=128,
                          family=socket.AF_INET6)
                self._add(ipr, "IPv6 default route", "route", self.undo6, dst="::", dst_len=0, oif=lo,
                          family=socket.AF_INET6)
                # what the rules leave on that route (kept local, with nowhere local to go) fails
                # at once, as it would with no route, rather than vanish on lo
                _restore(f"*filter\n-A OUTPUT {NO_ROUTE6}\nCOMMIT\n", "ip6tables-restore")
                self.undo6.push("IPv6 no-route rule",
                                lambda: _restore(f"*filter\n-D OUTPUT {NO_ROUTE6}\nCOMMIT\n", "ip6tables-restore"))
            self._tproxy_route(ipr, lo, socket.AF_INET6, self.undo6)
        _restore(iptables_script(self.settings, v6=True), "ip6tables-restore")
        self.undo6.push("ip6tables", lambda: _restore(iptables_undo_script(self.settings), "ip6tables-restore"))

    def _tproxy_route(self, ipr: IPRoute, lo: int, family: int, undo: UndoStack) -> None:
        """UDP: marked packets are routed to lo, where TPROXY hands them to the relay."""
        if not self.settings.udp:
            return
        self._add(ipr, "policy rule", "rule", undo, fwmark=TPROXY_MARK, table=ROUTE_TABLE, priority=RULE_PRIORITY,
                  family=family, action="to_tbl")
        self._add(ipr, "local route", "route", undo, dst="::" if family == socket.AF_INET6 else "0.0.0.0",
                  dst_len=0, type="local", table=ROUTE_TABLE, oif=lo, scope=254, family=family)

    def _add(self, ipr: IPRoute, what: str, kind: str, undo: UndoStack, **spec) -> None:
        getattr(ipr, kind)("add", **spec)
        undo.push(what, lambda: self._ipr(kind, "del", **spec))

    @staticmethod
    def _ipr(kind: str, *args, **kwargs) -> None:
        with IPRoute() as ipr:
            getattr(ipr, kind)(*args, **kwargs)

    def restore(self) -> None:
        self.undo6.unwind()   # logs what it could not remove
        self.undo.unwind()


def own_subnets() -> list[str]:
    """The subnets of this namespace's interfaces other than loopback (IPv4, and IPv6 but for
    link-local): the networks the container is attached to (a compose project's)."""
    import ipaddress

    with IPRoute() as ipr:
        nets = {ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                for a in ipr.get_addr()}
    return sorted(str(n) for n in nets if not (n.is_loopback or n.is_link_local or str(n) == f"{APP_IPV6}/128"))


def ipv6_on() -> bool:
    """Whether this namespace has IPv6 (Docker turns it off unless asked, see _sidecar_sysctls)."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def _has_default_v6(ipr: IPRoute) -> bool:
    return any(r["dst_len"] == 0 for r in ipr.get_routes(family=socket.AF_INET6, table=254))


def _restore(script: str, command: str = "iptables-restore") -> None:
    proc = subprocess.run([command, "--noflush"], input=script, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed: {proc.stderr.strip()}\n{script}")
