"""The runner's one background event loop: the owner link and a Kubernetes transport's relay of
the session socket run on it, while the main thread runs the session's blocking steps."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class LoopThread:
    def __init__(self, name: str = "podtwin-link") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 30) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        if not self.thread.is_alive():
            self.thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, callback, *args) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(callback, *args)

    def stop(self) -> None:
        """Cancel what still runs on the loop (e.g. a relay still opening a stream for a client
        that went away), let it finish, then stop the loop."""
        if not self.thread.is_alive():
            return
        try:
            self.run(_cancel_others(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()   # and with it what the loop still held (sockets, the executor)


async def _cancel_others() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
