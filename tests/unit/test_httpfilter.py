"""The HTTP filter (agent/incoming/http/): matcher semantics (filter.py) and router playbooks
(commands.py, router.py, http1.py, http2.py, raw.py).

Playbooks feed events to a router and assert the exact commands it returns; no sockets, no
clock (a timer firing is just a Woken event). HTTP/2 peers (the client and the two upstream
servers) are in-memory h2 connections.
"""
from __future__ import annotations

import inspect

import pytest
import h2.events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from podtwin.agent.incoming.http.commands import (CLIENT, LOCAL, TARGET, Close, Command, Connect,
                                                  ConnectFailed, DataReceived, EofReceived, Event,
                                                  Passthrough, Router, Send, Shutdown, Start, Wake,
                                                  Woken)
from podtwin.agent.incoming.http.filter import HttpFilter
from podtwin.agent.incoming.http.http1 import Http1Router
from podtwin.agent.incoming.http.http2 import Http2Router
from podtwin.agent.incoming.http.raw import RawRouter
from podtwin.agent.incoming.http.router import DETECT_TIMEOUT, ConnectionRouter, detect

ALICE = {"header_filter": "^x-podtwin-user: alice$"}


class Playbook:
    """A router script in mitmproxy's notation: ``>> event`` feeds the router an event, and the
    ``<< command``s that follow are all the commands it must return for it, in order. ``assert
    playbook`` plays what was written since the last time; the router keeps its state."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.script: list[tuple[Event, list[Command]]] = []

    def __rshift__(self, event: Event) -> "Playbook":
        self.script.append((event, []))
        return self

    def __lshift__(self, command: Command) -> "Playbook":
        self.script[-1][1].append(command)
        return self

    def __bool__(self) -> bool:
        script, self.script = self.script, []
        for event, expected in script:
            commands = self.router.handle(event)
            assert commands == expected, f"the commands for {event}"
        return True


def sent(commands, dest: str) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Send) and c.dest == dest)


# ---------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------

def test_header_filter_lowercases_the_name_and_keeps_the_value_case():
    f = HttpFilter.from_dict(ALICE)
    assert f.matches("GET", "/", [("X-Podtwin-User", "alice")])
    assert f.matches("GET", "/", [("host", "h"), ("x-podtwin-user", "alice")])
    assert not f.matches("GET", "/", [("x-podtwin-user", "Alice")])
    assert not f.matches("GET", "/", [("x-podtwin-user", "alice2")])
    assert not f.matches("GET", "/", [])


def test_path_filter_sees_the_query_and_searches():
    f = HttpFilter.from_dict({"path_filter": "^/api/"})
    assert f.matches("GET", "/api/items?id=1", [])
    assert not f.matches("GET", "/web/api/", [])
    q = HttpFilter.from_dict({"path_filter": r"debug=1"})
    assert q.matches("GET", "/x?debug=1", [])
    assert HttpFilter.from_dict({"path_filter": "items"}).matches("GET", "/api/items", [])


def test_method_filter_is_case_insensitive_equality():
    f = HttpFilter.from_dict({"method_filter": "post"})
    assert f.matches("POST", "/", [])
    assert not f.matches("POSTX", "/", [])
    assert not f.matches("GET", "/", [])


def test_any_of_and_all_of():
    conds = [{"header": "^x-user: a$"}, {"path": "^/api"}, {"method": "PUT"}]
    any_of = HttpFilter.from_dict({"any_of": conds})
    all_of = HttpFilter.from_dict({"all_of": conds, "ports": [8000]})
    assert any_of.matches("GET", "/api", [])
    assert any_of.matches("GET", "/", [("X-User", "a")])
    assert not any_of.matches("GET", "/", [])
    assert not all_of.matches("PUT", "/api", [])
    assert all_of.matches("put", "/api/x", [("x-user", "a")])
    assert all_of.ports == (8000,) and any_of.ports == (80, 8080)
    assert all_of.filters_port(8000) and not all_of.filters_port(80)


@pytest.mark.parametrize("bad", [
    {}, {"header_filter": "a", "path_filter": "b"}, {"path_filter": "("}, {"any_of": []},
    {"all_of": [{"header": "a", "path": "b"}]}, {"any_of": [{"body": "x"}]},
    {"method_filter": ""},
])
def test_invalid_filters_are_rejected(bad):
    with pytest.raises(ValueError):
        HttpFilter.from_dict(bad)


@pytest.mark.parametrize("data, expected", [
    (b"", None), (b"G", None), (b"GET /x HTT", None), (b"GET /x HTTP/1.1\r", None),
    (b"GET /x HTTP/1.1\r\n", "http1"), (b"OPTIONS * HTTP/1.0\r\nHost: a\r\n", "http1"),
    (b"PRI * HTTP/2.0\r\n", None), (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", "http2"),
    (b"\x16\x03\x01\x02\x00", "other"), (b"SSH-2.0-OpenSSH\r\n", "other"),
    (b"GET /x HTTP/2\r\n", "other"), (b"GET  /x HTTP/1.1\r\n", "other"), (b"hello world", None), (b"hello world\r\n", "other"),
    (b"GET /" + b"a" * 9000, "other"),
])
def test_detect(data, expected):
    assert detect(data) == expected


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 playbooks
# ---------------------------------------------------------------------------------------------

def http1() -> ConnectionRouter:
    return ConnectionRouter(HttpFilter.from_dict(ALICE))


GET_ALICE = b"GET /a HTTP/1.1\r\nHost: svc\r\nX-Podtwin-User: alice\r\n\r\n"
GET_OTHER = b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n"
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def test_get_keep_alive_alternates_destinations():
    assert (Playbook(http1())
            >> Start() << Wake(DETECT_TIMEOUT)
            >> DataReceived(CLIENT, GET_ALICE) << Connect(LOCAL) << Send(LOCAL, GET_ALICE)
            >> DataReceived(LOCAL, OK_2) << Send(CLIENT, OK_2)
            >> DataReceived(CLIENT, GET_OTHER) << Connect(TARGET) << Send(TARGET, GET_OTHER)
            >> DataReceived(TARGET, OK_2) << Send(CLIENT, OK_2)
            # both upstream connections are reused: no new Connect
            >> DataReceived(CLIENT, GET_ALICE) << Send(LOCAL, GET_ALICE)
            >> DataReceived(LOCAL, OK_2) << Send(CLIENT, OK_2)
            >> EofReceived(CLIENT) << Close(LOCAL) << Close(TARGET) << Close(CLIENT))


def test_post_content_length_body_arriving_in_pieces():
    head = (b"POST /submit HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n"
            b"X-Podtwin-User: alice\r\n\r\n")
    assert (Playbook(http1())
            >> DataReceived(CLIENT, head + b"01234")
            << Connect(LOCAL) << Send(LOCAL, head + b"01234")
            >> DataReceived(CLIENT, b"56789") << Send(LOCAL, b"56789")
            >> DataReceived(LOCAL, OK_2) << Send(CLIENT, OK_2))


def test_chunked_request_and_response_with_trailers():
    r = http1()
    head = b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n"
    out = r.handle(DataReceived(CLIENT, head + body))
    assert out[0] == Connect(TARGET)
    assert sent(out, TARGET) == head + body
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"
    assert sent(r.handle(DataReceived(TARGET, resp)), CLIENT) == resp


def test_pipelined_requests_are_answered_in_order():
    assert (Playbook(http1())
            # only the first request goes out: the next waits until its response is complete
            >> DataReceived(CLIENT, GET_ALICE + GET_OTHER + GET_ALICE)
            << Connect(LOCAL) << Send(LOCAL, GET_ALICE)
            >> DataReceived(LOCAL, OK_2[:20])  # h11 waits for the whole head
            >> DataReceived(LOCAL, OK_2[20:-1]) << Send(CLIENT, OK_2[:-1])
            >> DataReceived(LOCAL, OK_2[-1:])
            << Send(CLIENT, OK_2[-1:]) << Connect(TARGET) << Send(TARGET, GET_OTHER)
            >> DataReceived(TARGET, OK_2) << Send(CLIENT, OK_2) << Send(LOCAL, GET_ALICE))


def test_header_names_keep_their_case_and_order():
    r = http1()
    req = b"GET / HTTP/1.1\r\nHost: svc\r\nX-B: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n"
    assert sent(r.handle(DataReceived(CLIENT, req)), TARGET) == req
    resp = b"HTTP/1.1 404 Nope\r\nX-Thing: a\r\nContent-Length: 0\r\n\r\n"
    assert sent(r.handle(DataReceived(TARGET, resp)), CLIENT) == resp


def test_connection_close_from_the_client():
    r = http1()
    req = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    assert sent(r.handle(DataReceived(CLIENT, req)), TARGET) == req
    out = r.handle(DataReceived(TARGET, OK_2))
    # h11 says it explicitly in the response, as the connection is going to close
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    assert out == [Send(CLIENT, closing), Close(TARGET), Close(CLIENT)]


def test_upstream_closing_between_requests_is_reopened():
    r = http1()
    r.handle(DataReceived(CLIENT, GET_OTHER))
    r.handle(DataReceived(TARGET, OK_2))
    assert r.handle(EofReceived(TARGET)) == [Close(TARGET)]
    assert r.handle(DataReceived(CLIENT, GET_OTHER)) == [Connect(TARGET), Send(TARGET, GET_OTHER)]


def test_client_half_close_still_gets_its_response():
    r = http1()
    assert sent(r.handle(DataReceived(CLIENT, GET_OTHER)), TARGET) == GET_OTHER
    assert r.handle(EofReceived(CLIENT)) == []  # the request is complete: wait for its response
    out = r.handle(DataReceived(TARGET, OK_2))
    assert sent(out, CLIENT).endswith(b"\r\n\r\nhi")
    assert out[-2:] == [Close(TARGET), Close(CLIENT)]


def test_client_eof_mid_body_closes_everything():
    r = http1()
    r.handle(DataReceived(CLIENT, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc"))
    out = r.handle(EofReceived(CLIENT))
    assert out[-2:] == [Close(TARGET), Close(CLIENT)]


def test_expect_100_continue_flows_through():
    r = http1()
    head = (b"PUT /f HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
            b"X-Podtwin-User: alice\r\n\r\n")
    assert sent(r.handle(DataReceived(CLIENT, head)), LOCAL) == head
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert r.handle(DataReceived(LOCAL, cont)) == [Send(CLIENT, cont)]
    assert r.handle(DataReceived(CLIENT, b"abc")) == [Send(LOCAL, b"abc")]
    assert r.handle(DataReceived(LOCAL, OK_2)) == [Send(CLIENT, OK_2)]


def test_local_app_down_answers_502_and_keeps_the_connection():
    r = http1()
    post = (b"POST / HTTP/1.1\r\nHost: svc\r\nX-Podtwin-User: alice\r\nContent-Length: 4\r\n\r\nab")
    assert r.handle(DataReceived(CLIENT, post))[0] == Connect(LOCAL)
    out = r.handle(ConnectFailed(LOCAL, "refused"))
    assert out[0] == Close(LOCAL)
    assert sent(out, CLIENT).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert r.handle(DataReceived(CLIENT, b"cd")) == []  # the rest of the body is dropped
    assert r.handle(DataReceived(CLIENT, GET_OTHER)) == [Connect(TARGET), Send(TARGET, GET_OTHER)]


def test_upstream_dying_mid_response_closes_the_client():
    r = http1()
    r.handle(DataReceived(CLIENT, GET_OTHER))
    r.handle(DataReceived(TARGET, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    assert r.handle(EofReceived(TARGET)) == [Close(TARGET), Close(CLIENT)]


def test_upstream_closing_before_responding_gives_502():
    r = http1()
    r.handle(DataReceived(CLIENT, GET_OTHER))
    out = r.handle(EofReceived(TARGET))
    assert out[0] == Close(TARGET)
    assert sent(out, CLIENT).startswith(b"HTTP/1.1 502 ")


def test_websocket_upgrade_switches_to_passthrough():
    r = http1()
    up = (b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"X-Podtwin-User: alice\r\nSec-WebSocket-Key: x\r\n\r\n")
    r.handle(DataReceived(CLIENT, GET_OTHER))
    r.handle(DataReceived(TARGET, OK_2))  # a keep-alive target connection is open
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert (Playbook(r)
            >> DataReceived(CLIENT, up) << Connect(LOCAL) << Send(LOCAL, up)
            >> DataReceived(LOCAL, switch + b"\x81\x02hi")
            << Send(CLIENT, switch) << Close(TARGET) << Passthrough(LOCAL)
            << Send(CLIENT, b"\x81\x02hi")
            >> DataReceived(CLIENT, b"\x81\x82anything") << Send(LOCAL, b"\x81\x82anything")
            >> DataReceived(LOCAL, b"\x88\x00") << Send(CLIENT, b"\x88\x00")
            >> EofReceived(CLIENT) << Shutdown(LOCAL)
            >> EofReceived(LOCAL) << Shutdown(CLIENT) << Close(LOCAL) << Close(CLIENT))


def test_declined_upgrade_stays_http():
    r = http1()
    up = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert sent(r.handle(DataReceived(CLIENT, up)), TARGET) == up
    assert r.handle(DataReceived(TARGET, OK_2)) == [Send(CLIENT, OK_2)]
    assert r.handle(DataReceived(CLIENT, GET_ALICE)) == [Connect(LOCAL), Send(LOCAL, GET_ALICE)]


def test_h2c_upgrade_offer_is_removed():
    r = http1()
    req = (b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings, keep-alive\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    assert sent(r.handle(DataReceived(CLIENT, req)), TARGET) == \
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n"
    assert r.handle(DataReceived(TARGET, OK_2)) == [Send(CLIENT, OK_2)]
    assert r.handle(DataReceived(CLIENT, GET_ALICE)) == [Connect(LOCAL), Send(LOCAL, GET_ALICE)]


def test_malformed_request_gets_400_and_close():
    r = http1()
    out = r.handle(DataReceived(CLIENT, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"))
    assert sent(out, CLIENT).startswith(b"HTTP/1.1 400 ")
    assert out[-1] == Close(CLIENT)


# ---------------------------------------------------------------------------------------------
# Not HTTP, and clients that say too little: the detection's Wake
# ---------------------------------------------------------------------------------------------

def test_non_http_goes_to_the_target_unchanged():
    assert (Playbook(http1())
            >> Start() << Wake(DETECT_TIMEOUT)
            >> DataReceived(CLIENT, b"\x16\x03\x01hello")
            << Connect(TARGET) << Passthrough(TARGET) << Send(TARGET, b"\x16\x03\x01hello")
            >> DataReceived(TARGET, b"reply") << Send(CLIENT, b"reply")
            >> EofReceived(TARGET) << Shutdown(CLIENT)
            >> EofReceived(CLIENT) << Shutdown(TARGET) << Close(TARGET) << Close(CLIENT))


def test_short_non_http_then_eof_still_reaches_the_target():
    assert (Playbook(http1())
            >> DataReceived(CLIENT, b"G")
            >> EofReceived(CLIENT)
            << Connect(TARGET) << Passthrough(TARGET) << Send(TARGET, b"G") << Shutdown(TARGET))


def test_client_closing_before_a_byte_closes_the_relay():
    assert (Playbook(http1())
            >> Start() << Wake(DETECT_TIMEOUT)
            >> EofReceived(CLIENT) << Close(CLIENT))


def test_silent_client_is_handed_to_the_target_when_woken():
    # A server-speaks-first protocol (SMTP, MySQL...): the client waits for a greeting.
    assert (Playbook(ConnectionRouter(HttpFilter.from_dict(ALICE), detect_timeout=0.2))
            >> Start() << Wake(0.2)
            >> Woken() << Connect(TARGET) << Passthrough(TARGET)
            >> DataReceived(TARGET, b"220 hello\r\n") << Send(CLIENT, b"220 hello\r\n")
            >> DataReceived(CLIENT, b"QUIT\r\n") << Send(TARGET, b"QUIT\r\n"))


def test_client_undecided_when_woken_goes_to_the_target_with_what_it_sent():
    assert (Playbook(http1())
            >> Start() << Wake(DETECT_TIMEOUT)
            >> DataReceived(CLIENT, b"GET /a HT")  # could still be a request line
            >> Woken() << Connect(TARGET) << Passthrough(TARGET) << Send(TARGET, b"GET /a HT"))


def test_woken_after_detection_changes_nothing():
    assert (Playbook(http1())
            >> Start() << Wake(DETECT_TIMEOUT)
            >> DataReceived(CLIENT, GET_ALICE) << Connect(LOCAL) << Send(LOCAL, GET_ALICE)
            >> Woken()
            >> DataReceived(LOCAL, OK_2) << Send(CLIENT, OK_2))


def test_raw_router_connect_failure_closes_the_client():
    assert (Playbook(RawRouter(TARGET))
            >> Start() << Connect(TARGET) << Passthrough(TARGET)
            >> ConnectFailed(TARGET, "refused") << Close(CLIENT))


# ---------------------------------------------------------------------------------------------
# The router interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", [RawRouter, Http1Router, Http2Router, ConnectionRouter])
def test_every_router_has_one_entry_point(router):
    public = [name for name, _ in inspect.getmembers(router, inspect.isfunction)
              if not name.startswith("_")]
    assert public == ["handle"]


def test_http1_router_can_be_used_directly():
    r = Http1Router(HttpFilter.from_dict({"method_filter": "DELETE"}))
    assert r.handle(Start()) == []
    delete = b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n"
    assert r.handle(DataReceived(CLIENT, delete))[0] == Connect(LOCAL)


# ---------------------------------------------------------------------------------------------
# HTTP/2 playbooks: an h2 client, the router, and an h2 server per destination, in memory
# ---------------------------------------------------------------------------------------------

class H2Book:
    def __init__(self, d: dict | None = None) -> None:
        self.router = ConnectionRouter(HttpFilter.from_dict(d or ALICE))
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.client.initiate_connection()
        self.servers: dict[str, H2Connection] = {}
        self.connects: list[str] = []
        self.client_events: list = []
        self.server_events: dict[str, list] = {LOCAL: [], TARGET: []}
        self.closed: list[str] = []

    def run(self, commands) -> None:
        """Deliver the router's commands to the in-memory peers until everything is quiet."""
        queue = list(commands)
        while queue:
            c = queue.pop(0)
            if isinstance(c, Connect):
                self.connects.append(c.dest)
                self.servers[c.dest] = H2Connection(
                    H2Configuration(client_side=False, header_encoding="utf-8"))
                self.servers[c.dest].initiate_connection()
                queue += self.deliver(c.dest, self.servers[c.dest].data_to_send())
            elif isinstance(c, Send) and c.dest == CLIENT:
                self.client_events += self.client.receive_data(c.data)
                queue += self.deliver(CLIENT, self.client.data_to_send())
            elif isinstance(c, Send):
                server = self.servers[c.dest]
                self.server_events[c.dest] += server.receive_data(c.data)
                queue += self.deliver(c.dest, server.data_to_send())
            elif isinstance(c, Close):
                self.closed.append(c.dest)

    def deliver(self, source: str, data: bytes) -> list:
        """The router's commands for bytes from ``source`` (a driver reports no empty reads)."""
        return self.router.handle(DataReceived(source, data)) if data else []

    def from_client(self) -> None:
        self.run(self.deliver(CLIENT, self.client.data_to_send()))

    def from_server(self, dest: str) -> None:
        self.run(self.deliver(dest, self.servers[dest].data_to_send()))

    def requests(self, dest: str) -> list:
        return [e for e in self.server_events[dest] if isinstance(e, h2.events.RequestReceived)]

    def of(self, kind, events=None) -> list:
        return [e for e in (self.client_events if events is None else events)
                if isinstance(e, kind)]


