"""The filtered relay (agent/incoming/http/relay.py) over real loopback sockets.

A "target" and a "local" server (HTTP/1.1 with h11, HTTP/2 with h2, tiny and asyncio-based), the
relay in the middle as an asyncio server, and real clients: http.client (in a thread), an h2
client, raw sockets. Only 127.0.0.1 is used, so this runs under ``unshare --net``.
"""
from __future__ import annotations

import asyncio
import http.client
import socket
import struct

import h11
import h2.events
from h2.config import H2Configuration
from h2.connection import H2Connection

from podtwin.agent.incoming.http.filter import HttpFilter
from podtwin.agent.incoming.http.relay import relay_filtered

ALICE = HttpFilter.from_dict({"header_filter": "^x-podtwin-user: alice$"})
GRPC = HttpFilter.from_dict({"header_filter": "^content-type: application/grpc"})
TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# Tiny servers
# ---------------------------------------------------------------------------------------------

class Server:
    """An asyncio server on 127.0.0.1 that remembers its connections and closes them at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> "Server":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve(self, reader, writer) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    def opener(self):
        return lambda: asyncio.open_connection("127.0.0.1", self.port)


class Http1Server(Server):
    """Answers ``<name> <method> <target> body=<body>``; ``Upgrade: echo`` switches to a raw echo."""

    async def serve(self, reader, writer) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED and \
                    conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and request is None:
                return
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                if dict(request.headers).get(b"upgrade") == b"echo":
                    writer.write(conn.send(h11.InformationalResponse(
                        status_code=101, headers=[("upgrade", "echo"), ("connection", "upgrade")])))
                    rest, _ = conn.trailing_data
                    await self.echo(reader, writer, rest)
                    return
                text = f"{self.name} {request.method.decode()} {request.target.decode()} " \
                       f"body={body.decode()}".encode()
                writer.write(conn.send(h11.Response(status_code=200, headers=[
                    ("content-length", str(len(text))), ("x-served-by", self.name)])))
                writer.write(conn.send(h11.Data(data=text)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                request = None

    async def echo(self, reader, writer, first: bytes) -> None:
        data = first
        while True:
            if data:
                writer.write(b"echo:" + data)
                await writer.drain()
            data = await reader.read(65536)
            if not data:
                return


class Http2Server(Server):
    """Answers each stream with its name; gRPC requests get a framed reply and trailers."""

    async def serve(self, reader, writer) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, dict] = {}
        bodies: dict[int, bytes] = {}
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = dict(event.headers)
                    bodies[event.stream_id] = b""
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.respond(conn, event.stream_id, requests[event.stream_id],
                                 bodies[event.stream_id])
            writer.write(conn.data_to_send())
            await writer.drain()

    def respond(self, conn: H2Connection, sid: int, headers: dict, body: bytes) -> None:
        if headers.get("content-type") == "application/grpc":
            (length,) = struct.unpack("!xI", body[:5])
            reply = f"{self.name} got {body[5:5 + length].decode()}".encode()
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            conn.send_data(sid, struct.pack("!BI", 0, len(reply)) + reply)
            conn.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "OK")], end_stream=True)
            return
        text = f"{self.name} {headers[':path']}".encode()
        conn.send_headers(sid, [(":status", "200"), ("x-served-by", self.name)])
        conn.send_data(sid, text, end_stream=True)


class EchoServer(Server):
    """Raw bytes: optionally greets first, then echoes with a prefix until EOF."""

    def __init__(self, name: str, greeting: bytes = b"") -> None:
        super().__init__(name)
        self.greeting = greeting

    async def serve(self, reader, writer) -> None:
        if self.greeting:
            writer.write(self.greeting)
        while data := await reader.read(65536):
            writer.write(b"ECHO:" + data)
            await writer.drain()
        writer.write(b":BYE")
        await writer.drain()
        writer.write_eof()


class Relay(Server):
    """The agent's side: every accepted connection goes through relay_filtered."""

    def __init__(self, http_filter: HttpFilter, target, local, **kwargs) -> None:
        super().__init__("relay")
        self.args = (http_filter, target, local)
        self.kwargs = kwargs
        self.finished = 0

    async def serve(self, reader, writer) -> None:
        await relay_filtered(reader, writer, *self.args, **self.kwargs)
        self.finished += 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once the socket is closed


