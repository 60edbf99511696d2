"""The runner's own connection to the agent: the agent's lifeline.

The runner holds it for the whole session and ends the session through it (END). It carries the
agent's notices to the user. When it *breaks* (the transport under it dropped: a port-forward
stream closed, the API server restarted, the machine slept), the runner connects again for up to
``agent.reconnect_grace`` seconds while the agent keeps the session; only past that, or when the
agent itself is gone, is the session lost.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import asyncssh

from podtwin.agent.link import wire
from podtwin.runner.errors import AgentError
from podtwin.runner.link.client import Link, LinkKeys, reconnect
from podtwin.runner.link.loop import LoopThread
from podtwin.runner.state.files import SessionFiles

log = logging.getLogger("podtwin.link")


class OwnerLink:
    """``on_lost(why)``: the session's link is gone for good; ``on_notice(level, message)``: the
    agent has something to say; ``report(message)``: a progress line (link lost, link back);
    ``agent_gone()``: whether the agent is known to have ended (asked between attempts, from a
    worker thread: True ends the waiting at once)."""

    def __init__(self, loop: LoopThread, files: SessionFiles, on_lost: Callable[[str], None],
                 on_notice: Callable[[str, str], None] = lambda level, message: None,
                 report: Callable[[str], None] = lambda message: None, grace: float = 0.0,
                 agent_gone: Callable[[], bool] = lambda: False) -> None:
        self.loop, self.files = loop, files
        self.on_lost, self.on_notice, self.report = on_lost, on_notice, report
        self.grace, self.agent_gone = grace, agent_gone
        self.link: Link | None = None
        self.keys: LinkKeys | None = None
        self.closing = False
        self.watcher: asyncio.Task | None = None

    def connect(self, host_key: str, timeout: float) -> wire.Info:
        """Connect over the session's socket; the target's info (env, pid, resolver files)."""
        self.keys = LinkKeys(str(self.files.client_key), host_key)

        async def go() -> wire.Info:
            self.link = await self._open()
            self.watcher = asyncio.get_running_loop().create_task(self._watch(), name="runner:link-watch")
            return await self.link.control.info()
        try:
            return self.loop.run(go(), timeout)
        except (asyncssh.Error, OSError, ConnectionError, TimeoutError) as exc:
            raise AgentError(f"could not open the link to the agent ({type(exc).__name__}: {exc})",
                             "run `podtwin doctor`, or rerun with --log-level debug") from exc

    async def _open(self) -> Link:
        assert self.keys is not None
        link = await Link.connect_unix(str(self.files.agent_socket), self.keys, role="runner")
        link.control.on_notice = self.on_notice
        return link

    async def _watch(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never sit on a dead link without saying so
            log.exception("watching the link")
            if not self.closing:
                self.on_lost(f"podtwin could not follow it ({type(exc).__name__}: {exc})")

    async def _follow(self) -> None:
        while True:
            assert self.link is not None
            await self.link.wait_closed()
            if self.closing:
                return
            if not self.link.broken or self.grace <= 0:
                self.on_lost("the agent or the target stopped")
                return
            why = await self._reconnect()
            if why:
                self.on_lost(why)
                return

    async def _reconnect(self) -> str | None:
        """Connect again until the grace is over; None once the link is back, else why not."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.report("link lost, reconnecting")

        async def gone(exc: BaseException) -> str | None:
            return "the agent is gone" if await asyncio.to_thread(self._agent_gone) else None
        link = await reconnect(self._open, self.grace, gone,
                               waiting=lambda elapsed: self.report(f"link lost, reconnecting ({elapsed:.0f} s)"))
        if isinstance(link, str):
            return link
        self.link = link
        self.report(f"link back after {loop.time() - started:.1f} s")
        return None

    def _agent_gone(self) -> bool:
        try:
            return self.agent_gone()
        except Exception as exc:  # noqa: BLE001 - an engine or API server that cannot say: keep trying
            log.info("is the agent gone? %r", exc)
            return False

    def close(self) -> None:
        """End the session (the agent removes its rules and exits), then close the link. A
        reconnection under way is stopped first, so END goes to the link of the moment."""
        self.closing = True
        if self.link is not None and self.loop.thread.is_alive():
            try:
                self.loop.run(self._end(), timeout=8)
            except Exception:  # noqa: BLE001 - on the way out; the placement removes the agent anyway
                if self.link is not None:
                    self.loop.call_soon(self.link.close)

    async def _end(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
        assert self.link is not None
        await self.link.end()
