"""The sidecar's iptables scripts (runner/sidecar/outgoing/iptables.py), read back and run against packets.

The scripts are parsed into tables/chains, and a small evaluator walks our chains for a packet, so
the tests check what the rules *do* (which packets are redirected to the proxy, which stay local),
not only how they are spelled. With root, the real iptables parser checks them too, in a throwaway
network namespace.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from podtwin.runner.sidecar.outgoing import iptables as rules
from podtwin.runner.sidecar.outgoing.iptables import (
    BYPASS_MARK,
    CHAIN_MANGLE,
    CHAIN_NAT,
    CHAIN_TPROXY,
    TPROXY_MARK,
    RuleSettings,
    iptables_script,
    iptables_undo_script,
)

BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


# -- reading the scripts back -------------------------------------------------------------------
@dataclass
class Script:
    declared: dict[str, list[str]]            # table -> chains declared with ":NAME - [0:0]"
    appended: dict[str, list[tuple[str, str]]]  # table -> (chain, rule spec) of each -A, in order
    deleted: dict[str, list[tuple[str, str]]]   # table -> (chain, rule spec) of each -D, in order
    ops: dict[str, list[tuple[str, str]]]       # table -> every (op, rest) in order

    def chain(self, table: str, name: str) -> list[str]:
        return [spec for chain, spec in self.appended.get(table, []) if chain == name]


def parse(text: str) -> Script:
    assert text.endswith("\n")
    s = Script({}, {}, {}, {})
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            assert table is None, "a table opened before the previous COMMIT"
            table = line[1:]
            for d in (s.declared, s.appended, s.deleted, s.ops):
                assert table not in d, f"table {table} twice"
                d[table] = []
        elif line == "COMMIT":
            assert table is not None
            table = None
        else:
            assert table is not None, f"{line!r} outside a table"
            if line.startswith(":"):
                name, policy, counters = line[1:].split()
                assert policy == "-" and counters == "[0:0]"
                s.declared[table].append(name)
                continue
            op, rest = line.split(" ", 1)
            s.ops[table].append((op, rest))
            if op in ("-A", "-D"):
                chain, spec = rest.split(" ", 1)
                (s.appended if op == "-A" else s.deleted)[table].append((chain, spec))
            else:
                assert op in ("-F", "-X"), line
    assert table is None, "unterminated table"
    return s


def jump_target(spec: str) -> str:
    words = spec.split()
    return words[words.index("-j") + 1]


# -- evaluating our chains for a packet ---------------------------------------------------------
@dataclass(frozen=True)
class Packet:
    dst: str
    proto: str = "tcp"
    dport: int = 443
    mark: int = 0
    local_dst: bool = False  # the namespace's own address (addrtype LOCAL)


def matches(spec: str, pkt: Packet) -> tuple[bool, str]:
    """Does the rule match? Returns (matched, target words). Unknown options fail the test."""
    words = spec.split()
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-j":
            return True, " ".join(words[i + 1:])
        if w == "-d":
            if ipaddress.ip_address(pkt.dst) not in ipaddress.ip_network(words[i + 1]):
                return False, ""
            i += 2
        elif w == "-p":
            if pkt.proto != words[i + 1]:
                return False, ""
            i += 2
        elif w == "--dport":
            if pkt.dport != int(words[i + 1]):
                return False, ""
            i += 2
        elif words[i:i + 4] == ["-m", "addrtype", "--dst-type", "LOCAL"]:
            if not pkt.local_dst:
                return False, ""
            i += 4
        elif words[i:i + 3] == ["-m", "mark", "--mark"]:
            if pkt.mark != int(words[i + 3], 0):
                return False, ""
            i += 4
        else:
            raise AssertionError(f"the evaluator does not know {w!r} in {spec!r}")
    raise AssertionError(f"no -j in {spec!r}")


def verdict(script: Script, pkt: Packet) -> str:
    """What OUTPUT does with the packet: 'proxy' (REDIRECT/MARK for TPROXY) or 'local'."""
    table = "nat" if pkt.proto == "tcp" else "mangle"
    for spec in script.chain(table, "OUTPUT"):
        matched, target = matches(spec, pkt)
        if not matched:
            continue
        for rule in script.chain(table, target):
            hit, action = matches(rule, pkt)
            if not hit:
                continue
            if action == "RETURN":
                return "local"
            if action.startswith("REDIRECT") or action.startswith("MARK"):
                return "proxy"
            raise AssertionError(f"unexpected target {action!r}")
        return "local"  # fell off the end of our chain
    return "local"  # no jump into our chain


def both(s: RuleSettings) -> tuple[Script, Script]:
    return parse(iptables_script(s)), parse(iptables_undo_script(s))


SETTINGS = {
    "defaults": RuleSettings(),
    "tcp-only": RuleSettings(udp=False),
    "udp-only": RuleSettings(tcp=False),
    "local-cidrs": RuleSettings(local_cidrs=(("10.0.0.0/8", 5432, None), ("192.168.1.0/24", None, "udp"),
                                             ("172.16.0.0/12", None, None), ("fd00::/8", None, None),
                                             ("2001:db8::1/128", 53, "udp"))),
    "remote-only": RuleSettings(remote_cidrs=(("10.1.0.0/16", None, None), ("10.2.0.5/32", 80, "tcp"),
                                              ("10.3.0.0/16", 53, "udp"), ("fd00::/8", None, None))),
    "remote-and-local": RuleSettings(local_cidrs=(("10.1.9.0/24", None, None),),
                                     remote_cidrs=(("10.1.0.0/16", None, None),)),
    "custom-ports": RuleSettings(tcp_port=16001, udp_port=16002),
}


# -- structure ----------------------------------------------------------------------------------
def test_defaults_exact_tables_and_chains():
    script, undo = both(RuleSettings())
    assert list(script.declared) == ["nat", "mangle"]
    assert script.declared == {"nat": [CHAIN_NAT], "mangle": [CHAIN_MANGLE, CHAIN_TPROXY]}
    assert script.chain("nat", "OUTPUT") == [f"-p tcp -j {CHAIN_NAT}"]
    assert script.chain("mangle", "OUTPUT") == [f"-p udp -j {CHAIN_MANGLE}"]
    assert script.chain("mangle", "PREROUTING") == [f"-p udp -m mark --mark {TPROXY_MARK:#x} -j {CHAIN_TPROXY}"]
    assert script.chain("nat", CHAIN_NAT)[-1] == f"-p tcp -j REDIRECT --to-ports {rules.TCP_PROXY_PORT}"
    assert script.chain("mangle", CHAIN_MANGLE)[-1] == f"-p udp -j MARK --set-mark {TPROXY_MARK:#x}"
    assert script.chain("mangle", CHAIN_TPROXY) == [
        f"-p udp -j TPROXY --on-ip 127.0.0.1 --on-port {rules.UDP_PROXY_PORT} --tproxy-mark {TPROXY_MARK:#x}"]
    assert list(undo.ops) == ["nat", "mangle"]


def test_tcp_only_and_udp_only_touch_one_table():
    script, undo = both(RuleSettings(udp=False))
    assert list(script.declared) == ["nat"] and list(undo.ops) == ["nat"]
    script, undo = both(RuleSettings(tcp=False))
    assert list(script.declared) == ["mangle"] and list(undo.ops) == ["mangle"]
    assert iptables_script(RuleSettings(tcp=False, udp=False)) == "\n"
    assert iptables_undo_script(RuleSettings(tcp=False, udp=False)) == "\n"


def test_custom_proxy_ports():
    script, _ = both(SETTINGS["custom-ports"])
    assert script.chain("nat", CHAIN_NAT)[-1].endswith("REDIRECT --to-ports 16001")
    assert "--on-port 16002" in script.chain("mangle", CHAIN_TPROXY)[0]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_undo_removes_every_jump_and_chain_it_added(name):
    script, undo = both(SETTINGS[name])
    assert set(undo.ops) == set(script.declared)
    for table, chains in script.declared.items():
        # every rule added to a built-in chain is deleted with exactly the same spec ...
        added_builtin = [(c, spec) for c, spec in script.appended[table] if c in BUILTIN]
        assert sorted(undo.deleted[table]) == sorted(added_builtin), table
        # ... every rule of our own chains goes by flushing them, and each chain is then deleted
        assert all(c in chains for c, _ in script.appended[table] if c not in BUILTIN)
        ops = undo.ops[table]
        for chain in chains:
            assert ("-F", chain) in ops and ("-X", chain) in ops, (table, chain)
            delete = ops.index(("-X", chain))
            # a chain can only be deleted once it is empty and nothing jumps to it any more
            assert ops.index(("-F", chain)) < delete
            for i, (op, rest) in enumerate(ops):
                if op == "-D" and jump_target(rest) == chain:
                    assert i < delete, f"{chain} deleted before the jump to it"
            for other in chains:
                if any(jump_target(spec) == chain for spec in script.chain(table, other)):
                    assert ops.index(("-F", other)) < delete
        # every jump into our chains comes from a built-in chain the undo cleans, or from our chains
        for c, spec in script.appended[table]:
            target = jump_target(spec)
            if target in chains:
                assert c in BUILTIN or c in chains


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_exemptions_come_first(name):
    script, _ = both(SETTINGS[name])
    for table, chain, action in (("nat", CHAIN_NAT, "REDIRECT"), ("mangle", CHAIN_MANGLE, "MARK")):
        specs = script.chain(table, chain)
        if not specs:
            continue
        first_action = min(i for i, spec in enumerate(specs) if jump_target(spec) == action)
        assert specs[:3] == ["-d 127.0.0.0/8 -j RETURN", "-m addrtype --dst-type LOCAL -j RETURN",
                             f"-m mark --mark {BYPASS_MARK:#x} -j RETURN"]
        returns = [i for i, spec in enumerate(specs) if jump_target(spec) == "RETURN"]
        # all RETURNs come before the first action, except the catch-all one of a remote-only list
        late = [specs[i] for i in returns if i > first_action]
        assert late in ([], ["-j RETURN"]), late
        if late:
            assert specs[-1] == "-j RETURN"


def test_ipv6_entries_are_skipped():
    for name in ("local-cidrs", "remote-only"):
        text = iptables_script(SETTINGS[name])
        assert "::" not in text and "fd00" not in text


def test_ip6tables_gets_the_ipv6_entries_only():
    for name in ("local-cidrs", "remote-only"):
        text = iptables_script(SETTINGS[name], v6=True)
        assert "fd00::/8" in text and "10." not in text and "192.168" not in text and "127.0.0" not in text


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6_proxies_everything_but_loopback_link_local_multicast_local_and_bypass(proto):
    script = parse(iptables_script(RuleSettings(), v6=True))
    assert verdict(script, Packet("fd00:1::5", proto, 80)) == "proxy"
    assert verdict(script, Packet("2001:db8::7", proto)) == "proxy"
    assert verdict(script, Packet("::1", proto, 53)) == "local"
    assert verdict(script, Packet("fe80::1", proto)) == "local"
    assert verdict(script, Packet("ff02::fb", proto, 5353)) == "local"
    assert verdict(script, Packet("fd70:6f64:7477::1", proto, local_dst=True)) == "local"
    assert verdict(script, Packet("fd00:1::5", proto, mark=BYPASS_MARK)) == "local"


def test_ipv6_local_and_remote_lists():
    local = parse(iptables_script(SETTINGS["local-cidrs"], v6=True))
    assert verdict(local, Packet("fd12::1", "tcp")) == "local"
    assert verdict(local, Packet("2001:db8::1", "udp", 53)) == "local"
    assert verdict(local, Packet("2001:db8::1", "tcp", 53)) == "proxy"
    remote = parse(iptables_script(SETTINGS["remote-only"], v6=True))
    assert verdict(remote, Packet("fd12::1", "tcp")) == "proxy"
    assert verdict(remote, Packet("2001:db8::1", "tcp")) == "local"


# -- behaviour: which packets go to the proxy ---------------------------------------------------
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_defaults_proxy_everything_but_loopback_local_and_bypass(proto):
    script = parse(iptables_script(RuleSettings()))
    assert verdict(script, Packet("10.1.2.3", proto)) == "proxy"
    assert verdict(script, Packet("93.184.216.34", proto, 80)) == "proxy"
    assert verdict(script, Packet("127.0.0.1", proto, 53)) == "local"       # the app's DNS server
    assert verdict(script, Packet("127.5.5.5", proto)) == "local"
    assert verdict(script, Packet("172.17.0.5", proto, local_dst=True)) == "local"  # our own address
    assert verdict(script, Packet("10.1.2.3", proto, mark=BYPASS_MARK)) == "local"  # the sidecar's sockets
    assert verdict(script, Packet("10.1.2.3", proto, mark=TPROXY_MARK)) == "proxy"


def test_tcp_only_leaves_udp_alone_and_vice_versa():
    tcp_only = parse(iptables_script(RuleSettings(udp=False)))
    assert verdict(tcp_only, Packet("10.1.2.3", "tcp")) == "proxy"
    assert verdict(tcp_only, Packet("10.1.2.3", "udp")) == "local"
    udp_only = parse(iptables_script(RuleSettings(tcp=False)))
    assert verdict(udp_only, Packet("10.1.2.3", "tcp")) == "local"
    assert verdict(udp_only, Packet("10.1.2.3", "udp")) == "proxy"


def test_local_cidrs_with_port_and_proto():
    script = parse(iptables_script(SETTINGS["local-cidrs"]))
    # 10.0.0.0/8 port 5432, both protocols
    assert verdict(script, Packet("10.9.9.9", "tcp", 5432)) == "local"
    assert verdict(script, Packet("10.9.9.9", "udp", 5432)) == "local"
    assert verdict(script, Packet("10.9.9.9", "tcp", 5433)) == "proxy"
    # 192.168.1.0/24, udp only
    assert verdict(script, Packet("192.168.1.7", "udp", 53)) == "local"
    assert verdict(script, Packet("192.168.1.7", "tcp", 53)) == "proxy"
    # 172.16.0.0/12, any port and protocol
    assert verdict(script, Packet("172.20.1.1", "tcp", 1)) == "local"
    assert verdict(script, Packet("172.20.1.1", "udp", 65535)) == "local"
    assert verdict(script, Packet("172.32.0.1", "tcp")) == "proxy"
    nat = parse(iptables_script(SETTINGS["local-cidrs"])).chain("nat", CHAIN_NAT)
    assert "-d 10.0.0.0/8 -p tcp --dport 5432 -j RETURN" in nat
    assert not any("192.168.1.0/24" in spec for spec in nat)  # a udp-only entry stays out of nat


def test_remote_only_list():
    script = parse(iptables_script(SETTINGS["remote-only"]))
    assert verdict(script, Packet("10.1.4.4", "tcp", 8080)) == "proxy"
    assert verdict(script, Packet("10.1.4.4", "udp", 9000)) == "proxy"
    assert verdict(script, Packet("10.2.0.5", "tcp", 80)) == "proxy"
    assert verdict(script, Packet("10.2.0.5", "tcp", 81)) == "local"
    assert verdict(script, Packet("10.2.0.5", "udp", 80)) == "local"   # tcp-only entry
    assert verdict(script, Packet("10.3.1.1", "udp", 53)) == "proxy"
    assert verdict(script, Packet("10.3.1.1", "tcp", 53)) == "local"   # udp-only entry
    assert verdict(script, Packet("8.8.8.8", "tcp", 443)) == "local"   # not listed: stays local
    assert verdict(script, Packet("127.0.0.1", "udp", 53)) == "local"
    assert verdict(script, Packet("10.1.4.4", "tcp", mark=BYPASS_MARK)) == "local"


def test_remote_list_with_local_exceptions():
    script = parse(iptables_script(SETTINGS["remote-and-local"]))
    assert verdict(script, Packet("10.1.2.3", "tcp")) == "proxy"
    assert verdict(script, Packet("10.1.9.3", "tcp")) == "local"   # local wins over remote
    assert verdict(script, Packet("10.1.9.3", "udp")) == "local"


def test_empty_remote_list_sends_nothing_remote():
    script = parse(iptables_script(RuleSettings(remote_cidrs=())))
    assert verdict(script, Packet("10.1.2.3", "tcp")) == "local"
    assert verdict(script, Packet("10.1.2.3", "udp")) == "local"


# -- the real iptables parser ---------------------------------------------------------------------
def _in_fresh_netns(shell: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run ``shell`` in a throwaway network namespace: nothing here can touch the host's rules."""
    return subprocess.run(["unshare", "--net", "sh", "-c", shell], input=stdin, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture(scope="module")
def iptables():
    if os.geteuid() != 0:
        pytest.skip("iptables-restore needs root")
    if not shutil.which("iptables-restore") or not shutil.which("unshare"):
        pytest.skip("iptables-restore or unshare is not installed")
    if _in_fresh_netns("true").returncode != 0:
        pytest.skip("cannot create a network namespace here")
    # the parser really checks: an unknown option is refused
    bad = _in_fresh_netns("iptables-restore --test", "*nat\n-A OUTPUT -p tcp --dportx 5 -j RETURN\nCOMMIT\n")
    assert bad.returncode != 0


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_iptables_restore_accepts_the_scripts(iptables, name):
    s = SETTINGS[name]
    result = _in_fresh_netns("iptables-restore --test", iptables_script(s))
    assert result.returncode == 0, result.stderr + iptables_script(s)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_apply_then_undo_leaves_no_trace(iptables, name, tmp_path):
    """In a throwaway namespace: install, check the kernel has our chains, undo, check none is left."""
    s = SETTINGS[name]
    (tmp_path / "apply").write_text(iptables_script(s))
    (tmp_path / "undo").write_text(iptables_undo_script(s))
    result = _in_fresh_netns(
        f"set -e; iptables-restore --noflush < {tmp_path}/apply; iptables-save; echo '=== undone'; "
        f"iptables-restore --noflush < {tmp_path}/undo; iptables-save")
    assert result.returncode == 0, result.stderr
    applied, _, undone = result.stdout.partition("=== undone")
    chains = ([CHAIN_NAT] if s.tcp else []) + ([CHAIN_MANGLE, CHAIN_TPROXY] if s.udp else [])
    for chain in chains:
        assert f":{chain} " in applied
    assert "PODTWIN" not in undone, undone
