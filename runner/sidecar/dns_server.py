"""The app's nameserver: 127.0.0.1:53 (UDP and TCP) in the shared namespace, answered by the agent.

The app's own resolver applies the target's search list and /etc/hosts (the sidecar copied both);
each DNS message it sends is passed through the link unchanged and answered by the target's
nameservers. When no nameserver answers, the app gets SERVFAIL, never the host's resolver.
"""
from __future__ import annotations

import asyncio
import logging
import struct

log = logging.getLogger("podtwin.sidecar.dns")


def servfail(query: bytes) -> bytes:
    """A SERVFAIL answer to ``query`` (header flags: QR=1, same opcode and RD, RA=1, RCODE=2)."""
    if len(query) < 12:
        return b""
    flags = struct.unpack_from("!H", query, 2)[0]
    flags = 0x8000 | (flags & 0x7900) | 0x0080 | 0x0002
    qdcount = struct.unpack_from("!H", query, 4)[0]
    return query[:2] + struct.pack("!HHHHH", flags, qdcount, 0, 0, 0) + query[12:]


class DnsServer:
    def __init__(self, resolve, host: str = "127.0.0.1", port: int = 53) -> None:
        self.resolve = resolve  # async (query bytes) -> answer bytes (b"" when nothing answered)
        self.host, self.port = host, port
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def answer(self, query: bytes) -> bytes:
        try:
            answer = await self.resolve(query)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            log.debug("dns: %r", exc)
            answer = b""
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
                task = loop.create_task(reply(), name="dns:udp")
                server.tasks.add(task)
                task.add_done_callback(server.tasks.discard)

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
        for task in list(self.tasks):
            task.cancel()
