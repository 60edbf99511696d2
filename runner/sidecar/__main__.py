"""podtwin sidecar: owns the app's network namespace and bridges it to the agent.

``python -m podtwin.runner.sidecar --link unix:/podtwin/agent.sock --session-dir /podtwin``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from podtwin.agent.dns import ResolvConf
from podtwin.runner.link import Link, LinkKeys

from .dns_server import DnsServer
from .netsetup import NetSetup
from .rules import RuleSettings
from .tcp_proxy import TcpProxy
from .udp_proxy import UdpRelay

log = logging.getLogger("podtwin.sidecar")


def resolv_conf_for_app(target_resolv: str) -> str:
    """The target's search list and options, with our loopback resolver as the only nameserver."""
    conf = ResolvConf.parse(target_resolv)
    lines = ["# written by podtwin: queries go to the target's nameservers through the agent",
             "nameserver 127.0.0.1"]
    if conf.search:
        lines.append("search " + " ".join(conf.search))
    if conf.options:
        lines.append("options " + " ".join(conf.options))
    return "\n".join(lines) + "\n"


def load_settings(path: Path) -> tuple[RuleSettings, bool]:
    raw = json.loads(path.read_text())
    rules = RuleSettings(
        tcp=bool(raw.get("tcp", True)),
        udp=bool(raw.get("udp", True)),
        local_cidrs=tuple((c, p, proto) for c, p, proto in raw.get("local_cidrs", [])),
        remote_cidrs=None if raw.get("remote_cidrs") is None
        else tuple((c, p, proto) for c, p, proto in raw["remote_cidrs"]),
    )
    return rules, bool(raw.get("dns", True))


async def amain(args: argparse.Namespace) -> int:
    session = Path(args.session_dir)
    rules, dns_enabled = load_settings(session / "sidecar.json")
    keys = LinkKeys(str(session / "client_key"), (session / "agent_host_key.pub").read_text().strip())
    # The sidecar starts alongside the agent: wait for the agent's socket.
    link = await Link.connect_unix(str(session / "agent.sock"), keys, role="sidecar",
                                   wait=float(json.loads((session / "sidecar.json").read_text())
                                              .get("connect_timeout", 60)))
    info = await link.control.info()

    Path("/etc/hosts").write_text(info.get("hosts") or "127.0.0.1\tlocalhost\n")
    if dns_enabled:
        Path("/etc/resolv.conf").write_text(resolv_conf_for_app(info.get("resolv_conf", "")))

    net = NetSetup(rules)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    services: list = []
    try:
        await asyncio.to_thread(net.apply)  # pyroute2's sync API runs an event loop of its own
        if rules.tcp:
            services.append(TcpProxy(link, rules.tcp_port))
        if rules.udp:
            services.append(UdpRelay(link.control, rules.udp_port))
        if dns_enabled:
            services.append(DnsServer(link.control.dns))
        for service in services:
            await service.start()
        print("PODTWIN_SIDECAR_READY", flush=True)
        closed = loop.create_task(link.wait_closed(), name="sidecar:link")
        stopped = loop.create_task(stop.wait(), name="sidecar:signal")
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if stop.is_set() else 1
        if code:
            log.error("the link to the agent closed; exiting")
        for task in (closed, stopped):
            task.cancel()
        return code
    finally:
        for service in reversed(services):
            service.close()
        await asyncio.to_thread(net.restore)
        link.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podtwin-sidecar")
    p.add_argument("--session-dir", default="/podtwin")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
