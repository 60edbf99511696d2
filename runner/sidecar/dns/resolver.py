"""The app's nameserver: 127.0.0.1:53 (UDP and TCP) in the shared namespace, answered by the agent.

The app's own resolver applies the target's search list and /etc/hosts (the sidecar copied both);
each DNS message it sends is passed through the link unchanged and answered by the target's
nameservers. When no nameserver answers, the app gets SERVFAIL, never the host's resolver.
"""
from __future__ import annotations

import asyncio
import logging
import struct

from podtwin.agent.tasks import TaskSet
from podtwin.runner.sidecar.dns.names import question_name

log = logging.getLogger("podtwin.sidecar.dns")


def _end_of_questions(query: bytes, count: int) -> int | None:
    """Offset just past the question section, or None if it is malformed."""
    pos = 12
    for _ in range(count):
        while True:
            if pos >= len(query):
                return None
            length = query[pos]
            if length == 0:
                pos += 1
                break
            if length & 0xC0 == 0xC0:  # a compression pointer ends the name
                pos += 2
                break
            pos += 1 + length
        pos += 4  # QTYPE, QCLASS
    return pos if pos <= len(query) else None


def servfail(query: bytes) -> bytes:
    """A SERVFAIL answer to ``query``: the same id and question; QR=1, opcode, RD and CD copied,
    RA=1, RCODE=2; no other section (an EDNS OPT record of the query is not echoed)."""
    if len(query) < 12:
        return b""
    flags = struct.unpack_from("!H", query, 2)[0]
    flags = 0x8000 | (flags & 0x7910) | 0x0080 | 0x0002
    qdcount = struct.unpack_from("!H", query, 4)[0]
    end = _end_of_questions(query, qdcount)
    if end is None:
        qdcount, end = 0, 12
    return query[:2] + struct.pack("!HHHHH", flags, qdcount, 0, 0, 0) + query[12:end]


def nxdomain(query: bytes) -> bytes:
    """A "no such name" answer to ``query``, in the form of ``servfail``'s but RCODE=3."""
    answer = servfail(query)
    return answer[:3] + bytes([(answer[3] & 0xF0) | 3]) + answer[4:] if answer else b""


class DnsServer:
    """``remote`` and ``local`` are async (query bytes) -> answer bytes (b"" when nothing
    answered); ``decide(name)`` picks one per query ("remote", "local", or "nxdomain": answered
    here, not found); ``learn(answer)`` sees every answer."""

    def __init__(self, remote, local=None, decide=None, learn=None,
                 host: str = "127.0.0.1", port: int = 53) -> None:
        self.remote, self.local = remote, local
        self.decide = decide or (lambda name: "remote")
        self.learn = learn or (lambda answer: None)
        self.host, self.port = host, port
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.base_events.Server | None = None
        self.tasks = TaskSet("dns")

    async def answer(self, query: bytes) -> bytes:
        name = question_name(query)
        side = self.decide(name) if name is not None and self.local is not None else "remote"
        if side == "nxdomain":
            return nxdomain(query)
        try:
            answer = await (self.local if side == "local" else self.remote)(query)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            log.debug("dns %s (%s): %r", name, side, exc)
            answer = b""
        if answer:
            self.learn(answer)
        return answer or servfail(query)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr) -> None:
                async def reply() -> None:
                    self.transport.sendto(await server.answer(data), addr)
                server.tasks.spawn(reply(), "udp")

        self.udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
        self.tcp = await asyncio.start_server(self._tcp, self.host, self.port)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                answer = await self.answer(await reader.readexactly(length))
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        self.tasks.cancel_all()
