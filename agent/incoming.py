"""Incoming traffic: connections stolen from the target's ports, handed to a client over the link.

A client (the sidecar) subscribes a port on its control channel, then asks for SSH remote
forwarding of ``(INCOMING_HOST, port)``. The agent adds a REDIRECT for that port to its own
listener; each connection arriving there is forwarded back to the subscriber as a
``forwarded-tcpip`` channel, whose other end is the app's port in the app's namespace.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import asyncssh

from .rules import SessionRules, liveness_name

log = logging.getLogger("podtwin.agent.incoming")
INCOMING_HOST = "podtwin-incoming"
SO_ORIGINAL_DST = 80
STEAL_MODES = ("steal",)


@dataclass
class Subscription:
    port: int
    mode: str
    owner: Any                      # the AgentConnection that subscribed
    http_filter: dict | None = None
    active: bool = False


class PortListener(asyncssh.SSHListener):
    """What the agent returns to a remote-forwarding request: it does not bind the port (the
    target's process has it); it only marks the subscription active until the client cancels."""

    def __init__(self, on_close: Callable[[], None], port: int) -> None:
        super().__init__()
        self._on_close = on_close
        self._port = port
        self._closed = asyncio.Event()

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._on_close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


async def _pump(reader, writer) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncssh.Error):
        writer.close()


@dataclass
class IncomingServer:
    session_id: str
    notify: Callable[[str, str], None] = lambda level, message: None
    subs: dict[int, Subscription] = field(default_factory=dict)
    rules: SessionRules | None = None
    _listener: socket.socket | None = None
    _liveness: socket.socket | None = None
    _tasks: set = field(default_factory=set)

    async def start(self) -> None:
        """Listen (any port, all addresses) and announce liveness in this namespace."""
        self._listener = socket.create_server(("0.0.0.0", 0), backlog=128)
        self._listener.setblocking(False)
        self.rules = SessionRules(self.session_id, self._listener.getsockname()[1])
        self._liveness = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._liveness.bind(liveness_name(self.session_id))
        self._liveness.listen(8)
        self._liveness.setblocking(False)
        self._spawn(self._accept(), "incoming:accept")
        self._spawn(self._hold_liveness(), "incoming:liveness")

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold_liveness(self) -> None:
        """Accept guards' connections and keep them open: they see EOF when the agent dies."""
        loop = asyncio.get_running_loop()
        held = []
        while True:
            conn, _ = await loop.sock_accept(self._liveness)
            held.append(conn)

    # -- subscriptions (called from the control channel and the SSH server) ----------------
    async def subscribe(self, owner, port: int, mode: str, http_filter: dict | None) -> str | None:
        """Validate a subscription; None if accepted, else the reason it is refused."""
        if mode not in STEAL_MODES:
            return f"incoming mode {mode!r} is not supported by this agent"
        if not 0 < port < 65536:
            return f"port {port} is out of range"
        current = self.subs.get(port)
        if current is not None and current.owner is not owner:
            return f"port {port} is already taken by another client of this session"
        other = await asyncio.to_thread(self.rules.other_owner, port)
        if other is not None:
            return f"port {port} is already stolen by podtwin session {other}"
        self.subs[port] = Subscription(port, mode, owner, http_filter)
        return None

    def activate(self, owner, port: int) -> PortListener | None:
        """The client's remote-forwarding request for a subscribed port: install the rule."""
        sub = self.subs.get(port)
        if sub is None or sub.owner is not owner:
            return None
        self.rules.add(port)
        sub.active = True
        self.notify("info", f"stealing port {port}")
        return PortListener(lambda: self.unsubscribe(owner, port), port)

    def unsubscribe(self, owner, port: int) -> None:
        sub = self.subs.get(port)
        if sub is not None and sub.owner is owner:
            del self.subs[port]
            self.rules.remove(port)
            if sub.active:
                self.notify("info", f"port {port} released")

    def drop_owner(self, owner) -> None:
        for port, sub in list(self.subs.items()):
            if sub.owner is owner:
                self.unsubscribe(owner, port)

    # -- connections -----------------------------------------------------------------------
    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(self._listener)
            self._spawn(self._handle(conn, peer), "incoming:conn")

    async def _handle(self, conn: socket.socket, peer) -> None:
        try:
            _, port = _original_dst(conn)
        except OSError:
            conn.close()  # dialled directly, not redirected: nobody's business
            return
        sub = self.subs.get(port)
        reader, writer = await asyncio.open_connection(sock=conn)
        if sub is None or not sub.active:
            writer.close()  # a rule without a live subscription (being removed): refuse
            return
        try:
            r_reader, r_writer = await sub.owner.conn.open_connection(
                INCOMING_HOST, port, peer[0], peer[1], encoding=None)
        except (asyncssh.Error, OSError) as exc:
            log.info("port %d: the client did not take the connection: %s", port, exc)
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, r_writer), _pump(r_reader, writer))
        finally:
            r_writer.close()
            writer.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.rules is not None:
            self.rules.remove_all()
        for sock in (self._listener, self._liveness):
            if sock is not None:
                sock.close()
