"""HTTP/1.x requests routed one at a time by the filter (sans-IO, over h11); see ``filter``."""
from __future__ import annotations

import h11

from podtwin.agent.incoming.http.commands import (CLIENT, LOCAL, TARGET, Close, Command, Connect,
                                                  ConnectFailed, DataReceived, EofReceived, Event,
                                                  Send, Start)
from podtwin.agent.incoming.http.filter import HttpFilter, request_path
from podtwin.agent.incoming.http.raw import RawRouter


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

    def handle(self, event: Event) -> list[Command]:
        if self.raw:
            return self.raw.handle(event)
        if isinstance(event, DataReceived):
            if event.source == CLIENT:
                self._client_data(event.data)
            else:
                self._upstream_data(event.source, event.data)
        elif isinstance(event, EofReceived):
            if event.source == CLIENT:
                self._client_eof()
            else:
                self._upstream_eof(event.source)
        elif isinstance(event, ConnectFailed):
            self._connect_failed(event.dest, event.reason)
        # Start and Woken: nothing to do (the client speaks first; nothing here waits)
        return self._take()

    def _take(self) -> list[Command]:
        out, self.out = self.out, []
        return _coalesce(out)

    # -- client side ----------------------------------------------------------------------
    def _client_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.client.receive_data(data)
        self._pump_client()

    def _client_eof(self) -> None:
        if self.closed or self.client_eof_seen:
            return
        self.client_eof_seen = True
        self.client.receive_data(b"")
        self._pump_client()

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
    def _upstream_data(self, dest: str, data: bytes) -> None:
        if dest in self.upstreams and not self.closed:
            self.upstreams[dest].receive_data(data)
            self._pump_upstream(dest)

    def _upstream_eof(self, dest: str) -> None:
        if dest in self.upstreams and not self.closed:
            self.upstreams[dest].receive_data(b"")
            self._pump_upstream(dest)
            if dest in self.upstreams:  # still there: it closed before finishing a response
                self._upstream_failed(dest, "the connection closed before a response")

    def _connect_failed(self, dest: str, reason: str) -> None:
        if dest in self.upstreams:
            self._upstream_failed(dest, f"cannot connect to {dest}: {reason}")

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
        self.out += self.raw.handle(Start())
        if client_rest:
            self.out.append(Send(dest, client_rest))
        if up_rest:
            self.out.append(Send(CLIENT, up_rest))
        if client_closed or self.client_eof_seen:
            self.out += self.raw.handle(EofReceived(CLIENT))
        if up_closed:
            self.out += self.raw.handle(EofReceived(dest))


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


def _coalesce(commands: list[Command]) -> list[Command]:
    """Join consecutive Sends to the same destination: fewer writes, readable playbooks."""
    out: list[Command] = []
    for command in commands:
        if isinstance(command, Send) and out and isinstance(out[-1], Send) \
                and out[-1].dest == command.dest:
            out[-1] = Send(command.dest, out[-1].data + command.data)
        else:
            out.append(command)
    return out
