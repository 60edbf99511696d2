"""The runner's own connection to the agent: the agent's lifeline.

The runner holds it for the whole session; when the runner dies, the connection drops and the
agent removes what it set up and exits. It also carries the agent's notices to the user.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import asyncssh

from podtwin.agent.link import wire
from podtwin.runner.errors import AgentError
from podtwin.runner.link.client import Link, LinkKeys
from podtwin.runner.link.loop import LoopThread
from podtwin.runner.state.files import SessionFiles


class OwnerLink:
    def __init__(self, loop: LoopThread, files: SessionFiles, on_lost: Callable[[], None],
                 on_notice: Callable[[str, str], None] = lambda level, message: None) -> None:
        self.loop, self.files = loop, files
        self.on_lost, self.on_notice = on_lost, on_notice
        self.link: Link | None = None
        self.closing = False

    def connect(self, host_key: str, timeout: float) -> wire.Info:
        """Connect over the session's socket; the target's info (env, pid, resolver files)."""
        keys = LinkKeys(str(self.files.client_key), host_key)

        async def go() -> wire.Info:
            self.link = await Link.connect_unix(str(self.files.agent_socket), keys, role="runner")
            self.link.control.on_notice = self.on_notice
            asyncio.get_running_loop().create_task(self._watch(), name="runner:link-watch")
            return await self.link.control.info()
        try:
            return self.loop.run(go(), timeout)
        except (asyncssh.Error, OSError, ConnectionError, TimeoutError) as exc:
            raise AgentError(f"could not open the link to the agent ({type(exc).__name__}: {exc})",
                             "run `podtwin doctor`, or rerun with --log-level debug") from exc

    async def _watch(self) -> None:
        assert self.link is not None
        await self.link.wait_closed()
        if not self.closing:
            self.on_lost()

    def close(self) -> None:
        self.closing = True
        if self.link is not None:
            self.loop.call_soon(self.link.close)
            time.sleep(0.05)
