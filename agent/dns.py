"""Forward raw DNS messages to the target's own nameservers, from inside the target's netns.

The app's resolver library (inside the app container) applies the target's search domains and
/etc/hosts itself, because the sidecar copies those files; what crosses the link is the plain DNS
message. The agent sends it to the nameservers in the target's resolv.conf, in order, honouring
``options timeout:`` and ``attempts:``, and retries over TCP when the UDP answer is truncated.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass, field

from podtwin.agent.sockopts import SO_MARK

log = logging.getLogger("podtwin.agent.dns")

DEFAULT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 2
MAX_TIMEOUT = 30.0
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS

    @classmethod
    def parse(cls, text: str) -> "ResolvConf":
        servers: list[str] = []
        search: list[str] = []
        options: list[str] = []
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            key, args = words[0], words[1:]
            if key == "nameserver" and args:
                servers.append(args[0])
            elif key in ("search", "domain"):
                search = args  # the last search/domain line wins, as in glibc
            elif key == "options":
                options.extend(args)
        timeout, attempts = DEFAULT_TIMEOUT, DEFAULT_ATTEMPTS
        for opt in options:
            name, _, value = opt.partition(":")
            if name == "timeout" and value.isdigit():
                timeout = min(max(float(value), 0.1), MAX_TIMEOUT)
            elif name == "attempts" and value.isdigit():
                attempts = min(max(int(value), 1), MAX_ATTEMPTS)
        return cls(tuple(servers), tuple(search), tuple(options), timeout, attempts)


def is_truncated(message: bytes) -> bool:
    return len(message) >= 4 and bool(message[2] & 0x02)


def same_id(query: bytes, answer: bytes) -> bool:
    return len(query) >= 2 and len(answer) >= 12 and query[:2] == answer[:2]


class _OneShot(asyncio.DatagramProtocol):
    def __init__(self, query: bytes) -> None:
        self.query = query
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if same_id(self.query, data) and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


def _socket(server: str, kind: int, mark: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    return sock


async def _udp(server: str, query: bytes, timeout: float, mark: int | None = None) -> bytes:
    loop = asyncio.get_running_loop()
    sock = _socket(server, socket.SOCK_DGRAM, mark)
    try:
        sock.connect((server, 53))
    except OSError:
        sock.close()
        raise
    transport, proto = await loop.create_datagram_endpoint(lambda: _OneShot(query), sock=sock)
    try:
        transport.sendto(query)
        return await asyncio.wait_for(proto.answer, timeout)
    finally:
        transport.close()


async def _tcp(server: str, query: bytes, timeout: float, mark: int | None = None) -> bytes:
    async def exchange() -> bytes:
        sock = _socket(server, socket.SOCK_STREAM, mark)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (server, 53))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()
    return await asyncio.wait_for(exchange(), timeout)


@dataclass
class Forwarder:
    """Sends each query to the target's nameservers; re-reads resolv.conf through ``read_conf``."""

    read_conf: "callable[[], str]"
    mark: int | None = None  # SO_MARK for its sockets (the sidecar's local resolver bypasses its rules)
    _cache: tuple[str, ResolvConf] = field(default=("", ResolvConf()))

    def conf(self) -> ResolvConf:
        text = self.read_conf()
        if text != self._cache[0]:
            self._cache = (text, ResolvConf.parse(text))
        return self._cache[1]

    async def forward(self, query: bytes) -> bytes:
        conf = self.conf()
        servers = conf.nameservers or ("127.0.0.1",)  # glibc's default when none is configured
        for _ in range(conf.attempts):
            for server in servers:
                try:
                    answer = await _udp(server, query, conf.timeout, self.mark)
                    if is_truncated(answer):
                        answer = await _tcp(server, query, conf.timeout, self.mark)
                    return answer
                except (OSError, asyncio.TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
                    log.debug("nameserver %s: %r", server, exc)
        return b""