def req_headers(path: str, user: str | None = None, method: str = "GET") -> list:
    h = [(":method", method), (":scheme", "http"), (":authority", "svc"), (":path", path)]
    return h + ([("x-podtwin-user", user)] if user else [])


def test_h2_two_concurrent_streams_routed_differently():
    b = H2Book()
    b.client.send_headers(1, req_headers("/one", "alice"), end_stream=True)
    b.client.send_headers(3, req_headers("/two"), end_stream=True)
    b.from_client()
    assert sorted(b.connects) == [LOCAL, TARGET]
    (local_req,), (target_req,) = b.requests(LOCAL), b.requests(TARGET)
    assert dict(local_req.headers)[":path"] == "/one"
    assert dict(target_req.headers)[":path"] == "/two"
    # answer the target first: responses come back on the client's own stream ids
    b.servers[TARGET].send_headers(target_req.stream_id, [(":status", "200")])
    b.servers[TARGET].send_data(target_req.stream_id, b"from target", end_stream=True)
    b.from_server(TARGET)
    b.servers[LOCAL].send_headers(local_req.stream_id, [(":status", "201")])
    b.servers[LOCAL].send_data(local_req.stream_id, b"from local", end_stream=True)
    b.from_server(LOCAL)
    responses = {e.stream_id: dict(e.headers)[":status"] for e in b.of(h2.events.ResponseReceived)}
    assert responses == {1: "201", 3: "200"}
    frames = [(e.stream_id, e.data) for e in b.of(h2.events.DataReceived)]
    assert sorted(frames) == [(1, b"from local"), (3, b"from target")]  # END_STREAM kept on DATA
    assert sorted(e.stream_id for e in b.of(h2.events.StreamEnded)) == [1, 3]
    assert not b.router.router.streams  # both streams are finished and forgotten


