"""Which router a stolen connection gets: the protocol is detected from its first bytes.

A client that has not sent enough to tell within ``detect_timeout`` goes to the target
unchanged. The deadline is a Wake command like any other, so the driver knows nothing of
detection.
"""
from __future__ import annotations

import re

from podtwin.agent.incoming.http.commands import (CLIENT, TARGET, Close, Command, DataReceived,
                                                  EofReceived, Event, Router, Start, Wake, Woken)
from podtwin.agent.incoming.http.filter import HttpFilter
from podtwin.agent.incoming.http.http1 import Http1Router
from podtwin.agent.incoming.http.http2 import Http2Router
from podtwin.agent.incoming.http.raw import RawRouter

# ---------------------------------------------------------------------------------------------
# Protocol detection
# ---------------------------------------------------------------------------------------------

DETECT_TIMEOUT = 3.0  # seconds; a silent client may be waiting for a server-speaks-first greeting
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
    does a connection whose client has not sent enough to decide ``detect_timeout`` seconds
    after the start (a Wake): a protocol where the server speaks first must reach the target.
    """

    def __init__(self, http_filter: HttpFilter, detect_timeout: float = DETECT_TIMEOUT) -> None:
        self.filter = http_filter
        self.detect_timeout = detect_timeout
        self.buffer = b""
        self.router: Router | None = None

    def handle(self, event: Event) -> list[Command]:
        if self.router is not None:
            return self.router.handle(event)
        if isinstance(event, Start):
            return [Wake(self.detect_timeout)]
        if isinstance(event, DataReceived) and event.source == CLIENT:
            self.buffer += event.data
            protocol = detect(self.buffer)
            return [] if protocol is None else self._choose(protocol)
        if isinstance(event, Woken):  # the client has not said enough in time
            return self._choose("other")
        if isinstance(event, EofReceived) and event.source == CLIENT:
            if not self.buffer:
                return [Close(CLIENT)]
            return self._choose("other") + self.router.handle(event)
        return []  # nothing is connected before the choice: no upstream events

    def _choose(self, protocol: str) -> list[Command]:
        if protocol == "http2":
            self.router = Http2Router(self.filter)
        elif protocol == "http1":
            self.router = Http1Router(self.filter)
        else:
            self.router = RawRouter(TARGET)
        data, self.buffer = self.buffer, b""
        commands = self.router.handle(Start())
        if data:
            commands += self.router.handle(DataReceived(CLIENT, data))
        return commands
