"""Transparent TCP proxy: each redirected connection becomes a direct-tcpip channel to the agent,
or, where the agent shares the sidecar's kernel (a Docker target), a socket it connected in the
target's namespace and handed over (``podtwin.agent.link.handoff``)."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct

from podtwin.agent.link.handoff import HANDOFF_BACKLOG, HandoffClient
from podtwin.agent.sockopts import SO_MARK, no_delay, original_dst
from podtwin.agent.streams import splice
from podtwin.runner.sidecar.outgoing.iptables import BYPASS_MARK

log = logging.getLogger("podtwin.sidecar.tcp")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, so the app sees 'connection refused/reset' as it would from the real peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


async def open_local(host: str, port: int):
    """A connection made from the sidecar itself, marked so its own rules let it through."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = no_delay(socket.socket(family, socket.SOCK_STREAM))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=256 * 1024)


class TcpProxy:
    """``decide(ip, port)`` says "remote" (through the agent) or "local" (from here) for each
    connection whose fate the kernel rules could not settle (filters with host names)."""

    def __init__(self, link, port: int, decide=None, handoff: HandoffClient | None = None, v6: bool = False) -> None:
        self.link = link     # the LinkKeeper
        self.handoff = handoff   # the agent shares our kernel: it hands over connected sockets
        self.port = port
        self.decide = decide
        self.hosts = ["127.0.0.1", "::1"] if v6 else ["127.0.0.1"]   # where the REDIRECTs land
        self.server: asyncio.base_events.Server | None = None
        self.active = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.hosts, self.port,
                                                 limit=256 * 1024, backlog=HANDOFF_BACKLOG)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            host, port = original_dst(sock)
        except OSError:
            writer.close()  # not a redirected connection: someone dialled the proxy port itself
            return
        if host in self.hosts and port == self.port:
            writer.close()
            return
        peer = writer.get_extra_info("peername") or ("", 0)
        side = self.decide(host, port) if self.decide is not None else "remote"
        try:
            if side == "local":
                r_reader, r_writer = await open_local(host, port)
            elif self.handoff is not None:
                r_reader, r_writer = await asyncio.open_connection(
                    sock=await self.handoff.connect(host, port), limit=256 * 1024)
            else:
                r_reader, r_writer = await self.link.open_tcp(host, port, orig=(peer[0], peer[1]))
        except Exception as exc:  # ChannelOpenError (refused, unreachable) or the link is gone
            log.debug("connect %s:%d failed: %s", host, port, exc)
            reset(writer)
            return
        self.active += 1
        try:
            await splice(reader, writer, r_reader, r_writer)
        finally:
            self.active -= 1

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
