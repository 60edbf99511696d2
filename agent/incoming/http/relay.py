"""The asyncio driver for one stolen client connection with an HTTP filter.

All socket I/O and timing for filtered incoming traffic happens here; the decisions are made by
the sans-IO routers (``router``, ``http1``, ``http2``, ``raw``) through the interface in
``commands``. One reader task per open stream (client, local, target) turns bytes and end of
file into events on one bounded queue, and so does a timer task for each Wake; a single loop
feeds them to the router and executes the commands it returns, in order. The bounded queue is
the backpressure: when the loop is waiting for a slow writer to drain, the readers stop reading.

Upstream connections are opened lazily, at most one per destination at a time, by awaiting the
caller's ``open_local`` / ``open_target`` (they return ``(reader, writer)`` streams; asyncssh's
SSHReader/SSHWriter fit too). A failed open is reported to the router, which answers the request
with 502 instead of dropping the client connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from podtwin.agent.incoming.http.commands import (CLIENT, LOCAL, TARGET, Close, Command, Connect,
                                                  ConnectFailed, DataReceived, EofReceived, Event,
                                                  Passthrough, Router, Send, Shutdown, Start, Wake,
                                                  Woken)
from podtwin.agent.incoming.http.filter import HttpFilter
from podtwin.agent.incoming.http.router import DETECT_TIMEOUT, ConnectionRouter

log = logging.getLogger("podtwin.agent.incoming.http.relay")

Opener = Callable[[], Awaitable[tuple]]

READ_SIZE = 65536
QUEUE_SIZE = 32          # events in flight (each at most READ_SIZE bytes)
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


async def relay_filtered(client_reader, client_writer, http_filter: HttpFilter,
                         open_target: Opener, open_local: Opener, *,
                         detect_timeout: float = DETECT_TIMEOUT) -> None:
    """Relay one client connection until either side is done; never raises for I/O errors.

    ``detect_timeout``: if the client has not sent enough to tell HTTP from something else
    within this many seconds, the connection is passed to the target unchanged.
    """
    relay = _Relay(client_reader, client_writer, ConnectionRouter(http_filter, detect_timeout),
                   {TARGET: open_target, LOCAL: open_local})
    try:
        await relay.run()
    except Exception:  # a bug on one connection must not take the agent down
        log.exception("%s: relay failed", relay.name)


class _Relay:
    def __init__(self, client_reader, client_writer, router: Router,
                 openers: dict[str, Opener]) -> None:
        self.router = router
        self.openers = openers
        self.writers = {CLIENT: client_writer}
        self.readers: dict[str, asyncio.Task] = {}
        self.timers: set[asyncio.Task] = set()
        self.generation = {CLIENT: 0, LOCAL: 0, TARGET: 0}  # tells stale reader events apart
        # (event, generation of the stream it was read from, or None from a timer)
        self.events: asyncio.Queue[tuple[Event, int | None]] = asyncio.Queue(QUEUE_SIZE)
        self.done = False
        peer = client_writer.get_extra_info("peername") if client_writer else None
        self.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "client"
        self._spawn_reader(CLIENT, client_reader)

    async def run(self) -> None:
        try:
            await self._execute(self.router.handle(Start()))
            while not self.done:
                event, generation = await self.events.get()
                if generation is not None and (generation != self.generation[event.source]
                                               or event.source not in self.writers):
                    continue  # read from a connection already closed
                await self._execute(self.router.handle(event))
        finally:
            await self._shutdown()

    # -- commands -------------------------------------------------------------------------
    async def _execute(self, commands: list[Command]) -> None:
        pending = list(commands)
        while pending and not self.done:
            command = pending.pop(0)
            if isinstance(command, Connect):
                error = await self._open(command.dest)
                if error is not None:
                    # What the router queued for that connection is moot; it will answer 502.
                    pending = _drop_until_connect(pending, command.dest)
                    pending += self.router.handle(ConnectFailed(command.dest, error))
            elif isinstance(command, Send):
                await self._write(command.dest, command.data)
            elif isinstance(command, Shutdown):
                writer = self.writers.get(command.dest)
                if writer is not None:
                    with contextlib.suppress(Exception):
                        if writer.can_write_eof():
                            writer.write_eof()
            elif isinstance(command, Close):
                if command.dest == CLIENT:
                    self.done = True
                else:
                    await self._close_upstream(command.dest)
            elif isinstance(command, Passthrough):
                log.debug("%s: passthrough to %s", self.name, command.dest)
            elif isinstance(command, Wake):
                self._spawn_timer(command.after)

    async def _open(self, dest: str) -> str | None:
        await self._close_upstream(dest)  # a Connect replaces any previous connection
        try:
            reader, writer = await asyncio.wait_for(self.openers[dest](), CONNECT_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # OSError, timeout, asyncssh.ChannelOpenError...
            log.info("%s: cannot connect to %s: %r", self.name, dest, exc)
            return str(exc) or type(exc).__name__
        self.writers[dest] = writer
        self._spawn_reader(dest, reader)
        return None

    async def _write(self, dest: str, data: bytes) -> None:
        writer = self.writers.get(dest)
        if writer is None:
            return
        try:
            writer.write(data)
            await writer.drain()
        except Exception as exc:  # OSError, or asyncssh's errors for a closed channel
            # The reader of that stream sees the reset too and reports the end of file.
            log.debug("%s: write to %s failed: %r", self.name, dest, exc)

    async def _close_upstream(self, dest: str) -> None:
        writer = self.writers.pop(dest, None)
        self.generation[dest] += 1
        task = self.readers.pop(dest, None)
        if task is not None:
            task.cancel()
        if writer is not None:
            await _close_writer(writer)

    # -- readers --------------------------------------------------------------------------
    def _spawn_reader(self, source: str, reader) -> None:
        generation = self.generation[source]
        task = asyncio.get_running_loop().create_task(
            self._read(source, generation, reader), name=f"httprelay:{self.name}:{source}")
        self.readers[source] = task

    async def _read(self, source: str, generation: int, reader) -> None:
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except Exception as exc:  # reset by peer, asyncssh channel errors: an end of file
                log.debug("%s: read from %s failed: %r", self.name, source, exc)
                data = b""
            await self.events.put((DataReceived(source, data) if data else EofReceived(source),
                                   generation))
            if not data:
                return

    # -- timers ---------------------------------------------------------------------------
    def _spawn_timer(self, after: float) -> None:
        task = asyncio.get_running_loop().create_task(
            self._wake(after), name=f"httprelay:{self.name}:wake")
        self.timers.add(task)
        task.add_done_callback(self.timers.discard)

    async def _wake(self, after: float) -> None:
        await asyncio.sleep(after)
        await self.events.put((Woken(), None))

    # -- the end --------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.done = True
        tasks = [*self.readers.values(), *self.timers]
        self.readers.clear()
        self.timers.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        writers = list(self.writers.values())
        self.writers.clear()
        await asyncio.gather(*(_close_writer(w) for w in writers), return_exceptions=True)


def _drop_until_connect(commands: list[Command], dest: str) -> list[Command]:
    """Remove the commands meant for a connection that failed to open (up to a new Connect)."""
    kept, dropping = [], True
    for command in commands:
        if isinstance(command, Connect) and command.dest == dest:
            dropping = False
        if dropping and isinstance(command, (Send, Shutdown, Close)) and command.dest == dest:
            continue
        kept.append(command)
    return kept


async def _close_writer(writer) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        wait_closed = getattr(writer, "wait_closed", None)
        if wait_closed is not None:
            await asyncio.wait_for(wait_closed(), CLOSE_TIMEOUT)
