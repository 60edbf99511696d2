"""HTTP/2 streams routed one at a time by the filter (sans-IO, over h2; gRPC is HTTP/2); see
``filter``."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import h2.events
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from podtwin.agent.incoming.http.commands import (CLIENT, LOCAL, TARGET, Close, Command, Connect,
                                                  ConnectFailed, DataReceived, EofReceived, Event,
                                                  Send, Start)
from podtwin.agent.incoming.http.filter import HttpFilter, request_path


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

    def handle(self, event: Event) -> list[Command]:
        if isinstance(event, Start):
            self.client.initiate_connection()  # our SETTINGS
        elif isinstance(event, DataReceived):
            if event.source == CLIENT:
                self._client_data(event.data)
            else:
                self._upstream_data(event.source, event.data)
        elif isinstance(event, EofReceived):
            if event.source == CLIENT:
                self.closing = True
            else:
                self._upstream_closed(event.source)
        elif isinstance(event, ConnectFailed):
            self._upstream_closed(event.dest)
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
    def _client_data(self, data: bytes) -> None:
        try:
            events = self.client.receive_data(data)
        except h2.exceptions.ProtocolError:  # h2 queued a GOAWAY for the client
            self.closing = True
            return
        for event in events:
            self._client_event(event)

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
    def _upstream_data(self, dest: str, data: bytes) -> None:
        up = self.upstreams.get(dest)
        if up is None:
            return
        try:
            events = up.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._upstream_gone(up, "protocol error")
            return
        for event in events:
            self._upstream_event(up, event)
        if up.goaway_last is not None:
            # h2 allows nothing on a connection after a GOAWAY: give up on it now; the next
            # request for this destination opens a fresh connection.
            self._upstream_gone(up, "goaway")

    def _upstream_closed(self, dest: str) -> None:
        """An end of file, or a connection that never opened: the same for its streams."""
        up = self.upstreams.get(dest)
        if up is not None:
            self._upstream_gone(up, "closed")

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


