"""Background tasks, owned and named: every task podtwin starts belongs to one ``TaskSet``, which
keeps a reference (so the task is not garbage-collected mid-flight), logs a task that fails
instead of losing its exception, and cancels what is left when its owner closes."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any, Hashable, Protocol

log = logging.getLogger("podtwin.tasks")


class TaskSet:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.prefix}:{name}")
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %r", task.get_name(), task.exception())

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def wait_all(self) -> None:
        """Until every task (cancelled ones included) has finished."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    def __len__(self) -> int:
        return len(self.tasks)


class Flow(Protocol):
    last_used: float   # the event loop's clock when the flow last carried a datagram


async def expire_idle(flows: MutableMapping[Hashable, Flow], idle: float,
                      drop: Callable[[Hashable, Flow], None]) -> None:
    """Forever: drop the flows not used for ``idle`` seconds, looking every ``idle / 4`` seconds.
    UDP has no end of its own: both ends of a relayed UDP flow forget it this way."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(idle / 4)
        now = loop.time()
        for key, flow in list(flows.items()):
            if now - flow.last_used > idle:
                drop(key, flow)
