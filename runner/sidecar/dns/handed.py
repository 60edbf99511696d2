"""DNS without the agent on the path: queries sent from a UDP socket of the target's network
namespace, which the agent handed over once (``podtwin.agent.link.handoff``; a Docker target on
the same engine), straight to the target's nameservers, with the target's timeout and attempts.

Each query gets an id of this resolver's own while it is out (apps' ids may collide), restored
in the answer. A truncated answer is asked again through ``fallback`` (the agent, over the link,
which retries over TCP), as is everything when the target has only IPv6 nameservers.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

from podtwin.agent.dns import ResolvConf, is_truncated

log = logging.getLogger("podtwin.sidecar.dns")


class HandedResolver:
    def __init__(self, sock: socket.socket, conf: ResolvConf,
                 fallback: Callable[[bytes], Awaitable[bytes]]) -> None:
        self.sock, self.conf, self.fallback = sock, conf, fallback
        self.servers = [s for s in (conf.nameservers or ("127.0.0.1",)) if ":" not in s]
        self.pending: dict[int, tuple[asyncio.Future, str]] = {}
        self.next_id = 1
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        resolver = self

        class Answers(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                resolver._answer(data, addr)

        self.sock.setblocking(False)
        self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Answers, sock=self.sock)

    def _answer(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        waiting = self.pending.get(int.from_bytes(data[:2], "big"))
        if waiting is not None and waiting[1] == addr[0] and not waiting[0].done():
            waiting[0].set_result(data)

    def _new_id(self) -> int:
        for _ in range(65536):
            ident, self.next_id = self.next_id, self.next_id % 65535 + 1
            if ident not in self.pending:
                return ident
        raise OSError("no free DNS id")

    async def query(self, query: bytes) -> bytes:
        if not self.servers or len(query) < 12 or self.transport is None:
            return await self.fallback(query)
        loop = asyncio.get_running_loop()
        for _ in range(self.conf.attempts):
            for server in self.servers:
                ident = self._new_id()
                answer: asyncio.Future = loop.create_future()
                self.pending[ident] = (answer, server)
                try:
                    self.transport.sendto(ident.to_bytes(2, "big") + query[2:], (server, 53))
                    data = await asyncio.wait_for(answer, self.conf.timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    log.debug("nameserver %s: %r", server, exc)
                    continue
                finally:
                    self.pending.pop(ident, None)
                data = query[:2] + data[2:]
                return await self.fallback(query) if is_truncated(data) else data
        return b""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for answer, _ in self.pending.values():
            answer.cancel()
