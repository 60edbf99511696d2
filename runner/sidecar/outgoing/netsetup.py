"""Apply and restore the sidecar's rules: iptables via iptables-restore, policy routes via pyroute2.

Each step is recorded when done and undone in reverse order in ``restore()`` (``UndoStack``); a
failing undo step is logged and the rest still run.
"""
from __future__ import annotations

import socket
import subprocess
from pyroute2 import IPRoute

from podtwin.agent.undo import UndoStack

from podtwin.runner.sidecar.outgoing.iptables import (APP_IPV6, ROUTE_TABLE, TPROXY_MARK, RuleSettings, iptables_script,
                                                     iptables_undo_script)

RULE_PRIORITY = 100


class NetSetup:
    """``v6``: bridge IPv6 too (the target has it): the same rules in ip6tables, and the app's
    namespace gets an IPv6 address and default route where its network gave it none."""

    def __init__(self, settings: RuleSettings, v6: bool = False) -> None:
        self.settings, self.v6 = settings, v6
        self.undo = UndoStack()

    def apply(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            self._tproxy_route(ipr, lo, socket.AF_INET)
            if self.v6:
                if not _has_default_v6(ipr):
                    self._add(ipr, "address", "addr", index=lo, address=APP_IPV6, prefixlen=128,
                              family=socket.AF_INET6)
                    self._add(ipr, "IPv6 default route", "route", dst="::", dst_len=0, oif=lo,
                              family=socket.AF_INET6)
                self._tproxy_route(ipr, lo, socket.AF_INET6)
        _restore(iptables_script(self.settings))
        self.undo.push("iptables", lambda: _restore(iptables_undo_script(self.settings)))
        if self.v6:
            _restore(iptables_script(self.settings, v6=True), "ip6tables-restore")
            self.undo.push("ip6tables", lambda: _restore(iptables_undo_script(self.settings), "ip6tables-restore"))

    def _tproxy_route(self, ipr: IPRoute, lo: int, family: int) -> None:
        """UDP: marked packets are routed to lo, where TPROXY hands them to the relay."""
        if not self.settings.udp:
            return
        self._add(ipr, "policy rule", "rule", fwmark=TPROXY_MARK, table=ROUTE_TABLE, priority=RULE_PRIORITY,
                  family=family, action="to_tbl")
        self._add(ipr, "local route", "route", dst="::" if family == socket.AF_INET6 else "0.0.0.0", dst_len=0,
                  type="local", table=ROUTE_TABLE, oif=lo, scope=254, family=family)

    def _add(self, ipr: IPRoute, what: str, kind: str, **spec) -> None:
        getattr(ipr, kind)("add", **spec)
        self.undo.push(what, lambda: self._ipr(kind, "del", **spec))

    @staticmethod
    def _ipr(kind: str, *args, **kwargs) -> None:
        with IPRoute() as ipr:
            getattr(ipr, kind)(*args, **kwargs)

    def restore(self) -> None:
        self.undo.unwind()   # logs what it could not remove


def own_subnets() -> list[str]:
    """The IPv4 subnets of this namespace's interfaces other than loopback: the networks the
    container is attached to (a compose project's)."""
    import ipaddress

    with IPRoute() as ipr:
        return sorted({str(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network)
                       for a in ipr.get_addr(family=socket.AF_INET)
                       if not str(a.get_attr("IFA_ADDRESS")).startswith("127.")})


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
