"""The sidecar's link to the agent, kept up: when it breaks, connect again for up to the
session's reconnect grace while the app keeps running.

Services never hold a link of their own: they ask the keeper for the current one. New outgoing
connections wait for it (``wait``); datagrams and DNS queries sent while it is down are lost, as
on a network that blips; connections that were carried by the broken link are reset. Services
that hold something on the link (incoming ports' forwardings) are told when it is back
(``on_back``) and take it again.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import asyncssh

from podtwin.runner.link.client import Link, LinkKeys

log = logging.getLogger("podtwin.sidecar.link")

ATTEMPT_TIMEOUT = 10.0


class LinkDown(ConnectionError):
    """The link did not come back in time."""


class LinkKeeper:
    def __init__(self, link: Link, path: str, keys: LinkKeys, grace: float) -> None:
        self.link, self.path, self.keys, self.grace = link, path, keys, grace
        self.up = asyncio.Event()
        self.up.set()
        self.on_back: list[Callable[[Link], None]] = []
        self.reconnects = 0

    @property
    def control(self):
        """The current link's control channel (sending on it raises ConnectionError while down)."""
        return self.link.control

    async def wait(self, timeout: float | None = None) -> Link:
        """The link, once it is up (waiting up to ``timeout``, default the grace)."""
        if not self.up.is_set():
            try:
                await asyncio.wait_for(self.up.wait(), self.grace if timeout is None else timeout)
            except asyncio.TimeoutError:
                raise LinkDown("the link to the agent is down") from None
        return self.link

    async def open_tcp(self, host: str, port: int, orig: tuple[str, int] = ("", 0)):
        return await (await self.wait()).open_tcp(host, port, orig)

    async def dns(self, query: bytes) -> bytes:
        return await (await self.wait(timeout=5.0)).control.dns(query)

    async def keep(self) -> str:
        """Until the link is gone for good; returns why."""
        while True:
            await self.link.wait_closed()
            if not self.link.broken:
                return "the agent closed the link"
            if self.grace <= 0:
                return "the link to the agent broke"
            self.up.clear()
            log.warning("the link to the agent broke; reconnecting for up to %.0fs", self.grace)
            link, why = await self._reconnect()
            if link is None:
                return why
            self.link, self.reconnects = link, self.reconnects + 1
            self.up.set()
            log.info("the link to the agent is back")
            for callback in self.on_back:
                callback(link)

    async def _reconnect(self) -> tuple[Link | None, str]:
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self.grace, 0.2
        while loop.time() < deadline:
            try:
                return await asyncio.wait_for(Link.connect_unix(self.path, self.keys, role="sidecar"),
                                              min(ATTEMPT_TIMEOUT, max(deadline - loop.time(), 0.1))), ""
            except (FileNotFoundError, ConnectionRefusedError):
                # nobody serves the session's socket any more: the agent (Docker) or the runner is gone
                return None, "nobody answers at the agent's socket any more"
            except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
                log.info("reconnecting: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return None, f"the link did not come back within {self.grace:.0f}s"