def test_h2_request_body_and_response_trailers():
    b = H2Book({"header_filter": "^content-type: application/grpc"})
    b.client.send_headers(1, req_headers("/pkg.Svc/Call", method="POST") +
                          [("content-type", "application/grpc"), ("te", "trailers")])
    b.client.send_data(1, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    b.from_client()
    assert b.connects == [LOCAL]
    events = b.server_events[LOCAL]
    assert b"".join(e.data for e in b.of(h2.events.DataReceived, events)) == b"\x00\x00\x00\x00\x03abc"
    assert b.of(h2.events.StreamEnded, events)
    server = b.servers[LOCAL]
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    server.send_headers(1, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
    b.from_server(LOCAL)
    (trailers,) = b.of(h2.events.TrailersReceived)
    assert dict(trailers.headers)["grpc-status"] == "0"
    assert b.of(h2.events.StreamEnded)[0].stream_id == 1


def test_h2_request_trailers_are_forwarded():
    b = H2Book({"method_filter": "PUT"})
    b.client.send_headers(1, req_headers("/t", method="PUT") + [("te", "trailers")])
    b.client.send_data(1, b"body")
    b.client.send_headers(1, [("x-checksum", "42")], end_stream=True)
    b.from_client()
    events = b.server_events[LOCAL]
    assert [dict(e.headers) for e in b.of(h2.events.TrailersReceived, events)] == \
        [{"x-checksum": "42"}]
    assert len(b.of(h2.events.StreamEnded, events)) == 1


def test_h2_client_reset_reaches_the_upstream_and_back():
    b = H2Book()
    b.client.send_headers(1, req_headers("/slow", "alice"))
    b.client.send_headers(3, req_headers("/other", "alice"))
    b.from_client()
    b.client.reset_stream(1, ErrorCodes.CANCEL)
    b.from_client()
    resets = b.of(h2.events.StreamReset, b.server_events[LOCAL])
    assert [(e.stream_id, e.error_code) for e in resets] == [(1, ErrorCodes.CANCEL)]
    # the upstream resets the other stream: the client sees it on its stream id
    b.servers[LOCAL].reset_stream(3, ErrorCodes.REFUSED_STREAM)
    b.from_server(LOCAL)
    assert [(e.stream_id, e.error_code) for e in b.of(h2.events.StreamReset)] == \
        [(3, ErrorCodes.REFUSED_STREAM)]
    assert not b.router.router.streams


def test_h2_local_down_gives_502_on_that_stream_only():
    b = H2Book()
    b.client.send_headers(1, req_headers("/x", "alice"), end_stream=True)
    b.client.send_headers(3, req_headers("/y"), end_stream=True)
    commands = b.deliver(CLIENT, b.client.data_to_send())
    # the driver could not open LOCAL: it drops what was meant for it and reports the failure
    b.run([c for c in commands if c.dest != LOCAL])
    b.run(b.router.handle(ConnectFailed(LOCAL, "refused")))
    statuses = {e.stream_id: dict(e.headers)[":status"] for e in b.of(h2.events.ResponseReceived)}
    assert statuses == {1: "502"}
    (req,) = b.requests(TARGET)
    b.servers[TARGET].send_headers(req.stream_id, [(":status", "200")], end_stream=True)
    b.from_server(TARGET)
    statuses = {e.stream_id: dict(e.headers)[":status"] for e in b.of(h2.events.ResponseReceived)}
    assert statuses == {1: "502", 3: "200"}


def test_h2_flow_control_large_upload_is_paced_by_the_upstream():
    # 200 kB is three times the default 64 kB window: it only gets through if the router
    # acknowledges (WINDOW_UPDATE) what the upstream accepted, and queues what does not fit.
    b = H2Book({"path_filter": "^/upload"})
    body = bytes(range(256)) * 800
    b.client.send_headers(1, req_headers("/upload", method="POST"))
    offset = 0
    for _ in range(100):
        room = min(b.client.local_flow_control_window(1), len(body) - offset, 16384)
        if room:
            b.client.send_data(1, body[offset:offset + room], end_stream=offset + room == len(body))
            offset += room
        b.from_client()
        server = b.servers[LOCAL]
        for e in b.of(h2.events.DataReceived, b.server_events[LOCAL]):
            server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        got = b"".join(e.data for e in b.of(h2.events.DataReceived, b.server_events[LOCAL]))
        b.server_events[LOCAL] = [e for e in b.server_events[LOCAL]
                                  if not isinstance(e, h2.events.DataReceived)]
        b.received = getattr(b, "received", b"") + got
        b.from_server(LOCAL)
        if len(b.received) == len(body):
            break
    assert b.received == body
    assert b.of(h2.events.StreamEnded, b.server_events[LOCAL])


def test_h2_reset_stream_gives_back_its_queued_window():
    b = H2Book()
    b.client.send_headers(1, req_headers("/a", "alice", "POST"))
    b.client.send_headers(3, req_headers("/b", "alice", "POST"))
    for _ in range(4):
        b.client.send_data(1, bytes(16383))
    b.client.send_data(1, bytes(3))  # 65535: the local server's whole connection window
    b.from_client()
    # forwarded, so acknowledged (h2 batches WINDOW_UPDATEs, hence "nearly")
    assert b.client.outbound_flow_control_window > 65000
    # more than half a window (h2 hands space back in batches of half a window)
    for _ in range(3):
        b.client.send_data(3, bytes(13334))
    b.from_client()  # queued in the router: the local server has no window left
    assert b.client.outbound_flow_control_window <= 65535 - 40000
    b.client.reset_stream(3)
    b.from_client()
    assert b.client.outbound_flow_control_window > 65000


def test_h2_ping_and_settings_are_answered():
    b = H2Book()
    b.client.ping(b"12345678")
    b.from_client()
    assert [e.ping_data for e in b.of(h2.events.PingAckReceived)] == [b"12345678"]
    assert b.of(h2.events.SettingsAcknowledged)


def test_h2_client_goaway_closes_everything():
    # h2 accepts nothing after a GOAWAY, so there is no draining of open streams
    b = H2Book()
    b.client.send_headers(1, req_headers("/x"), end_stream=True)
    b.from_client()
    b.client.close_connection()
    b.from_client()
    assert b.closed == [TARGET, CLIENT]


def test_h2_upstream_goaway_refuses_unprocessed_streams():
    b = H2Book()
    for sid in (1, 3, 5):
        b.client.send_headers(sid, req_headers(f"/{sid}"), end_stream=True)
    b.from_client()
    server = b.servers[TARGET]
    server.send_headers(1, [(":status", "200")], end_stream=True)
    server.close_connection(last_stream_id=3)
    b.from_server(TARGET)
    assert b.closed == [TARGET]
    statuses = {e.stream_id: dict(e.headers)[":status"] for e in b.of(h2.events.ResponseReceived)}
    assert statuses == {1: "200", 3: "502"}  # 3 was accepted but can no longer be answered
    assert [(e.stream_id, e.error_code) for e in b.of(h2.events.StreamReset)] == \
        [(5, ErrorCodes.REFUSED_STREAM)]  # 5 was never processed: the client may retry it
    b.client.send_headers(7, req_headers("/7"), end_stream=True)
    b.from_client()
    assert b.connects == [TARGET, TARGET]  # a fresh connection for the next request


def test_h2_router_can_be_used_directly():
    r = Http2Router(HttpFilter.from_dict(ALICE))
    out = r.handle(Start())
    assert len(out) == 1 and out[0].dest == CLIENT  # our SETTINGS