async def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(scenario, *servers_factory) -> None:
    """Start the servers, run the scenario, stop everything and check no relay task leaked."""
    async def main() -> None:
        servers = [await s.start() for s in servers_factory]
        try:
            await asyncio.wait_for(scenario(*servers), TIMEOUT)
        finally:
            for s in reversed(servers):
                await s.stop()
        await asyncio.sleep(0.05)
        leaked = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("httprelay:")]
        assert leaked == []
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# (a) HTTP/1.1 keep-alive with mixed routing
# ---------------------------------------------------------------------------------------------

def http1_requests(port: int, plan: list[tuple[str, str, dict, bytes | None]]) -> list:
    """Blocking http.client on ONE connection; returns (status, served_by, body, local port)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    out = []
    try:
        for method, path, headers, body in plan:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            out.append((resp.status, resp.getheader("x-served-by"), resp.read(),
                        conn.sock.getsockname()[1]))
    finally:
        conn.close()
    return out


def test_http1_keep_alive_routes_each_request():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener()).start()
        try:
            alice = {"x-podtwin-user": "alice"}
            results = await asyncio.to_thread(http1_requests, relay.port, [
                ("GET", "/one", {}, None),
                ("GET", "/two", alice, None),
                ("POST", "/three", alice, b"payload"),
                ("POST", "/four", {}, iter([b"chu", b"nked"])),  # chunked: no length
                ("GET", "/five?x=1", {"X-Podtwin-User": "alice"}, None),
            ])
            await wait_for(lambda: relay.finished == 1)
        finally:
            await relay.stop()
        assert [(s, by, body) for s, by, body, _ in results] == [
            (200, "target", b"target GET /one body="),
            (200, "local", b"local GET /two body="),
            (200, "local", b"local POST /three body=payload"),
            (200, "target", b"target POST /four body=chunked"),
            (200, "local", b"local GET /five?x=1 body="),
        ]
        assert len({port for *_, port in results}) == 1  # one client connection throughout
        assert relay.connections == 1
        assert (target.connections, local.connections) == (1, 1)  # upstreams were reused
    run(scenario, Http1Server("target"), Http1Server("local"))


def test_http1_pipelined_requests_over_a_raw_socket():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener()).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"GET /1 HTTP/1.1\r\nHost: a\r\nx-podtwin-user: alice\r\n\r\n"
                         b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"GET /3 HTTP/1.1\r\nHost: a\r\nx-podtwin-user: alice\r\n"
                         b"Connection: close\r\n\r\n")
            data = await reader.read()  # until the relay closes after the third response
            writer.close()
            await writer.wait_closed()
            await wait_for(lambda: relay.finished == 1)
        finally:
            await relay.stop()
        bodies = [line for line in data.split(b"\r\n") if b" /" in line and b"body=" in line]
        assert [b.split(b"HTTP")[0] for b in bodies] == [
            b"local GET /1 body=", b"target GET /2 body=", b"local GET /3 body="]
    run(scenario, Http1Server("target"), Http1Server("local"))


def test_http1_upgrade_becomes_passthrough():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener()).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nx-podtwin-user: alice\r\n"
                         b"Connection: upgrade\r\nUpgrade: echo\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.write(b"\x00raw bytes, not HTTP\r\n\r\n")
            assert await reader.readexactly(29) == b"echo:\x00raw bytes, not HTTP\r\n\r\n"
            writer.close()
            await writer.wait_closed()
            await wait_for(lambda: relay.finished == 1)
        finally:
            await relay.stop()
        assert (local.connections, target.connections) == (1, 0)
    run(scenario, Http1Server("target"), Http1Server("local"))


# ---------------------------------------------------------------------------------------------
# (b) HTTP/2 prior knowledge, (c) gRPC-shaped exchange
# ---------------------------------------------------------------------------------------------

async def h2_exchange(port: int, requests: dict[int, tuple[list, bytes | None]]) -> dict:
    """Open one h2c connection, send all streams at once, collect each stream's response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    for sid, (headers, body) in requests.items():
        conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            conn.send_data(sid, body, end_stream=True)
    writer.write(conn.data_to_send())
    results = {sid: {"headers": {}, "data": b"", "trailers": {}, "reset": None} for sid in requests}
    done: set[int] = set()
    try:
        while len(done) < len(requests):
            data = await reader.read(65536)
            assert data, "the relay closed the connection"
            for event in conn.receive_data(data):
                r = results.get(getattr(event, "stream_id", None))
                if isinstance(event, h2.events.ResponseReceived):
                    r["headers"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    r["data"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    r["trailers"] = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    done.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    r["reset"] = event.error_code
                    done.add(event.stream_id)
            writer.write(conn.data_to_send())
        conn.close_connection()
        writer.write(conn.data_to_send())
    finally:
        writer.close()
        await writer.wait_closed()
    return results


def h2_get(path: str, *extra) -> list:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", path),
            *extra]


def test_http2_concurrent_streams_routed_by_header():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener()).start()
        try:
            results = await h2_exchange(relay.port, {
                1: (h2_get("/mine", ("x-podtwin-user", "alice")), None),
                3: (h2_get("/theirs"), None),
                5: (h2_get("/mine-too", ("x-podtwin-user", "alice")), None),
            })
            await wait_for(lambda: relay.finished == 1)
        finally:
            await relay.stop()
        assert {sid: r["data"] for sid, r in results.items()} == {
            1: b"local /mine", 3: b"target /theirs", 5: b"local /mine-too"}
        assert all(r["headers"][":status"] == "200" for r in results.values())
        assert (target.connections, local.connections) == (1, 1)
    run(scenario, Http2Server("target"), Http2Server("local"))


