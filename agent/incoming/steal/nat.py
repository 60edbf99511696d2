"""Incoming-traffic rules in the target's network namespace, one nat chain per session.

``PODTWIN_IN_<session>`` holds one REDIRECT per stolen port (to the agent's listener), entered
from ``PREROUTING``, so only connections arriving from outside the namespace are taken; the
agent's own connections to the target (locally generated) are not. Every session's chain carries
its id, so any agent or guard can tell whose rules it sees, and a live agent is recognised by an
abstract unix socket named after its session: abstract sockets belong to the network namespace,
so "it answers" means "its agent is alive in this very namespace".
"""
from __future__ import annotations

import logging
import re
import socket
import subprocess
from dataclasses import dataclass

log = logging.getLogger("podtwin.agent.incoming.steal.nat")

CHAIN_PREFIX = "PODTWIN_IN_"
FILTERED = "podtwin-http-filter"   # the comment on a REDIRECT whose session takes only matching requests
_CHAIN_RE = re.compile(rf"^:({CHAIN_PREFIX}([0-9a-f]+))\s")
_RULE_RE = re.compile(rf"^-A ({CHAIN_PREFIX}([0-9a-f]+)) .*--dport (\d+)\b")
_TO_PORTS_RE = re.compile(r"--to-ports (\d+)")
_JUMP_RE = re.compile(rf"^-A PREROUTING .*-j {CHAIN_PREFIX}([0-9a-f]+)\b")


def liveness_name(session_id: str) -> bytes:
    return b"\0podtwin-agent-" + session_id.encode()


