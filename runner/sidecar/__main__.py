"""podtwin sidecar: owns the app's network namespace and bridges it to the agent.

``python -m podtwin.runner.sidecar --session-dir /podtwin``: its settings, the session's key and
the agent's socket are the session directory's files (``podtwin.runner.state.files``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from podtwin.agent.dns import Forwarder, ResolvConf
from podtwin.agent.link.handoff import HandoffClient
from podtwin.runner.link.client import Link, LinkKeys
from podtwin.runner.sidecar.outgoing.policy import DnsFilter, OutgoingFilter
from podtwin.runner.sidecar.settings import SidecarSettings
from podtwin.runner.state.files import SessionFiles
from podtwin.runner.sidecar import READY_FILE

from podtwin.runner.sidecar.dns.handed import HandedResolver
from podtwin.runner.sidecar.dns.resolver import DnsServer
from podtwin.runner.sidecar.files import FileMounts
from podtwin.runner.sidecar.link import LinkKeeper
from podtwin.runner.sidecar.incoming.ports import IncomingPorts
from podtwin.runner.sidecar.dns.names import NameCache
from podtwin.runner.sidecar.outgoing.netsetup import NetSetup, ipv6_on, own_subnets
from podtwin.runner.sidecar.outgoing.iptables import BYPASS_MARK
from podtwin.runner.sidecar.outgoing.tcp import TcpProxy
from podtwin.runner.sidecar.outgoing.udp import UdpRelay

log = logging.getLogger("podtwin.sidecar")


def resolv_conf_for_app(target_resolv: str) -> str:
    """A resolv.conf's search list and options (the target's, or with DNS off this container's
    own), with our loopback resolver as the only nameserver."""
    conf = ResolvConf.parse(target_resolv)
    lines = ["# written by podtwin: its resolver on 127.0.0.1 answers (through the target, or"
             " locally where feature.network.dns says so)", "nameserver 127.0.0.1"]
    if conf.search:
        lines.append("search " + " ".join(conf.search))
    if conf.options:
        lines.append("options " + " ".join(conf.options))
    return "\n".join(lines) + "\n"


class Decider:
    """Per-connection and per-query decisions for filters the kernel rules cannot express (host
    names), using the names the app knows each address by. ``local_names`` (a compose project's
    services) resolve locally; under ``search`` domains (the app's resolver tries those first)
    they are not found, so that a cluster's namesake never shadows the local service."""

    def __init__(self, outgoing: OutgoingFilter, dns: DnsFilter, names: NameCache,
                 local_names: tuple[str, ...] = (), search: tuple[str, ...] = ()) -> None:
        self.outgoing, self.dns, self.names = outgoing, dns, names
        self.local_names = frozenset(n.lower() for n in local_names)
        self.search = tuple(s.lower().strip(".") for s in search)

    def connection(self, proto: str, ip: str, port: int) -> str:
        flt = self.outgoing
        # An entry hits when it matches under any of the names the address is known by.
        decisions = {flt.decide(name, ip, port, proto) for name in self.names.names(ip) or [None]}
        if flt.side == "local":
            return "local" if "local" in decisions else "remote"
        return "remote" if "remote" in decisions else "local"

    def query(self, name: str) -> str:
        if self.local_names:
            name_ = name.lower().rstrip(".")
            if name_ in self.local_names:
                return "local"
            first, _, rest = name_.partition(".")
            if first in self.local_names and rest in self.search:
                return "nxdomain"
        return self.dns.decide(name)


async def agent_host_key(files: SessionFiles, timeout: float) -> str:
    """The agent's public host key. A Kubernetes agent makes its own, and the runner writes it
    here once the agent has announced it; the sidecar starts alongside the agent, so wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not files.agent_host_public_key.exists():
        if loop.time() > deadline:
            raise TimeoutError(f"no agent host key within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return files.agent_host_public_key.read_text().strip()


async def amain(args: argparse.Namespace) -> int:
    files = SessionFiles(Path(args.session_dir))
    settings = SidecarSettings.read(files.sidecar_settings)
    outgoing = settings.outgoing_filter()
    kernel = outgoing.kernel_rules()   # what iptables decides; the rest the proxies ask per connection
    rules, dns_enabled = settings.rules(kernel), settings.dns.enabled
    keys = LinkKeys(str(files.client_key), await agent_host_key(files, settings.connect_timeout))
    # The sidecar starts alongside the agent: wait for the agent's socket.
    link = await Link.connect_unix(str(files.agent_socket), keys, role="sidecar", wait=settings.connect_timeout)
    info = await link.control.info()
    links = LinkKeeper(link, str(files.agent_socket), keys, settings.reconnect_grace)

    if settings.local_subnets:   # a compose project's networks: the sidecar's own
        rules = dataclasses.replace(rules, local_cidrs=rules.local_cidrs + tuple(
            (cidr, None, None) for cidr in await asyncio.to_thread(own_subnets)))
    names = NameCache()
    # Our resolver answers every query: remote ones through the agent, local ones (dns off, or
    # the filter says so) from the resolver this container had, over sockets that bypass our rules.
    own_resolv = Path("/etc/resolv.conf").read_text()
    target_resolv = ResolvConf.parse(info.resolv_conf)
    search = (target_resolv if dns_enabled else ResolvConf.parse(own_resolv)).search
    decider = Decider(outgoing, settings.dns_filter(), names, settings.local_names, tuple(search))
    local_dns = Forwarder(lambda: own_resolv, mark=BYPASS_MARK)
    if dns_enabled:
        hosts = info.hosts or "127.0.0.1\tlocalhost\n"
        Path("/etc/hosts").write_text(hosts)
        names.learn_hosts(hosts)
        Path("/etc/resolv.conf").write_text(resolv_conf_for_app(info.resolv_conf))
    else:
        Path("/etc/resolv.conf").write_text(resolv_conf_for_app(own_resolv))
    per_connection = kernel.proxy_decides

    v6 = info.ipv6 and ipv6_on()   # the target has IPv6: the app's namespace gets it too, bridged alike
    net = NetSetup(rules, v6=v6)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    services: list = []
    # a Docker agent on our kernel hands over sockets of the target's namespace (TCP, DNS)
    handoff = HandoffClient(str(files.handoff_socket)) if files.handoff_socket.exists() else None
    try:
        await asyncio.to_thread(net.apply)  # pyroute2's sync API runs an event loop of its own
        v6 = net.v6   # off again if the kernel refused IPv6's rules
        if rules.tcp:
            services.append(TcpProxy(links, rules.tcp_port, decide=(
                lambda ip, port: decider.connection("tcp", ip, port)) if per_connection else None, handoff=handoff, v6=v6))
        if rules.udp:
            services.append(UdpRelay(links, rules.udp_port, decide=(
                lambda ip, port: decider.connection("udp", ip, port)) if per_connection else None, v6=v6))
        remote_dns = links.dns
        if handoff is not None and dns_enabled:   # the agent off the path of every query
            handed = HandedResolver(await handoff.udp(), target_resolv, links.dns)
            services.append(handed)   # started below, before the DNS server that uses it
            remote_dns = handed.query
        services.append(DnsServer(remote_dns, local_dns.forward, decider.query, names.learn_answer))
        # the files' loopback port is the sidecar's own: incoming's port following leaves it alone
        mounts = FileMounts(links, settings.files, files.files_missing) if settings.files is not None else None
        if settings.incoming is not None:
            own = {rules.tcp_port, 53} | ({mounts.port} if mounts is not None else set())
            services.append(IncomingPorts(links, settings.incoming, own_ports=own, handoff=handoff))
        if mounts is not None:
            services.append(mounts)
        for service in services:
            await service.start()
        print("PODTWIN_SIDECAR_READY", flush=True)
        Path(READY_FILE).touch()   # what a compose healthcheck looks for
        closed = loop.create_task(links.keep(), name="sidecar:link")
        stopped = loop.create_task(stop.wait(), name="sidecar:signal")
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if stop.is_set() else 1
        if code:
            log.error("%s; exiting", closed.result())
        for task in (closed, stopped):
            task.cancel()
        return code
    finally:
        for service in reversed(services):
            service.close()
        await asyncio.to_thread(net.restore)
        links.link.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podtwin-sidecar")
    p.add_argument("--session-dir", default=str(SessionFiles.in_container().root))
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
