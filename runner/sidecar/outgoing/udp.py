"""UDP relay: datagrams TPROXY'd to one socket become flows on the link's control channel.

A flow is (app address, original destination). Replies are sent back from a transparent socket
bound to the original destination, so the app sees them come from the address it sent to.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct

from podtwin.agent.sockopts import (IP_ORIGDSTADDR, IP_RECVORIGDSTADDR, IP_TRANSPARENT, IPV6_ORIGDSTADDR,
                                   IPV6_RECVORIGDSTADDR, IPV6_TRANSPARENT, SO_MARK, sockaddr)
from podtwin.agent.outgoing import UDP_IDLE_SECONDS
from podtwin.agent.tasks import expire_idle
from podtwin.runner.sidecar.outgoing.iptables import BYPASS_MARK

log = logging.getLogger("podtwin.sidecar.udp")
IDLE_SECONDS = UDP_IDLE_SECONDS   # the agent forgets a flow after as long


def transparent_socket(bind: tuple, recv_orig: bool = False) -> socket.socket:
    v6 = ":" in bind[0]
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    level = socket.IPPROTO_IPV6 if v6 else socket.SOL_IP
    sock.setsockopt(level, IPV6_TRANSPARENT if v6 else IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
    if recv_orig:
        sock.setsockopt(level, IPV6_RECVORIGDSTADDR if v6 else IP_RECVORIGDSTADDR, 1)
    sock.setblocking(False)
    sock.bind(bind)
    return sock


def parse_orig_dst(ancdata) -> tuple[str, int] | None:
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.SOL_IP, IP_ORIGDSTADDR), (socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR)) \
                and len(data) >= 8:
            return sockaddr(data)
    return None


class _Flow:
    """A flow through the agent (the default) or, when the filter keeps it local, straight out of
    the sidecar through a marked socket."""

    def __init__(self, relay: "UdpRelay", src: tuple[str, int], dst: tuple[str, int], local: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.reply = transparent_socket(dst)
        self.last_used = asyncio.get_running_loop().time()
        self.local: socket.socket | None = None
        self.control = None
        self.ident = 0
        if local:
            self.local = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_DGRAM)
            self.local.setblocking(False)
            self.local.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
            self.local.connect(dst[:2])
            asyncio.get_running_loop().add_reader(self.local.fileno(), self._local_readable)
        else:
            self.control = relay.links.control   # the flow lives and dies with this link's channel
            try:
                self.ident = self.control.udp_open(dst[0], dst[1], self.on_data, self.on_close)
            except ConnectionError:   # the link is down: the datagram is lost, as on the network
                self.reply.close()
                raise

    def _local_readable(self) -> None:
        assert self.local is not None
        while True:
            try:
                self.on_data(self.local.recv(65535))
            except (BlockingIOError, ConnectionRefusedError):
                return
            except OSError as exc:
                log.debug("local flow %s: %s", self.dst, exc)
                return

    def on_data(self, data: bytes) -> None:
        self.last_used = asyncio.get_running_loop().time()
        try:
            self.reply.sendto(data, self.src)
        except OSError as exc:
            log.debug("reply to %s: %s", self.src, exc)

    def on_close(self, reason: str) -> None:
        log.debug("flow %s closed by agent: %s", self.src, reason)
        self.relay.drop(self, notify=False)

    def send(self, data: bytes) -> None:
        self.last_used = asyncio.get_running_loop().time()
        if self.local is not None:
            try:
                self.local.send(data)
            except OSError as exc:
                log.debug("local flow %s: %s", self.dst, exc)
        else:
            self.control.udp_send(self.ident, data)

    def close(self) -> None:
        if self.local is not None:
            asyncio.get_running_loop().remove_reader(self.local.fileno())
            self.local.close()
        self.reply.close()


class UdpRelay:
    def __init__(self, links, port: int, decide=None, v6: bool = False) -> None:
        self.links = links   # the LinkKeeper: each new flow opens on the link of the moment
        self.port = port
        self.decide = decide  # (ip, port) -> "remote" | "local", for filters with host names
        self.flows: dict[tuple, _Flow] = {}
        self.hosts = ["127.0.0.1", "::1"] if v6 else ["127.0.0.1"]   # where TPROXY delivers
        self.socks: list[socket.socket] = []
        self.expiry: asyncio.Task | None = None

    async def start(self) -> None:
        for host in self.hosts:
            sock = transparent_socket((host, self.port), recv_orig=True)
            self.socks.append(sock)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock)
        self.expiry = asyncio.get_running_loop().create_task(
            expire_idle(self.flows, IDLE_SECONDS, lambda key, flow: self.drop(flow, notify=True)),
            name="udp:expiry")

    def _readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data, anc, _, src = sock.recvmsg(65535, socket.CMSG_SPACE(28))
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("recvmsg: %s", exc)
                return
            dst = parse_orig_dst(anc)
            if dst is None:
                continue
            key = (src, dst)
            flow = self.flows.get(key)
            try:
                if flow is None:
                    local = self.decide is not None and self.decide(dst[0], dst[1]) == "local"
                    flow = self.flows[key] = _Flow(self, src, dst, local)
                flow.send(data)
            except (ConnectionError, OSError) as exc:
                log.debug("udp %s -> %s: %s", src, dst, exc)

    def drop(self, flow: _Flow, notify: bool) -> None:
        if self.flows.get((flow.src, flow.dst)) is flow:
            del self.flows[(flow.src, flow.dst)]
        if notify and flow.local is None:
            try:
                flow.control.udp_close(flow.ident)
            except ConnectionError:
                pass
        flow.close()

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        for sock in self.socks:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for flow in list(self.flows.values()):
            self.drop(flow, notify=False)
