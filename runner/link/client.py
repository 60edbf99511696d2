"""The client end of the link: an SSH connection to the agent plus its control channel.

Used by the runner (which holds the owner connection for the session's lifetime) and by the sidecar
(which carries the app's traffic). The transport is any connected stream socket: the session's unix
socket for Docker targets, a port-forward or exec stream for Kubernetes targets.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

import asyncssh

from podtwin.agent.link import wire

log = logging.getLogger("podtwin.link")


CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
ATTEMPT_TIMEOUT = 10.0    # one reconnection attempt (a stream through a struggling API server)
REPORT_EVERY = 5.0        # seconds between ``reconnect``'s ``waiting`` calls


@dataclass(frozen=True)
class LinkKeys:
    client_key: str   # path of the session's private key
    agent_host_key: str  # the agent's public host key, "ssh-ed25519 AAAA..."


class ControlChannel(asyncssh.SSHClientSession):
    """Request/response and datagram multiplexing over the control subsystem."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel | None = None
        self.decoder = wire.FrameDecoder()
        self.hello_ok: asyncio.Future[wire.HelloOk] = asyncio.get_running_loop().create_future()
        self.info_waiters: list[asyncio.Future[wire.Info]] = []
        self.dns_waiters: dict[int, asyncio.Future[bytes]] = {}
        self.udp_handlers: dict[int, tuple[Callable[[bytes], None], Callable[[str], None]]] = {}
        self.ids = itertools.count(1)
        self.incoming_waiters: dict[int, asyncio.Future[str | None]] = {}
        self.on_notice: Callable[[str, str], None] = lambda level, message: None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # -- asyncssh callbacks -----------------------------------------------------------------
    def connection_made(self, chan) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype) -> None:
        for msg in self.decoder.feed(data):
            self._dispatch(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = str(exc) if exc else "control channel closed"
        for fut in [self.hello_ok, *self.info_waiters, *self.dns_waiters.values(),
                    *self.incoming_waiters.values()]:
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        for _, on_close in list(self.udp_handlers.values()):
            on_close(reason)
        self.udp_handlers.clear()
        if not self.closed.done():
            self.closed.set_result(reason)

    def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == wire.HELLO_OK:
            if not self.hello_ok.done():
                try:
                    self.hello_ok.set_result(wire.check_hello(msg))
                except wire.ProtocolError as exc:
                    self.hello_ok.set_exception(exc)
        elif msg.type == wire.INFO:
            if self.info_waiters:
                self.info_waiters.pop(0).set_result(wire.Info.decode(msg))
        elif msg.type == wire.DNS_ANSWER:
            ident, answer = msg.split_id()
            fut = self.dns_waiters.pop(ident, None)
            if fut is not None and not fut.done():
                fut.set_result(answer)
        elif msg.type == wire.UDP_RECV:
            ident, data = msg.split_id()
            handler = self.udp_handlers.get(ident)
            if handler is not None:
                handler[0](data)
        elif msg.type == wire.UDP_CLOSED:
            ident, reason = msg.split_id()
            handler = self.udp_handlers.pop(ident, None)
            if handler is not None:
                handler[1](reason.decode(errors="replace"))
        elif msg.type == wire.INCOMING_REPLY:
            reply = wire.IncomingReply.decode(msg)
            fut = self.incoming_waiters.pop(reply.port, None)
            if fut is not None and not fut.done():
                fut.set_result(reply.error)
        elif msg.type == wire.NOTICE:
            notice = wire.Notice.decode(msg)
            self.on_notice(notice.level, notice.message)
        elif msg.type == wire.ERROR:
            log.error("agent error: %s", wire.Error.decode(msg).message)
        elif msg.type == wire.PONG:
            pass
        else:
            log.error("unexpected message from agent: %s", msg.name)

    # -- requests ---------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.chan is None or self.chan.is_closing():
            raise ConnectionError("the link to the agent is closed")
        self.chan.write(data)

    async def hello(self, role: str) -> wire.HelloOk:
        self.send(wire.Hello(wire.PROTOCOL_VERSION, role).encode())
        return await self.hello_ok

    async def info(self) -> wire.Info:
        fut: asyncio.Future[wire.Info] = asyncio.get_running_loop().create_future()
        self.info_waiters.append(fut)
        self.send(wire.encode(wire.INFO_REQUEST))
        return await fut

    async def dns(self, query: bytes, timeout: float = 10.0) -> bytes:
        ident = next(self.ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.dns_waiters[ident] = fut
        self.send(wire.encode_id(wire.DNS_QUERY, ident, query))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.dns_waiters.pop(ident, None)

    async def subscribe(self, port: int, mode: str, http_filter: dict | None = None) -> str | None:
        """Ask the agent for a target port's incoming traffic; None if granted, else why not."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.incoming_waiters[port] = fut
        self.send(wire.IncomingSubscribe(port, mode, http_filter).encode())
        return await fut

    def udp_open(self, host: str, port: int, on_data: Callable[[bytes], None],
                 on_close: Callable[[str], None]) -> int:
        ident = next(self.ids)
        self.udp_handlers[ident] = (on_data, on_close)
        self.send(wire.UdpOpen(ident, host, port).encode())
        return ident

    def udp_send(self, ident: int, data: bytes) -> None:
        self.send(wire.encode_id(wire.UDP_SEND, ident, data))

    def udp_close(self, ident: int) -> None:
        if self.udp_handlers.pop(ident, None) is not None and self.chan is not None and not self.chan.is_closing():
            self.send(wire.encode_id(wire.UDP_CLOSE, ident))


class _Client(asyncssh.SSHClient):
    """Remembers how the connection ended: a clean disconnect (the agent ended the session) or
    a break (the transport under it dropped, or the keepalive went unanswered)."""

    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


class Link:
    """One SSH connection to the agent and its control channel."""

    def __init__(self, conn: asyncssh.SSHClientConnection, control: ControlChannel,
                 client: _Client | None = None) -> None:
        self.conn = conn
        self.control = control
        self.client = client

    @property
    def broken(self) -> bool:
        """Whether the connection ended by breaking rather than by the agent closing it: worth
        connecting again (the agent keeps the session for a while)."""
        return self.client is not None and self.client.lost is not None

    @classmethod
    async def connect(cls, sock: socket.socket, keys: LinkKeys, role: str,
                      keepalive_interval: float = 5.0) -> "Link":
        # Pin the agent's host key by value: the transport has no host name to match against.
        known = ([asyncssh.import_public_key(keys.agent_host_key)], [], [])
        client = _Client()
        conn = await asyncssh.run_client(
            sock,
            client_factory=lambda: client,
            username="podtwin",
            client_keys=[keys.client_key],
            known_hosts=known,
            agent_path=None,
            encoding=None,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=2,
            compression_algs=None,
            # AES-GCM first: with AES instructions (nearly every x86-64 and ARMv8 CPU) it moves
            # ~1.7x the bytes of asyncssh's default ChaCha20 for the same CPU (docs/link-choice.md).
            encryption_algs=CIPHERS,
        )
        try:
            _, control = await conn.create_session(ControlChannel, subsystem=wire.CONTROL_SUBSYSTEM, encoding=None)
            await control.hello(role)
        except BaseException:   # failed or cancelled half-way: never leave a connection the agent counts
            conn.close()
            raise
        return cls(conn, control, client)

    @classmethod
    async def connect_unix(cls, path: str, keys: LinkKeys, role: str, wait: float = 0.0) -> "Link":
        """Connect to the agent's socket; with ``wait``, retry for that long while the agent is
        still starting (no socket yet, or not listening yet), or while the stream behind the
        socket drops during the handshake (a Kubernetes port-forward on a loaded API server)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await loop.sock_connect(sock, path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            except OSError:
                sock.close()
                raise
            try:
                return await cls.connect(sock, keys, role)
            except asyncssh.ConnectionLost as exc:
                if loop.time() >= deadline:
                    raise
                log.info("the link dropped during the handshake (%s); connecting again", exc)
                await asyncio.sleep(0.2)

    async def open_tcp(self, host: str, port: int, orig: tuple[str, int] = ("", 0)):
        """A TCP connection made by the agent: (reader, writer) streams."""
        return await self.conn.open_connection(host, port, orig_host=orig[0], orig_port=orig[1],
                                               encoding=None)

    async def wait_closed(self) -> None:
        """Until the SSH connection or its control channel closes, whichever is first."""
        conn_closed = asyncio.ensure_future(self.conn.wait_closed())
        try:
            await asyncio.wait([conn_closed, self.control.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn_closed.cancel()

    async def end(self, timeout: float = 2.0) -> None:
        """End the session: the agent removes what it set up, exits and closes the connection.
        Waits for that (up to ``timeout``), then closes this end anyway."""
        try:
            self.control.send(wire.encode(wire.END))
            await asyncio.wait_for(self.conn.wait_closed(), timeout)
        except (ConnectionError, asyncio.TimeoutError, OSError, asyncssh.Error):
            pass
        finally:
            self.conn.close()

    def close(self) -> None:
        self.conn.close()


async def reconnect(connect: Callable[[], Awaitable["Link"]], grace: float,
                    gone: Callable[[BaseException], Awaitable[str | None]],
                    waiting: Callable[[float], None] = lambda elapsed: None) -> "Link | str":
    """Connect again (``connect``, at most ATTEMPT_TIMEOUT an attempt, 0.2 s to 2 s apart) until
    ``grace`` seconds have passed: the new link, or why not. After each failed attempt ``gone``
    says why it is no use going on (the other end is known to be gone), or None;
    ``waiting(elapsed)`` is called every REPORT_EVERY seconds meanwhile."""
    loop = asyncio.get_running_loop()
    started, reported, delay = loop.time(), loop.time(), 0.2
    while (elapsed := loop.time() - started) <= grace:
        if loop.time() - reported >= REPORT_EVERY:
            reported = loop.time()
            waiting(elapsed)
        try:
            return await asyncio.wait_for(connect(), min(ATTEMPT_TIMEOUT, grace - elapsed + 0.1))
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:   # ConnectionError is an OSError
            log.info("reconnecting: %s: %s", type(exc).__name__, exc)
            why = await gone(exc)
            if why:
                return why
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    return f"it did not come back within {grace:.0f}s"
