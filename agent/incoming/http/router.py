"""Which router a stolen connection gets: the protocol is detected from its first bytes."""
from __future__ import annotations

import re

from podtwin.agent.incoming.http.http1 import Http1Router
from podtwin.agent.incoming.http.http2 import Http2Router
from podtwin.agent.incoming.http.filter import CLIENT, TARGET, Close, Command, HttpFilter, RawRouter

# ---------------------------------------------------------------------------------------------
# Protocol detection
# ---------------------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_REQUEST_LINE = 8192
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^\x00-\x20\x7f]+ HTTP/1\.[01]\r?\n")


def detect(first_bytes: bytes) -> str | None:
    """"http2" (prior-knowledge preface), "http1" (a request line), "other", or None: need more."""
    data = first_bytes
    if data.startswith(H2_PREFACE):
        return "http2"
    if H2_PREFACE.startswith(data):  # also b"" and b"P", b"PR"...: could still be POST or PRI
        return None
    end = data.find(b"\n")
    if end >= 0:
        return "http1" if _REQUEST_LINE.fullmatch(data[:end + 1]) else "other"
    if len(data) > MAX_REQUEST_LINE:
        return "other"
    # No full line yet: wait only while it can still become a request line.
    method, sp, rest = data.partition(b" ")
    if not _TOKEN.fullmatch(method):
        return "other"
    if not sp:
        return None
    target, sp, version = rest.partition(b" ")
    if re.search(rb"[\x00-\x20\x7f]", target) or (sp and not target):
        return "other"
    if not sp:
        return None
    if any(v.startswith(version) for v in (b"HTTP/1.0\r", b"HTTP/1.1\r")):
        return None
    return "other"




class ConnectionRouter:
    """Buffers the first bytes until ``detect`` decides, then delegates to the right router.

    Anything that is not HTTP/1.x or HTTP/2 prior knowledge goes to the TARGET unchanged. So
    does a connection whose client sends nothing for a while (``detection_timeout``, driven by
    the driver's clock): a protocol where the server speaks first must reach the target.
    """

    def __init__(self, http_filter: HttpFilter) -> None:
        self.filter = http_filter
        self.buffer = b""
        self.router: RawRouter | Http1Router | Http2Router | None = None
        self.protocol: str | None = None

    def start(self) -> list[Command]:
        return []

    def _choose(self, protocol: str) -> list[Command]:
        self.protocol = protocol
        if protocol == "http2":
            self.router = Http2Router(self.filter)
        elif protocol == "http1":
            self.router = Http1Router(self.filter)
        else:
            self.router = RawRouter(TARGET)
        data, self.buffer = self.buffer, b""
        return self.router.start() + self.router.client_data(data)

    def client_data(self, data: bytes) -> list[Command]:
        if self.router is not None:
            return self.router.client_data(data)
        self.buffer += data
        protocol = detect(self.buffer)
        return [] if protocol is None else self._choose(protocol)

    def detection_timeout(self) -> list[Command]:
        """The client stayed silent: maybe a server-speaks-first protocol; hand it to the target."""
        return [] if self.router is not None else self._choose("other")

    def client_eof(self) -> list[Command]:
        if self.router is None:
            if not self.buffer:
                return [Close(CLIENT)]
            return self._choose("other") + self.router.client_eof()
        return self.router.client_eof()

    def upstream_data(self, dest: str, data: bytes) -> list[Command]:
        return self.router.upstream_data(dest, data) if self.router else []

    def upstream_eof(self, dest: str) -> list[Command]:
        return self.router.upstream_eof(dest) if self.router else []

    def connect_failed(self, dest: str, reason: str = "") -> list[Command]:
        return self.router.connect_failed(dest, reason) if self.router else []

