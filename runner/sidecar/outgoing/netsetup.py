"""Apply and restore the sidecar's rules: iptables via iptables-restore, policy routes via pyroute2.

Each step is recorded when done and undone in reverse order in ``restore()`` (``UndoStack``); a
failing undo step is logged and the rest still run.
"""
from __future__ import annotations

import socket
import subprocess
from pyroute2 import IPRoute

from podtwin.agent.undo import UndoStack

from podtwin.runner.sidecar.outgoing.iptables import ROUTE_TABLE, TPROXY_MARK, RuleSettings, iptables_script, iptables_undo_script

RULE_PRIORITY = 100


class NetSetup:
    def __init__(self, settings: RuleSettings) -> None:
        self.settings = settings
        self.undo = UndoStack()

    def apply(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            if self.settings.udp:
                ipr.rule("add", fwmark=TPROXY_MARK, table=ROUTE_TABLE, priority=RULE_PRIORITY,
                         family=socket.AF_INET, action="to_tbl")
                self.undo.push("policy rule", lambda: self._ipr("rule", "del", fwmark=TPROXY_MARK,
                                  table=ROUTE_TABLE, priority=RULE_PRIORITY, family=socket.AF_INET,
                                  action="to_tbl"))
                route = dict(dst="0.0.0.0", dst_len=0, type="local", table=ROUTE_TABLE, oif=lo, scope=254)
                ipr.route("add", **route)
                self.undo.push("local route", lambda: self._ipr("route", "del", **route))
        _restore(iptables_script(self.settings))
        self.undo.push("iptables", lambda: _restore(iptables_undo_script(self.settings)))

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


def _restore(script: str) -> None:
    proc = subprocess.run(["iptables-restore", "--noflush"], input=script, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {proc.stderr.strip()}\n{script}")
