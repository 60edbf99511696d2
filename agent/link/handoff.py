"""The socket handoff: sockets of the target's namespace with no SSH framing, where agent and
sidecar share a kernel.

For a Docker target on the same engine, the agent and the sidecar both see the session
directory. There the agent also listens on ``handoff.sock``: a client sends one request line
(``{"host": ADDRESS, "port": PORT}``), the agent connects to it from the target's network
namespace, and hands the connected socket itself back (``SCM_RIGHTS``), with ``{"ok": true}``;
or answers ``{"error": ..., "errno": N}``. The sidecar then joins the app's connection to that
socket directly: no SSH channel, no encryption, no copy through the agent. ``{"udp": true}``
asks for an unconnected UDP socket (the sidecar's resolver sends from it); ``{"incoming": true}``
holds the connection open as the channel a whole-port steal's connections are pushed on
(``IncomingPush``).

Who may ask: whoever can open a socket in the session directory (mode 0700), which is whoever can
read the session's private key beside it; the SSH link's authentication proves nothing more.
A Kubernetes agent runs on another machine (or kernel) and has no handoff: the SSH link carries
every stream there.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import socket

from podtwin.agent.sockopts import no_delay
from podtwin.agent.tasks import TaskSet

log = logging.getLogger("podtwin.agent.handoff")

MAX_REQUEST = 512
# Connections the app opens at once queue here and at the sidecar's proxy (1,000 are measured by
# the bench's soak): the kernel caps it at net.core.somaxconn.
HANDOFF_BACKLOG = 4096
CONNECT_TIMEOUT = 30.0


UDP = "udp"   # a request for an unconnected UDP socket of the target's namespace: {"udp": true}
PUSH = "push"   # {"incoming": true}: this connection receives stolen connections (IncomingPush)


def encode_request(host: str, port: int) -> bytes:
    return json.dumps({"host": host, "port": port}).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, int]:
    """(address, port) of a request line, or (UDP, 0); ValueError if it is not one."""
    msg = json.loads(line)
    if msg.get("udp") is True:
        return UDP, 0
    if msg.get("incoming") is True:
        return PUSH, 0
    host, port = msg["host"], msg["port"]
    ipaddress.ip_address(host)   # addresses only: the sidecar has resolved names already
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    return host, port


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(sock, MAX_REQUEST)
        if not chunk:
            raise ConnectionError("closed before a whole request")
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


class HandoffServer:
    """The agent's side: serve requests on ``listener`` until ``close``."""

    def __init__(self, listener: socket.socket, push: "IncomingPush | None" = None) -> None:
        self.listener = listener
        self.push = push   # where a client's {"incoming": true} connection goes
        self.tasks = TaskSet("handoff")
        self.accepting: asyncio.Task | None = None

    def start(self) -> None:
        self.accepting = asyncio.get_running_loop().create_task(self._accept(), name="handoff:accept")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self.listener)
            self.tasks.spawn(self._serve(client), "request")

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        out = None
        try:
            host, port = decode_request(await asyncio.wait_for(_read_line(loop, client), 10))
            if host == PUSH and self.push is not None:
                await self.push.hold(client)   # until either side closes it
                return
            if host == UDP:   # bound to an ephemeral port of the target's namespace, for the client to use
                out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                out.bind(("0.0.0.0", 0))
                _hand_over(client, out)
                return
            out = no_delay(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM))
            out.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(out, (host, port)), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ETIMEDOUT
                await loop.sock_sendall(client, json.dumps({"error": str(exc) or "timed out", "errno": code})
                                        .encode() + b"\n")
                return
            _hand_over(client, out)
        except (OSError, ValueError, KeyError, TypeError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("handoff request failed: %r", exc)
        finally:
            if out is not None:
                out.close()   # the sidecar holds the connection now (or nobody does)
            client.close()

    def close(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()
        self.tasks.cancel_all()


def _hand_over(client: socket.socket, out: socket.socket) -> None:
    client.setblocking(True)   # one small message with its descriptor
    client.settimeout(5)
    socket.send_fds(client, [b'{"ok": true}\n'], [out.fileno()])


class IncomingPush:
    """The agent's end of the stolen-connection channel: a whole-port steal's connections go to
    the sidecar as sockets (``send``, with ``{"port": TARGET_PORT}``) instead of SSH channels,
    while a client holds the channel open. The channel is the session's sidecar's: only it can
    open the handoff socket."""

    def __init__(self) -> None:
        self.channel: socket.socket | None = None

    async def hold(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.channel = client
        try:
            while await loop.sock_recv(client, 64):   # nothing is sent this way: wait for its end
                pass
        finally:
            if self.channel is client:
                self.channel = None

    def send(self, conn: socket.socket, port: int) -> bool:
        """Hand ``conn`` over for target port ``port``; False (nothing sent) if no channel is held
        or it is not taking more just now: the caller forwards it over the link instead."""
        channel = self.channel
        if channel is None:
            return False
        try:
            sent = socket.send_fds(channel, [json.dumps({"port": port}).encode() + b"\n"], [conn.fileno()],
                                   socket.MSG_DONTWAIT)
            return sent > 0
        except OSError as exc:
            log.debug("incoming push: %r", exc)
            return False


class HandoffClient:
    """The sidecar's side: a TCP connection made in the target's network namespace."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def connect(self, host: str, port: int) -> socket.socket:
        """The connected socket; OSError (with the agent's errno, e.g. ECONNREFUSED) if the
        target could not connect."""
        return await self._ask(encode_request(host, port))

    async def incoming(self) -> socket.socket:
        """The channel stolen connections arrive on (``IncomingPush``), connected and asked for."""
        return await self._request(json.dumps({"incoming": True}).encode() + b"\n")

    async def udp(self) -> socket.socket:
        """An unconnected UDP socket of the target's namespace (IPv4, an ephemeral port)."""
        return await self._ask(json.dumps({"udp": True}).encode() + b"\n")

    async def _request(self, request: bytes) -> socket.socket:
        """A connection to the agent's handoff socket that has sent ``request``."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.path)
            await loop.sock_sendall(sock, request)
        except OSError:
            sock.close()
            raise
        return sock

    async def _ask(self, request: bytes) -> socket.socket:
        """The socket the agent hands back for ``request``."""
        loop = asyncio.get_running_loop()
        sock = await self._request(request)
        try:
            await asyncio.wait_for(readable(loop, sock), CONNECT_TIMEOUT + 5)
            msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
        finally:
            sock.close()
        if fds:
            conn = socket.socket(fileno=fds[0])   # family and type come from the descriptor
            conn.setblocking(False)
            for extra in fds[1:]:
                socket.close(extra)
            return conn
        try:
            reply = json.loads(msg.split(b"\n", 1)[0])
        except ValueError:
            reply = {}
        code = reply.get("errno") or errno.ECONNABORTED
        raise OSError(code, reply.get("error") or "the agent handed no connection")