def test_grpc_shaped_exchange_with_trailers():
    async def scenario(target, local):
        relay = await Relay(GRPC, target.opener(), local.opener()).start()
        grpc = [(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                (":path", "/echo.Echo/Say"), ("content-type", "application/grpc"), ("te", "trailers")]
        message = b"hello"
        try:
            results = await h2_exchange(relay.port, {
                1: (grpc, struct.pack("!BI", 0, len(message)) + message),
                3: (h2_get("/health"), None),
            })
        finally:
            await relay.stop()
        call, health = results[1], results[3]
        assert call["headers"][":status"] == "200"
        assert call["data"] == struct.pack("!BI", 0, 15) + b"local got hello"
        assert call["trailers"] == {"grpc-status": "0", "grpc-message": "OK"}
        assert health["data"] == b"target /health"
    run(scenario, Http2Server("target"), Http2Server("local"))


def test_http2_large_bodies_both_ways():
    async def scenario(target, local):
        relay = await Relay(GRPC, target.opener(), local.opener()).start()
        big = bytes(range(256)) * 2000  # 512 kB: many flow-control windows
        grpc = [(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                (":path", "/x.Y/Z"), ("content-type", "application/grpc")]
        try:
            # h2_exchange sends the body in one go, which h2 refuses beyond the window; so do
            # it by hand with flow control
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            conn.send_headers(1, grpc)
            payload = struct.pack("!BI", 0, len(big)) + big
            offset, reply, ended = 0, b"", False
            while not ended:
                while offset < len(payload):
                    room = min(conn.local_flow_control_window(1), 16384, len(payload) - offset)
                    if room <= 0:
                        break
                    offset += room
                    conn.send_data(1, payload[offset - room:offset], end_stream=offset == len(payload))
                writer.write(conn.data_to_send())
                data = await reader.read(65536)
                assert data
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        reply += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                writer.write(conn.data_to_send())
            writer.close()
            await writer.wait_closed()
        finally:
            await relay.stop()
        expected = b"%d:" % len(big) + bytes(300_000)
        assert reply == struct.pack("!BI", 0, len(expected)) + expected
    run(scenario, Http2Server("target"), Http2LargeServer("local"))


class Http2LargeServer(Http2Server):
    """Echoes the gRPC message size back, with a large body of its own."""

    def respond(self, conn, sid, headers, body) -> None:
        reply = b"%d:" % (len(body) - 5) + bytes(300_000)
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        self.pending = getattr(self, "pending", {})
        self.pending[sid] = struct.pack("!BI", 0, len(reply)) + reply
        self.flush(conn)

    def flush(self, conn) -> None:
        for sid, data in list(self.pending.items()):
            room = min(conn.local_flow_control_window(sid), 16384, len(data))
            while room > 0:
                conn.send_data(sid, data[:room])
                data = data[room:]
                room = min(conn.local_flow_control_window(sid), 16384, len(data))
            self.pending[sid] = data
            if not data:
                conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                del self.pending[sid]

    async def serve(self, reader, writer) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        self.pending, bodies, requests = {}, {}, {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id], bodies[event.stream_id] = dict(event.headers), b""
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.respond(conn, event.stream_id, requests[event.stream_id],
                                 bodies[event.stream_id])
                elif isinstance(event, h2.events.WindowUpdated):
                    self.flush(conn)
            writer.write(conn.data_to_send())
            await writer.drain()


# ---------------------------------------------------------------------------------------------
# (d) not HTTP, (e) the local app is down
# ---------------------------------------------------------------------------------------------

def test_non_http_bytes_reach_the_target_unchanged():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener()).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            blob = b"\x16\x03\x01\x00\xffnot http at all\r\n\x00\x01"
            writer.write(blob)
            writer.write_eof()  # half-close: the reply must still come back
            reply = await reader.read()
            writer.close()
            await writer.wait_closed()
            await wait_for(lambda: relay.finished == 1)
        finally:
            await relay.stop()
        assert reply == b"ECHO:" + blob + b":BYE"
        assert local.connections == 0
    run(scenario, EchoServer("target"), EchoServer("local"))


def test_silent_client_is_handed_to_a_server_that_speaks_first():
    async def scenario(target, local):
        relay = await Relay(ALICE, target.opener(), local.opener(), detect_timeout=0.2).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            assert await reader.readexactly(9) == b"220 hello"
            writer.write(b"QUIT\r\n")
            assert await reader.readexactly(11) == b"ECHO:QUIT\r\n"
            writer.close()
            await writer.wait_closed()
        finally:
            await relay.stop()
    run(scenario, EchoServer("target", greeting=b"220 hello"), EchoServer("local"))


def test_local_down_gives_502_and_the_connection_survives():
    async def scenario(target):
        port = closed_port()
        open_local = lambda: asyncio.open_connection("127.0.0.1", port)  # noqa: E731
        relay = await Relay(ALICE, target.opener(), open_local).start()
        try:
            alice = {"x-podtwin-user": "alice"}
            results = await asyncio.to_thread(http1_requests, relay.port, [
                ("POST", "/a", alice, b"body for nobody"),
                ("GET", "/b", {}, None),
                ("GET", "/c", alice, None),
            ])
        finally:
            await relay.stop()
        assert [(s, by) for s, by, _, _ in results] == [(502, None), (200, "target"), (502, None)]
        assert results[0][2].startswith(b"podtwin: cannot connect to local")
        assert len({port for *_, port in results}) == 1
    run(scenario, Http1Server("target"))


def test_http2_local_down_gives_502_on_that_stream():
    async def scenario(target):
        port = closed_port()
        open_local = lambda: asyncio.open_connection("127.0.0.1", port)  # noqa: E731
        relay = await Relay(ALICE, target.opener(), open_local).start()
        try:
            results = await h2_exchange(relay.port, {
                1: (h2_get("/mine", ("x-podtwin-user", "alice")), None),
                3: (h2_get("/theirs"), None),
            })
        finally:
            await relay.stop()
        assert results[1]["headers"][":status"] == "502"
        assert results[3]["data"] == b"target /theirs"
    run(scenario, Http2Server("target"))


def test_target_down_too():
    async def scenario():
        port = closed_port()
        opener = lambda: asyncio.open_connection("127.0.0.1", port)  # noqa: E731
        relay = await Relay(ALICE, opener, opener).start()
        try:
            results = await asyncio.to_thread(http1_requests, relay.port, [("GET", "/", {}, None)])
            # non-HTTP with the target down: the client connection is simply closed
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"\x00\x01\x02\r\n")
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            await relay.stop()
        assert results[0][0] == 502
    run(scenario)
