"""HTTP request filtering for stolen incoming connections: the matcher and sans-IO routers.

A connection stolen from the target's port reaches the agent; each HTTP *request* on it goes
either to the developer's LOCAL app (through the SSH link) or to the TARGET's own process (the
original destination). Nothing here does I/O: routers are fed events (bytes from the client or
from an upstream, an end of file, a failed connect) and return commands for
``podtwin.agent.httprelay`` to execute. Destinations are the strings ``LOCAL``, ``TARGET`` and
``CLIENT``.

Matching semantics (mirrord's ``feature.network.incoming.http_filter``):

* ``header_filter``: a regex searched (``re.search``) in each header rendered as ``name: value``
  with the name LOWERCASED (HTTP header names are case-insensitive and HTTP/2 sends them
  lowercase anyway, so ``^x-podtwin-user: alice$`` works for ``X-Podtwin-User: alice`` too). The
  value keeps its case. For HTTP/2 the ``:authority`` pseudo-header is also offered as
  ``host: ...`` when there is no ``host`` header, so host filters work on both protocols.
* ``path_filter``: a regex searched in the request target's path INCLUDING the query string
  (``/api/items?id=3``), as sent on the request line or in ``:path``; an absolute-form target
  (``http://host/p``) is reduced to its path. ``^/api/`` and ``/api/items$``-style filters behave
  as expected; to ignore the query use ``^/api/items(\\?|$)``.
* ``method_filter``: case-insensitive equality with the request method.
* ``any_of`` / ``all_of``: lists of ``{"header"|"path"|"method": pattern}`` with the same meaning.
Regexes are Python ``re`` (mirrord uses the fancy-regex crate; common syntax is the same).
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
import h2.events
import h2.exceptions

LOCAL = "local"
TARGET = "target"
CLIENT = "client"

DEFAULT_PORTS = (80, 8080)  # mirrord's default for http_filter.ports


# ---------------------------------------------------------------------------------------------
# The matcher
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    kind: str  # "header" | "path" | "method"
    pattern: str
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, kind: str, pattern: object) -> "Condition":
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"http_filter {kind}: expected a non-empty string, got {pattern!r}")
        if kind == "method":
            return cls(kind, pattern)
        try:
            return cls(kind, pattern, re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"http_filter {kind}: invalid regex {pattern!r}: {exc}") from exc

    def holds(self, method: str, path: str, header_lines: list[str]) -> bool:
        if self.kind == "method":
            return method.upper() == self.pattern.upper()
        assert self.regex is not None
        if self.kind == "path":
            return self.regex.search(path) is not None
        return any(self.regex.search(line) for line in header_lines)


@dataclass(frozen=True)
class HttpFilter:
    """A parsed ``http_filter``: ``mode`` "all" needs every condition, "any" needs one."""
    conditions: tuple[Condition, ...]
    mode: str = "all"
    ports: tuple[int, ...] = DEFAULT_PORTS

    _SINGLE = {"header_filter": "header", "path_filter": "path", "method_filter": "method"}

    @classmethod
    def from_dict(cls, d: dict) -> "HttpFilter":
        kinds = [k for k in (*cls._SINGLE, "any_of", "all_of") if d.get(k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"http_filter needs exactly one of header_filter, path_filter, "
                             f"method_filter, any_of, all_of; got {kinds or 'none'}")
        ports = tuple(int(p) for p in d.get("ports") or DEFAULT_PORTS)
        kind = kinds[0]
        if kind in cls._SINGLE:
            return cls((Condition.make(cls._SINGLE[kind], d[kind]),), "all", ports)
        items = d[kind]
        if not isinstance(items, list) or not items:
            raise ValueError(f"http_filter {kind}: expected a non-empty list")
        conditions = []
        for item in items:
            if not isinstance(item, dict) or len(item) != 1 or \
                    next(iter(item)) not in ("header", "path", "method"):
                raise ValueError(f"http_filter {kind}: each entry is one of "
                                 f"{{header|path|method: pattern}}, got {item!r}")
            (ckind, pattern), = item.items()
            conditions.append(Condition.make(ckind, pattern))
        return cls(tuple(conditions), "all" if kind == "all_of" else "any", ports)

    def matches(self, method: str, path: str, headers: list[tuple[str, str]]) -> bool:
        """True when the request goes to the LOCAL app."""
        lines = [f"{name.lower()}: {value}" for name, value in headers]
        results = (c.holds(method, path, lines) for c in self.conditions)
        return all(results) if self.mode == "all" else any(results)

    def filters_port(self, port: int) -> bool:
        return port in self.ports


def request_path(target: str) -> str:
    """Origin-form stays as is (path + query); absolute-form loses scheme and authority."""
    m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", target)
    if m:
        return target[m.end():] or "/"
    return target


# ---------------------------------------------------------------------------------------------
# Commands (router -> driver)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connect:
    """Open the connection to ``dest`` (LOCAL or TARGET); later commands may write to it."""
    dest: str


@dataclass(frozen=True)
class Send:
    dest: str  # LOCAL, TARGET or CLIENT
    data: bytes


@dataclass(frozen=True)
class Shutdown:
    """Half-close: no more bytes will be written to ``dest`` (TCP FIN), reading goes on."""
    dest: str


@dataclass(frozen=True)
class Close:
    """Close ``dest``; Close(CLIENT) ends the whole relay."""
    dest: str


@dataclass(frozen=True)
class Passthrough:
    """From now on bytes are relayed unchanged between the client and ``dest`` (informational)."""
    dest: str


Command = Connect | Send | Shutdown | Close | Passthrough


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


# ---------------------------------------------------------------------------------------------
# Routers. Common interface: start(), client_data(), client_eof(), upstream_data(),
# upstream_eof(), connect_failed(); each returns a list of commands.
# ---------------------------------------------------------------------------------------------

class RawRouter:
    """Bytes unchanged both ways between the client and one destination, half-closes included."""

    def __init__(self, dest: str = TARGET, connect: bool = True) -> None:
        self.dest = dest
        self.connect = connect
        self.eof = {CLIENT: False, dest: False}

    def start(self) -> list[Command]:
        return ([Connect(self.dest)] if self.connect else []) + [Passthrough(self.dest)]

    def client_data(self, data: bytes) -> list[Command]:
        return [Send(self.dest, data)] if data else []

    def upstream_data(self, dest: str, data: bytes) -> list[Command]:
        return [Send(CLIENT, data)] if dest == self.dest and data else []

    def client_eof(self) -> list[Command]:
        return self._eof(CLIENT, self.dest)

    def upstream_eof(self, dest: str) -> list[Command]:
        return self._eof(self.dest, CLIENT) if dest == self.dest else []

    def _eof(self, side: str, other: str) -> list[Command]:
        if self.eof[side]:
            return []
        self.eof[side] = True
        if all(self.eof.values()):
            return [Shutdown(other), Close(self.dest), Close(CLIENT)]
        return [Shutdown(other)]

    def connect_failed(self, dest: str, reason: str = "") -> list[Command]:
        return [Close(CLIENT)] if dest == self.dest else []


class Http1Router:
    """HTTP/1.x, one request at a time (pipelined requests wait in h11's buffer, in order).

    h11 parses the client's requests (server role) and each upstream's responses (client role,
    one h11.Connection per destination connection) and re-serializes them: header names keep
    their case and order, bodies keep their framing (content-length stays, chunked is
    re-chunked, trailers are kept), 100-continue and Connection: close flow through. A 101 (or
    a 2xx to CONNECT) switches the connection to raw passthrough with that destination.
    ``Upgrade: h2c`` is removed from forwarded requests: the server then answers in HTTP/1.1,
    which RFC 9113 allows, and every request stays filterable.
    """

    def __init__(self, http_filter: HttpFilter) -> None:
        self.filter = http_filter
        self.client = h11.Connection(h11.SERVER)
        self.upstreams: dict[str, h11.Connection] = {}
        self.current: str | None = None  # destination of the request in flight
        self.discard_body = False        # answered here (502): drop the rest of the request body
        self.client_eof_seen = False
        self.closed = False
        self.raw: RawRouter | None = None
        self.out: list[Command] = []

    def start(self) -> list[Command]:
        return []

    def _take(self) -> list[Command]:
        out, self.out = self.out, []
        return coalesce(out)

    # -- client side ----------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[Command]:
        if self.raw:
            return self.raw.client_data(data)
        if self.closed:
            return []
        self.client.receive_data(data)
        self._pump_client()
        return self._take()

    def client_eof(self) -> list[Command]:
        if self.raw:
            return self.raw.client_eof()
        if self.closed or self.client_eof_seen:
            return []
        self.client_eof_seen = True
        self.client.receive_data(b"")
        self._pump_client()
        return self._take()

    def _pump_client(self) -> None:
        while not self.closed and not self.raw:
            try:
                event = self.client.next_event()
            except h11.RemoteProtocolError as exc:
                self._client_broken(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._start_request(event)
            elif isinstance(event, (h11.Data, h11.EndOfMessage)):
                self._body_to_upstream(event)
            elif isinstance(event, h11.ConnectionClosed):
                self._cycle_client()  # closes now if idle, else after the response
                return

    def _client_broken(self, exc: Exception) -> None:
        # A malformed request: answer 400 when nothing was sent for it yet, then close.
        if self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"podtwin: bad request: {exc}\n".encode()
            try:
                self.out.append(Send(CLIENT, self.client.send(h11.Response(
                    status_code=400, reason=b"Bad Request",
                    headers=[("content-type", "text/plain"), ("content-length", str(len(body))),
                             ("connection", "close")])) + body))
            except h11.LocalProtocolError:
                pass
        self._close_all()

    def _start_request(self, req: h11.Request) -> None:
        raw = list(req.headers.raw_items())
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        method = req.method.decode("latin-1")
        path = request_path(req.target.decode("latin-1"))
        dest = LOCAL if self.filter.matches(method, path, headers) else TARGET
        self.current = dest
        up = self.upstreams.get(dest)
        if up is None or up.our_state is not h11.IDLE:
            if up is not None:  # a connection we cannot reuse
                self.out.append(Close(dest))
            up = self.upstreams[dest] = h11.Connection(h11.CLIENT)
            self.out.append(Connect(dest))
        forwarded = h11.Request(method=req.method, target=req.target, headers=_without_h2c(raw))
        self._send_upstream(dest, forwarded)

    def _body_to_upstream(self, event: h11.Data | h11.EndOfMessage) -> None:
        if not self.discard_body and self.current in self.upstreams:
            self._send_upstream(self.current, event)
        if isinstance(event, h11.EndOfMessage):
            if self.current in self.upstreams:
                self._cycle_upstream(self.current)
            self._cycle_client()

    def _send_upstream(self, dest: str, event) -> None:
        try:
            data = self.upstreams[dest].send(event)
        except h11.LocalProtocolError as exc:  # e.g. an HTTP/1.0 request without Host
            self._drop_upstream(dest)
            self._answer_here(400, b"Bad Request", f"cannot forward request: {exc}")
            return
        if data:
            self.out.append(Send(dest, data))

    # -- upstream side --------------------------------------------------------------------
    def upstream_data(self, dest: str, data: bytes) -> list[Command]:
        if self.raw:
            return self.raw.upstream_data(dest, data)
        if dest in self.upstreams and not self.closed:
            self.upstreams[dest].receive_data(data)
            self._pump_upstream(dest)
        return self._take()

    def upstream_eof(self, dest: str) -> list[Command]:
        if self.raw:
            return self.raw.upstream_eof(dest)
        if dest in self.upstreams and not self.closed:
            self.upstreams[dest].receive_data(b"")
            self._pump_upstream(dest)
            if dest in self.upstreams:  # still there: it closed before finishing a response
                self._upstream_failed(dest, "the connection closed before a response")
        return self._take()

    def connect_failed(self, dest: str, reason: str = "") -> list[Command]:
        if self.raw:
            return self.raw.connect_failed(dest, reason)
        if dest in self.upstreams:
            self._upstream_failed(dest, f"cannot connect to {dest}: {reason}")
        return self._take()

    def _pump_upstream(self, dest: str) -> None:
        up = self.upstreams[dest]
        while not self.closed and not self.raw and self.upstreams.get(dest) is up:
            try:
                event = up.next_event()
            except h11.RemoteProtocolError as exc:
                self._upstream_failed(dest, f"bad response from {dest}: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self._drop_upstream(dest)
                return
            if dest != self.current:  # bytes from an idle keep-alive upstream: not HTTP
                self._drop_upstream(dest)
                return
            if isinstance(event, (h11.InformationalResponse, h11.Response)):
                event = type(event)(status_code=event.status_code, reason=event.reason,
                                    headers=list(event.headers.raw_items()))
            self._send_client(event)
            if self.client.our_state is h11.SWITCHED_PROTOCOL:
                self._switch_to_raw(dest)
                return
            if isinstance(event, h11.EndOfMessage):
                self._cycle_upstream(dest)
                self._cycle_client()

    def _send_client(self, event) -> None:
        try:
            data = self.client.send(event)
        except h11.LocalProtocolError:  # e.g. a 101 the client never asked for
            self._close_all()
            return
        if data:
            self.out.append(Send(CLIENT, data))

    def _upstream_failed(self, dest: str, reason: str) -> None:
        self._drop_upstream(dest)
        if dest != self.current or self.discard_body:
            return
        if self.client.our_state is h11.SEND_RESPONSE:
            self._answer_here(502, b"Bad Gateway", reason)
        else:  # the response was half sent: the client must see the failure
            self._close_all()

    def _answer_here(self, status: int, reason: bytes, text: str) -> None:
        body = f"podtwin: {text}\n".encode()
        self.discard_body = True
        self._send_client(h11.Response(status_code=status, reason=reason, headers=[
            ("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]))
        self._send_client(h11.Data(data=body))
        self._send_client(h11.EndOfMessage())
        self._cycle_client()

    def _drop_upstream(self, dest: str) -> None:
        if self.upstreams.pop(dest, None) is not None:
            self.out.append(Close(dest))

    # -- keep-alive bookkeeping -----------------------------------------------------------
    def _cycle_upstream(self, dest: str) -> None:
        up = self.upstreams[dest]
        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
        elif h11.MUST_CLOSE in (up.our_state, up.their_state) and \
                up.our_state in (h11.DONE, h11.MUST_CLOSE) and \
                up.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._drop_upstream(dest)

    def _cycle_client(self) -> None:
        c = self.client
        if self.closed:
            return
        if c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
            self.current, self.discard_body = None, False
            self._pump_client()  # the next pipelined request, if any is buffered
        elif c.their_state is h11.CLOSED and c.our_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE):
            self._close_all()
        elif c.our_state is h11.MUST_CLOSE and c.their_state in (h11.DONE, h11.MUST_CLOSE):
            self._close_all()

    def _close_all(self) -> None:
        if self.closed:
            return
        self.closed = True
        for dest in list(self.upstreams):
            self._drop_upstream(dest)
        self.out.append(Close(CLIENT))

    def _switch_to_raw(self, dest: str) -> None:
        client_rest, client_closed = self.client.trailing_data
        up_rest, up_closed = self.upstreams[dest].trailing_data
        for other in [d for d in self.upstreams if d != dest]:
            self._drop_upstream(other)
        self.raw = RawRouter(dest, connect=False)
        self.out += self.raw.start()
        if client_rest:
            self.out.append(Send(dest, client_rest))
        if up_rest:
            self.out.append(Send(CLIENT, up_rest))
        if client_closed or self.client_eof_seen:
            self.out += self.raw.client_eof()
        if up_closed:
            self.out += self.raw.upstream_eof(dest)


def _without_h2c(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop an ``Upgrade: h2c`` offer (and HTTP2-Settings) so the server answers in HTTP/1.1."""
    upgrades = [v for n, v in raw if n.lower() == b"upgrade"]
    if not any(t.strip().lower() == b"h2c" for v in upgrades for t in v.split(b",")):
        return raw
    out = []
    for name, value in raw:
        low = name.lower()
        if low in (b"upgrade", b"http2-settings"):
            continue
        if low == b"connection":
            tokens = [t.strip() for t in value.split(b",")
                      if t.strip().lower() not in (b"upgrade", b"http2-settings")]
            if not tokens:
                continue
            value = b", ".join(tokens)
        out.append((name, value))
    return out


# ---------------------------------------------------------------------------------------------
# HTTP/2
# ---------------------------------------------------------------------------------------------

@dataclass
class _Item:
    """One thing to write on a stream, in order: headers, data (flow-controlled) or an end."""
    kind: str  # "headers" | "data" | "end" | "reset"
    headers: list | None = None
    data: bytes = b""
    ack: int = 0  # flow-controlled bytes to acknowledge to the sender once written
    end: bool = False
    code: int = 0


@dataclass
class _Upstream:
    dest: str
    conn: H2Connection
    streams: dict[int, "_Stream"] = field(default_factory=dict)  # by upstream stream id
    goaway_last: int | None = None  # the last stream id of the upstream's GOAWAY


@dataclass
class _Stream:
    csid: int
    up: _Upstream | None
    usid: int = 0
    to_up: deque = field(default_factory=deque)
    to_client: deque = field(default_factory=deque)
    request_ended: bool = False   # the client's END_STREAM was seen
    response_started: bool = False
    response_ended: bool = False
    up_done: bool = False         # our END_STREAM (or reset) went to the upstream
    client_done: bool = False     # our END_STREAM (or reset) went to the client


class Http2Router:
    """HTTP/2 prior knowledge: h2 as server towards the client, as client towards each upstream.

    Each client stream is routed by its request headers and mapped to a stream on that
    destination's connection; headers, DATA, trailers, END_STREAM and RST_STREAM are carried
    across. Flow control is end to end: DATA received on one side is acknowledged (WINDOW_UPDATE)
    only once it has been written to the other, so a slow reader slows its writer. SETTINGS and
    PING are answered by h2 on each hop. Server push is disabled towards upstreams.

    GOAWAY: h2 accepts nothing on a connection once a GOAWAY was sent or received, so there is
    no graceful drain. A client's GOAWAY closes everything. An upstream's GOAWAY drops that
    upstream connection: streams it did not process get REFUSED_STREAM (safe for the client to
    retry), streams without a response get a 502, streams mid-response get INTERNAL_ERROR;
    the next request for that destination opens a new connection.
    """

    def __init__(self, http_filter: HttpFilter) -> None:
        self.filter = http_filter
        self.client = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.upstreams: dict[str, _Upstream] = {}
        self.streams: dict[int, _Stream] = {}  # by client stream id
        self.out: list[Command] = []
        self.closing = False       # Close(CLIENT) goes out after the pending bytes

    def start(self) -> list[Command]:
        self.client.initiate_connection()
        return self._take()

    def _take(self) -> list[Command]:
        out, self.out = self.out, []
        for up in self.upstreams.values():
            data = up.conn.data_to_send()
            if data:
                out.append(Send(up.dest, data))
        data = self.client.data_to_send()
        if data:
            out.append(Send(CLIENT, data))
        if self.closing:
            for dest in list(self.upstreams):
                out.append(Close(dest))
            self.upstreams.clear()
            out.append(Close(CLIENT))
            self.closing = False
        return out

    # -- client side ----------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[Command]:
        try:
            events = self.client.receive_data(data)
        except h2.exceptions.ProtocolError:  # h2 queued a GOAWAY for the client
            self.closing = True
            return self._take()
        for event in events:
            self._client_event(event)
        return self._take()

    def client_eof(self) -> list[Command]:
        self.closing = True
        return self._take()

    def _client_event(self, event) -> None:
        E = h2.events
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, E.RequestReceived):
            self._start_request(event)
        elif isinstance(event, E.DataReceived):
            if stream is None or stream.up is None or stream.up_done:
                self._ack(self.client, event.flow_controlled_length, event.stream_id)
            else:
                ended = event.stream_ended is not None
                stream.request_ended |= ended
                stream.to_up.append(_Item("data", data=event.data, end=ended,
                                          ack=event.flow_controlled_length))
                self._drain(stream, to_client=False)
        elif isinstance(event, E.TrailersReceived):
            if stream is not None and stream.up is not None:
                stream.request_ended = True
                stream.to_up.append(_Item("headers", headers=list(event.headers), end=True))
                self._drain(stream, to_client=False)
        elif isinstance(event, E.StreamEnded):
            if stream is not None and not stream.request_ended:
                stream.request_ended = True
                if stream.up is not None:
                    stream.to_up.append(_Item("end"))
                    self._drain(stream, to_client=False)
        elif isinstance(event, E.StreamReset):
            if stream is not None:
                if stream.up is not None and not stream.up_done:
                    self._try(lambda: stream.up.conn.reset_stream(stream.usid, event.error_code))
                self._forget(stream)
        elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
            for s in list(self.streams.values()):
                self._drain(s, to_client=True)
        elif isinstance(event, E.ConnectionTerminated):
            # h2 allows nothing on a connection after a GOAWAY, so open streams cannot finish.
            self.closing = True

    def _start_request(self, event) -> None:
        headers = list(event.headers)
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        regular = [(n.decode("latin-1"), v.decode("latin-1"))
                   for n, v in headers if not n.startswith(b":")]
        if b":authority" in pseudo and not any(n == "host" for n, _ in regular):
            regular.append(("host", pseudo[b":authority"].decode("latin-1")))
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = request_path(pseudo.get(b":path", b"").decode("latin-1"))
        dest = LOCAL if self.filter.matches(method, path, regular) else TARGET
        ended = event.stream_ended is not None
        up = self.upstreams.get(dest)
        if up is None:
            conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            conn.local_settings = Settings(client=True,
                                           initial_values={SettingCodes.ENABLE_PUSH: 0})
            conn.initiate_connection()
            up = self.upstreams[dest] = _Upstream(dest, conn)
            self.out.append(Connect(dest))
        try:
            usid = up.conn.get_next_available_stream_id()
            up.conn.send_headers(usid, headers, end_stream=ended)
        except h2.exceptions.ProtocolError:  # e.g. the upstream's stream limit is reached
            self._try(lambda: self.client.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM))
            return
        stream = _Stream(event.stream_id, up, usid, request_ended=ended, up_done=ended)
        self.streams[stream.csid] = up.streams[usid] = stream

    # -- upstream side --------------------------------------------------------------------
    def upstream_data(self, dest: str, data: bytes) -> list[Command]:
        up = self.upstreams.get(dest)
        if up is None:
            return self._take()
        try:
            events = up.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._upstream_gone(up, "protocol error")
            return self._take()
        for event in events:
            self._upstream_event(up, event)
        if up.goaway_last is not None:
            # h2 allows nothing on a connection after a GOAWAY: give up on it now; the next
            # request for this destination opens a fresh connection.
            self._upstream_gone(up, "goaway")
        return self._take()

    def upstream_eof(self, dest: str) -> list[Command]:
        up = self.upstreams.get(dest)
        if up is not None:
            self._upstream_gone(up, "closed")
        return self._take()

    def connect_failed(self, dest: str, reason: str = "") -> list[Command]:
        return self.upstream_eof(dest)

    def _upstream_event(self, up: _Upstream, event) -> None:
        E = h2.events
        stream = up.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, (E.ResponseReceived, E.InformationalResponseReceived)):
            if stream is not None:
                final = isinstance(event, E.ResponseReceived)
                ended = final and event.stream_ended is not None
                stream.response_started |= final
                stream.response_ended |= ended
                stream.to_client.append(_Item("headers", headers=list(event.headers), end=ended))
                self._drain(stream, to_client=True)
        elif isinstance(event, E.DataReceived):
            if stream is None or stream.client_done:
                self._ack(up.conn, event.flow_controlled_length, event.stream_id)
            else:
                ended = event.stream_ended is not None
                stream.response_ended |= ended
                stream.to_client.append(_Item("data", data=event.data, end=ended,
                                              ack=event.flow_controlled_length))
                self._drain(stream, to_client=True)
        elif isinstance(event, E.TrailersReceived):
            if stream is not None:
                stream.response_ended = True
                stream.to_client.append(_Item("headers", headers=list(event.headers), end=True))
                self._drain(stream, to_client=True)
        elif isinstance(event, E.StreamEnded):
            if stream is not None and not stream.response_ended:
                stream.response_ended = True
                stream.to_client.append(_Item("end"))
                self._drain(stream, to_client=True)
        elif isinstance(event, E.StreamReset):
            if stream is not None:
                if event.error_code == ErrorCodes.NO_ERROR and stream.response_ended:
                    # "stop sending the request body": deliver the complete response first
                    stream.up_done = True
                    stream.to_client.append(_Item("reset", code=ErrorCodes.NO_ERROR))
                    self._drain(stream, to_client=True)
                else:
                    self._discard(stream, to_client=True)
                    self._try(lambda: self.client.reset_stream(stream.csid, event.error_code))
                    self._forget(stream)
        elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
            for s in list(up.streams.values()):
                self._drain(s, to_client=False)
        elif isinstance(event, E.ConnectionTerminated):
            up.goaway_last = event.last_stream_id if event.last_stream_id is not None else 0

    def _upstream_gone(self, up: _Upstream, reason: str) -> None:
        """The upstream closed or never opened: 502 for streams without a response."""
        data = up.conn.data_to_send()
        if data:
            self.out.append(Send(up.dest, data))
        self.upstreams.pop(up.dest, None)
        self.out.append(Close(up.dest))
        for stream in list(up.streams.values()):
            if up.goaway_last is not None and stream.usid > up.goaway_last:
                # never processed upstream: REFUSED_STREAM tells the client it may retry
                self._try(lambda: self.client.reset_stream(stream.csid, ErrorCodes.REFUSED_STREAM))
                self._forget(stream)
            elif stream.response_ended:
                stream.up_done = True  # the complete response is queued; let it drain
                self._maybe_forget(stream)
            elif not stream.response_started:
                self._discard(stream, to_client=True)
                stream.up = None
                self._try(lambda: self.client.send_headers(stream.csid, [
                    (b":status", b"502"), (b"content-type", b"text/plain"),
                    (b"content-length", b"0")], end_stream=True))
                if not stream.request_ended:  # tell the client to stop sending the body
                    self._try(lambda: self.client.reset_stream(stream.csid, ErrorCodes.NO_ERROR))
                self._forget(stream)
            else:
                self._try(lambda: self.client.reset_stream(stream.csid, ErrorCodes.INTERNAL_ERROR))
                self._forget(stream)

    # -- plumbing -------------------------------------------------------------------------
    def _drain(self, stream: _Stream, to_client: bool) -> None:
        """Write queued items in order while the receiver's flow-control window allows."""
        if stream.up is None and not to_client:
            return
        if to_client:
            queue, conn, sid = stream.to_client, self.client, stream.csid
            ack_conn, ack_sid = (stream.up.conn if stream.up else None), stream.usid
        else:
            queue, conn, sid = stream.to_up, stream.up.conn, stream.usid
            ack_conn, ack_sid = self.client, stream.csid
        try:
            while queue:
                item = queue[0]
                if item.kind == "data":
                    if item.data:
                        room = min(conn.local_flow_control_window(sid),
                                   conn.max_outbound_frame_size)
                        if room <= 0:
                            return
                        chunk, item.data = item.data[:room], item.data[room:]
                        conn.send_data(sid, chunk, end_stream=item.end and not item.data)
                        if item.data:
                            continue
                    elif item.end:
                        conn.send_data(sid, b"", end_stream=True)
                    if ack_conn is not None:
                        self._ack(ack_conn, item.ack, ack_sid)
                elif item.kind == "headers":
                    conn.send_headers(sid, item.headers, end_stream=item.end)
                elif item.kind == "end":
                    conn.end_stream(sid)
                elif item.kind == "reset":
                    conn.reset_stream(sid, item.code)
                queue.popleft()
                if item.end or item.kind in ("end", "reset"):
                    if to_client:
                        stream.client_done = True
                    else:
                        stream.up_done = True
        except h2.exceptions.StreamClosedError:
            # The receiving side reset or closed this stream: drop what is left of it.
            self._discard(stream, to_client)
            if to_client:
                stream.client_done = True
            else:
                stream.up_done = True
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.client_done and stream.up_done and not stream.to_client and not stream.to_up:
            self._forget(stream)

    def _discard(self, stream: _Stream, to_client: bool) -> None:
        """Drop queued items, still acknowledging their DATA: the connection-level window of
        the sender is shared by all its streams and would otherwise shrink for good."""
        queue = stream.to_client if to_client else stream.to_up
        sender = (stream.up.conn if stream.up else None) if to_client else self.client
        sid = stream.usid if to_client else stream.csid
        for item in queue:
            if sender is not None:
                self._ack(sender, item.ack, sid)
        queue.clear()

    def _forget(self, stream: _Stream) -> None:
        self._discard(stream, to_client=True)
        self._discard(stream, to_client=False)
        self.streams.pop(stream.csid, None)
        if stream.up is not None:
            stream.up.streams.pop(stream.usid, None)

    @staticmethod
    def _ack(conn: H2Connection, size: int, stream_id: int) -> None:
        if size:
            try:
                conn.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass

    @staticmethod
    def _try(action) -> None:
        """A write on a stream the peer already closed or reset is moot, not an error."""
        try:
            action()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass


# ---------------------------------------------------------------------------------------------
# The per-connection entry point
# ---------------------------------------------------------------------------------------------

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


def coalesce(commands: list[Command]) -> list[Command]:
    """Join consecutive Sends to the same destination: fewer writes, readable playbooks."""
    out: list[Command] = []
    for command in commands:
        if isinstance(command, Send) and out and isinstance(out[-1], Send) \
                and out[-1].dest == command.dest:
            out[-1] = Send(command.dest, out[-1].data + command.data)
        else:
            out.append(command)
    return out