def session_alive(session_id: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(liveness_name(session_id))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def iptables(*args: str, check: bool = True, v6: bool = False) -> subprocess.CompletedProcess:
    command = "ip6tables" if v6 else "iptables"
    proc = subprocess.run([command, "-w", "5", "-t", "nat", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{command} {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def ip6tables_usable() -> bool:
    """Whether this namespace's kernel has IPv6 nat (the same rules then go into ip6tables)."""
    try:
        return iptables("-n", "-L", "PREROUTING", check=False, v6=True).returncode == 0
    except OSError:
        return False


FAMILIES = (False, True)   # IPv4 (iptables), IPv6 (ip6tables)


@dataclass(frozen=True)
class Redirect:
    session: str
    port: int          # the target's port
    to_port: int       # the session agent's listener
    filtered: bool     # the session takes only the requests its HTTP filter matches


@dataclass(frozen=True)
class NatState:
    chains: dict[str, str]           # chain -> session id
    ports: dict[int, set[str]]       # port -> session ids redirecting it
    order: tuple[str, ...] = ()      # sessions in the order PREROUTING enters their chains
    redirects: tuple[Redirect, ...] = ()

    @classmethod
    def parse(cls, save: str) -> "NatState":
        """From `iptables-save -t nat` output (pure, unit-tested)."""
        chains: dict[str, str] = {}
        ports: dict[int, set[str]] = {}
        order: list[str] = []
        redirects: list[Redirect] = []
        for line in save.splitlines():
            m = _CHAIN_RE.match(line)
            if m:
                chains[m.group(1)] = m.group(2)
                continue
            m = _JUMP_RE.match(line)
            if m:
                if m.group(1) not in order:
                    order.append(m.group(1))
                continue
            m = _RULE_RE.match(line)
            if m:
                ports.setdefault(int(m.group(3)), set()).add(m.group(2))
                to = _TO_PORTS_RE.search(line)
                if to:
                    redirects.append(Redirect(m.group(2), int(m.group(3)), int(to.group(1)), FILTERED in line))
        return cls(chains, ports, tuple(order), tuple(redirects))

    def on_port(self, port: int) -> list[Redirect]:
        """The sessions redirecting ``port``, in the order a new connection meets them."""
        rank = {sid: i for i, sid in enumerate(self.order)}
        found = [r for r in self.redirects if r.port == port and r.session in rank]
        return sorted(found, key=lambda r: rank[r.session])

    def after(self, session_id: str, port: int) -> list[Redirect]:
        """The sessions redirecting ``port`` that a connection meets after ``session_id``'s chain,
        by the order of the jumps in PREROUTING -- whether or not ``session_id`` itself redirects
        the port now (its app may be restarting). Never one before it, so passing on never loops."""
        rank = {sid: i for i, sid in enumerate(self.order)}
        if session_id not in rank:
            return []
        return [r for r in self.on_port(port) if rank[r.session] > rank[session_id]]

    @classmethod
    def read(cls, v6: bool = False) -> "NatState":
        """IPv4's rules (the order of sessions and their ports; IPv6's mirror them), or IPv6's."""
        command = "ip6tables-save" if v6 else "iptables-save"
        try:
            proc = subprocess.run([command, "-t", "nat"], capture_output=True, text=True)
        except OSError as exc:
            if v6:
                return cls({}, {})
            raise RuntimeError(f"{command}: {exc}") from exc
        if proc.returncode != 0:
            if v6:   # no IPv6 nat in this kernel: no IPv6 rules either
                return cls({}, {})
            raise RuntimeError(f"{command}: {proc.stderr.strip()}")
        return cls.parse(proc.stdout)


def remove_session_chain(session_id: str, families: tuple[bool, ...] = FAMILIES) -> bool:
    """Remove a session's chains (IPv4 and IPv6) and the jumps to them. True if any was removed."""
    chain = CHAIN_PREFIX + session_id
    removed = False
    for v6 in families:
        try:
            if iptables("-n", "-L", chain, check=False, v6=v6).returncode != 0:
                continue
        except OSError:   # no ip6tables here
            continue
        while iptables("-D", "PREROUTING", "-p", "tcp", "-j", chain, check=False, v6=v6).returncode == 0:
            pass
        iptables("-F", chain, check=False, v6=v6)
        iptables("-X", chain, check=False, v6=v6)
        log.info("removed %s%s", chain, " (IPv6)" if v6 else "")
        removed = True
    return removed


def sweep_dead_sessions(except_session: str | None = None) -> list[str]:
    """Remove the chains of sessions whose agent is gone (crash, SIGKILL, deleted container)."""
    removed = []
    for session_id in set(NatState.read().chains.values()) | set(NatState.read(v6=True).chains.values()):
        if session_id != except_session and not session_alive(session_id):
            if remove_session_chain(session_id):
                removed.append(session_id)
    return removed


def steal_conflict(port: int, filtered: bool, others: list[Redirect]) -> str | None:
    """Why a steal of ``port`` cannot be shared with the sessions already on it (None if it can):
    sessions share a port only when every one of them takes just the requests its filter matches."""
    if not others:
        return None
    whole = [r.session for r in others if not r.filtered]
    if whole:
        return f"port {port} is already stolen by podtwin session {whole[0]}"
    if not filtered:
        names = ", ".join(sorted({r.session for r in others}))
        return (f"port {port} is already stolen with an HTTP filter by podtwin session {names}; "
                f"a whole-port steal would take its requests (give this session an http_filter too)")
    return None


@dataclass


class SessionRules:
    """The rules of one live session; the agent owns one."""

    def __init__(self, session_id: str, listen_port: int, v6: bool = False) -> None:
        """``v6``: the agent listens on IPv6 too (same port), and every rule goes into ip6tables
        as well, so IPv6 clients' connections are taken like IPv4 ones."""
        self.session_id = session_id
        self.chain = CHAIN_PREFIX + session_id
        self.listen_port = listen_port
        self.families = list(FAMILIES if v6 else FAMILIES[:1])
        self.ports: dict[int, bool] = {}   # port -> filtered
        self.created: set[bool] = set()   # the families whose chain and jump are in

    def others_on(self, port: int) -> list[Redirect]:
        """The other live sessions redirecting ``port`` (dead ones are swept first)."""
        sweep_dead_sessions(except_session=self.session_id)
        return [r for r in NatState.read().on_port(port) if r.session != self.session_id]

    def add(self, port: int, filtered: bool = False) -> None:
        """Redirect ``port`` to the agent. The session's chain is entered first (inserted at the
        top of PREROUTING), so with several filtering sessions on one port the newest sees a
        request first and passes what it does not match on to the next (see IncomingServer)."""
        self.ports[port] = filtered   # first: whatever is in place is removed with it
        for v6 in list(self.families):
            try:
                if v6 not in self.created:
                    iptables("-N", self.chain, check=False, v6=v6)
                    iptables("-I", "PREROUTING", "1", "-p", "tcp", "-j", self.chain, v6=v6)
                    self.created.add(v6)
                iptables("-A", self.chain, *self._rule(port, filtered), v6=v6)
            except (RuntimeError, OSError) as exc:
                if not v6:
                    raise
                # IPv6 is a bonus: without it IPv4 clients are still taken
                log.warning("IPv6 rules failed, IPv4 only from now on: %s", exc)
                self.families.remove(v6)
                remove_session_chain(self.session_id, families=(True,))

    def _rule(self, port: int, filtered: bool) -> list[str]:
        comment = ["-m", "comment", "--comment", FILTERED] if filtered else []
        return ["-p", "tcp", "--dport", str(port), *comment, "-j", "REDIRECT", "--to-ports", str(self.listen_port)]

    def remove(self, port: int) -> None:
        if port in self.ports:
            filtered = self.ports.pop(port)
            for v6 in self.families:
                iptables("-D", self.chain, *self._rule(port, filtered), check=False, v6=v6)

    def remove_all(self) -> None:
        remove_session_chain(self.session_id)   # whatever got in, even half of an add
        self.ports.clear()
        self.created.clear()


def main(argv: list[str] | None = None) -> int:
    """``python -m podtwin.agent.incoming.steal.nat sweep``: remove dead sessions' chains in this namespace
    (what `podtwin clean` runs in a target's namespace), printing one line per session removed."""
    import argparse

    p = argparse.ArgumentParser(prog="podtwin-rules")
    p.add_argument("action", choices=["sweep"])
    p.parse_args(argv)
    for session_id in sweep_dead_sessions():
        print(f"removed the incoming rules of dead session {session_id}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
