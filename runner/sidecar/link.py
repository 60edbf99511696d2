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

from podtwin.runner.link.client import Link, LinkKeys, reconnect

log = logging.getLogger("podtwin.sidecar.link")


class LinkDown(ConnectionError):
    """The link did not come back in time."""


class LinkKeeper:
    def __init__(self, link: Link, path: str, keys: LinkKeys, grace: float) -> None:
        self.link, self.path, self.keys, self.grace = link, path, keys, grace
        self.up = asyncio.Event()
        self.up.set()
        self.on_back: list[Callable[[Link], None]] = []

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
            link = await self._reconnect()
            if isinstance(link, str):
                return f"the link to the agent broke: {link}"
            self.link = link
            self.up.set()
            log.info("the link to the agent is back")
            for callback in self.on_back:
                callback(link)

    async def _reconnect(self) -> Link | str:
        async def gone(exc: BaseException) -> str | None:
            # nobody serves the session's socket any more: the agent (Docker) or the runner is gone
            return "nobody answers at the agent's socket any more" if isinstance(
                exc, (FileNotFoundError, ConnectionRefusedError)) else None
        return await reconnect(lambda: Link.connect_unix(self.path, self.keys, role="sidecar"), self.grace, gone)
