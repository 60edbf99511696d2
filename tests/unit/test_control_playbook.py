"""The agent's control channel core (agent/link/control.py) as a playbook: ``>> input << commands``.

Each input is either bytes from the client (fed to the channel) or an event (a socket opened, a
DNS answer, the clock); after it come the commands the core must return for it, exactly and in
order. No sockets, no event loop, no sleeps: the I/O half is tested in test_control_session.py.
"""
from __future__ import annotations

from typing import Any

import pytest

from podtwin.agent.link import wire
from podtwin.agent.link.control import ControlHandler
from podtwin.agent.link.control_events import (
    ChannelClosed, CloseUdp, DnsAnswered, EndSession, Fatal, ForwardDns, Greeted, NoticeFromAgent, OpenUdp,
    ReadTargetInfo, Reply, SendUdp, Subscribe, SubscribeDone, TargetInfoRead, Tick, UdpOpened,
    UdpOpenFailed, UdpReceived)

IDLE = 120.0
HELLO = wire.Hello(wire.PROTOCOL_VERSION, "sidecar")
INFO = wire.Info(pid=4242, env={"APP_ENV": "staging", "EMPTY": ""}, resolv_conf="nameserver 10.0.0.10\n",
                 hosts="10.0.0.5\tdb\n", hostname="demo-api")


class Playbook:
    """``Playbook() >> input << command << command >> input ...``; ``assert playbook`` plays the
    steps not played yet, so a test can look at the core between two parts of its script."""

    def __init__(self, core: ControlHandler | None = None) -> None:
        self.core = core or ControlHandler(now=0.0, udp_idle=IDLE)
        self.steps: list[tuple[Any, list]] = []
        self.played = 0

    def __rshift__(self, given) -> "Playbook":
        self.steps.append((given, []))
        return self

    def __lshift__(self, command) -> "Playbook":
        self.steps[-1][1].append(command)
        return self

    def __bool__(self) -> bool:
        for given, expected in self.steps[self.played:]:
            actual = self.core.feed(given) if isinstance(given, bytes) else self.core.handle(given)
            if actual != expected:
                raise AssertionError(f"after >> {show(given)}\n  expected: {[show(c) for c in expected]}"
                                     f"\n  got:      {[show(c) for c in actual]}")
            self.played += 1
        return True


def show(item) -> str:
    """A frame as its messages' names and payloads, anything else as it is."""
    data = item.data if isinstance(item, Reply) and isinstance(item.data, bytes) else item
    if not isinstance(data, bytes):
        return repr(item)
    try:
        msgs = wire.FrameDecoder().feed(data)
    except wire.ProtocolError:
        return repr(item)
    text = ", ".join(f"{m.name} {m.payload[:60]!r}" for m in msgs)
    return f"Reply({text})" if isinstance(item, Reply) else text


class Contains:
    """Equal to any str or bytes that contains ``part``."""

    def __init__(self, part) -> None:
        self.part = part

    def __eq__(self, other) -> bool:
        return isinstance(other, type(self.part)) and self.part in other

    def __repr__(self) -> str:
        return f"Contains({self.part!r})"


# -- frames the client sends, and the agent's replies ------------------------------------------
def frame(msg_type: int, payload: bytes = b"") -> bytes:
    return wire.encode(msg_type, payload)


def udp_open(flow: int, host: str, port: int) -> bytes:
    return wire.UdpOpen(flow, host, port).encode()


def udp_send(flow: int, data: bytes) -> bytes:
    return wire.encode_id(wire.UDP_SEND, flow, data)


def udp_close(flow: int) -> bytes:
    return wire.encode_id(wire.UDP_CLOSE, flow)


def reply(payload: wire.Payload) -> Reply:
    return Reply(payload.encode())


def reply_id(msg_type: int, ident: int, data: bytes = b"") -> Reply:
    return Reply(wire.encode_id(msg_type, ident, data))


def greeted() -> Playbook:
    """A playbook past the handshake."""
    book = Playbook() >> HELLO.encode() << reply(wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent")) << Greeted(HELLO)
    assert book
    return book


def open_flow(book: Playbook, flow: int, port: int = 9999) -> Playbook:
    """``flow`` to 127.0.0.1:``port``, its socket open."""
    assert (book >> udp_open(flow, "127.0.0.1", port) << OpenUdp(flow, "127.0.0.1", port)
            >> UdpOpened(flow))
    return book


# -- handshake ----------------------------------------------------------------------------------
def test_hello_ok_is_the_reply_to_hello():
    book = greeted()
    (msg,) = wire.FrameDecoder().feed(book.steps[0][1][0].data)
    assert wire.check_hello(msg) == wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent")  # what the client checks
    assert book.core.greeted


@pytest.mark.parametrize("first, name", [
    (frame(wire.INFO_REQUEST), "INFO_REQUEST"),
    (frame(wire.PING, b"x"), "PING"),
    (udp_open(1, "127.0.0.1", 9), "UDP_OPEN"),
    (frame(0x42), "0x42"),
])
def test_anything_but_hello_first_is_fatal(first, name):
    message = f"expected HELLO, got {name}"
    book = Playbook() >> first + HELLO.encode() << reply(wire.Error(message)) << Fatal(message)
    assert book
    assert book.core.flows == {} and not book.core.greeted
    assert book >> HELLO.encode() >> frame(wire.PING)   # no input is taken after a fatal error


def test_hello_with_another_version_is_refused():
    other = wire.encode_json(wire.HELLO, {"version": wire.PROTOCOL_VERSION + 1, "role": "runner"})
    assert (Playbook() >> other
            << Reply(Contains(f"protocol version mismatch: peer speaks {wire.PROTOCOL_VERSION + 1}, "
                              f"we speak {wire.PROTOCOL_VERSION}".encode()))
            << Fatal(Contains(f"protocol version mismatch: peer speaks {wire.PROTOCOL_VERSION + 1}, "
                              f"we speak {wire.PROTOCOL_VERSION}")))


def test_hello_without_a_role_is_refused():
    bare = wire.encode_json(wire.HELLO, {"version": wire.PROTOCOL_VERSION})
    message = "HELLO: fields ['version'], expected ['role', 'version']"
    assert Playbook() >> bare << reply(wire.Error(message)) << Fatal(message)


def test_a_second_hello_is_fatal():
    message = "unexpected message HELLO"
    assert greeted() >> HELLO.encode() << reply(wire.Error(message)) << Fatal(message)


# -- requests and replies -----------------------------------------------------------------------
def test_info_reply_is_the_targets_info():
    assert (greeted() >> frame(wire.INFO_REQUEST) << ReadTargetInfo()
            >> TargetInfoRead(INFO) << reply(INFO))


def test_end_ends_the_session():
    assert greeted() >> frame(wire.END) << EndSession()


@pytest.mark.parametrize("payload", [b"", b"beat-1", bytes(range(256)) * 4])
def test_ping_is_echoed_as_pong(payload):
    assert greeted() >> frame(wire.PING, payload) << Reply(frame(wire.PONG, payload))


def test_frames_split_byte_by_byte_give_the_same_commands_in_order():
    book = Playbook()
    script = [
        (HELLO.encode(), [reply(wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent")), Greeted(HELLO)]),
        (frame(wire.PING, b"a"), [Reply(frame(wire.PONG, b"a"))]),
        (frame(wire.INFO_REQUEST), [ReadTargetInfo()]),
        (frame(wire.PING, b"b"), [Reply(frame(wire.PONG, b"b"))]),
    ]
    for data, commands in script:
        for i in range(len(data)):
            book >> data[i:i + 1]   # nothing comes out until a frame's last byte
        for command in commands:
            book << command
    assert book


@pytest.mark.parametrize("msg_type", [0x42, wire.HELLO_OK, wire.INFO, wire.UDP_RECV, wire.PONG, wire.ERROR])
def test_unknown_or_agent_only_types_are_fatal(msg_type):
    message = f"unexpected message {wire.Message(msg_type).name}"
    assert greeted() >> frame(msg_type, b"{}") << reply(wire.Error(message)) << Fatal(message)


def test_oversize_frame_is_fatal():
    message = f"frame length {wire.MAX_FRAME + 1} out of range"
    assert (greeted() >> (wire.MAX_FRAME + 1).to_bytes(4, "big") + bytes([wire.UDP_SEND])
            << reply(wire.Error(message)) << Fatal(message))


def test_a_malformed_payload_is_fatal_and_earlier_frames_still_count():
    message = "INCOMING_SUBSCRIBE: fields ['port'], expected ['http_filter', 'mode', 'port']"
    assert (greeted() >> frame(wire.PING, b"1") + wire.encode_json(wire.INCOMING_SUBSCRIBE, {"port": 80})
            << Reply(frame(wire.PONG, b"1")) << reply(wire.Error(message)) << Fatal(message))


def test_dns_answers_carry_their_querys_id_in_any_order():
    assert (greeted()
            >> wire.encode_id(wire.DNS_QUERY, 77, b"query-a") + wire.encode_id(wire.DNS_QUERY, 78, b"query-b")
            << ForwardDns(77, b"query-a") << ForwardDns(78, b"query-b")
            >> DnsAnswered(78, b"answer-b") << reply_id(wire.DNS_ANSWER, 78, b"answer-b")
            >> DnsAnswered(77, b"") << reply_id(wire.DNS_ANSWER, 77))   # empty: no nameserver answered


def test_subscribe_is_asked_of_the_incoming_service_and_its_answer_sent_back():
    steal = wire.IncomingSubscribe(8080, "steal", {"header_filter": "x-user: me"})
    assert (greeted() >> steal.encode() << Subscribe(8080, "steal", {"header_filter": "x-user: me"})
            >> SubscribeDone(8080, "port 8080 is already stolen by podtwin session 1a2b")
            << reply(wire.IncomingReply(8080, "port 8080 is already stolen by podtwin session 1a2b"))
            >> SubscribeDone(8080, None) << reply(wire.IncomingReply(8080, None)))


def test_the_agents_notices_are_sent_as_notice():
    assert (greeted() >> NoticeFromAgent("info", "stealing port 80")
            << reply(wire.Notice("info", "stealing port 80")))


# -- UDP flows ----------------------------------------------------------------------------------
def test_udp_open_and_send_in_one_feed_wait_for_the_socket_in_order():
    assert (greeted() >> udp_open(5, "127.0.0.1", 9999) + udp_send(5, b"one") + udp_send(5, b"two")
            << OpenUdp(5, "127.0.0.1", 9999)
            >> UdpOpened(5) << SendUdp(5, b"one") << SendUdp(5, b"two")
            >> udp_send(5, b"three") << SendUdp(5, b"three")     # now the socket is open
            >> UdpReceived(5, b"echo:one") << reply_id(wire.UDP_RECV, 5, b"echo:one"))


def test_two_flows_are_kept_apart():
    assert (greeted() >> udp_open(1, "127.0.0.1", 1001) + udp_open(2, "127.0.0.1", 1002)
            + udp_send(2, b"to-b") + udp_send(1, b"to-a")
            << OpenUdp(1, "127.0.0.1", 1001) << OpenUdp(2, "127.0.0.1", 1002)
            >> UdpOpened(2) << SendUdp(2, b"to-b")
            >> UdpOpened(1) << SendUdp(1, b"to-a")
            >> UdpReceived(2, b"B:to-b") << reply_id(wire.UDP_RECV, 2, b"B:to-b")
            >> UdpReceived(1, b"A:to-a") << reply_id(wire.UDP_RECV, 1, b"A:to-a"))


def test_udp_close_stops_delivery_and_sending():
    book = open_flow(greeted(), 9)
    assert (book >> udp_close(9) << CloseUdp(9)
            >> UdpReceived(9, b"late reply")        # nothing: not to the client
            >> udp_send(9, b"after close"))         # nothing: not to the socket
    assert book.core.flows == {}                    # and the client closed it: no UDP_CLOSED back


def test_udp_close_before_the_socket_is_open():
    book = greeted()
    assert (book >> udp_open(3, "127.0.0.1", 9999) + udp_send(3, b"early") + udp_close(3)
            << OpenUdp(3, "127.0.0.1", 9999) << CloseUdp(3)
            >> UdpOpened(3))                        # a late report of the closed socket: nothing sent
    assert book.core.flows == {}


def test_udp_open_that_fails_is_reported_as_udp_closed():
    book = greeted()
    assert (book >> udp_open(4, "255.255.255.255", 9) + udp_send(4, b"x")
            << OpenUdp(4, "255.255.255.255", 9)
            >> UdpOpenFailed(4, "[Errno 13] Permission denied") << reply_id(wire.UDP_CLOSED, 4, b"[Errno 13] Permission denied")
            >> udp_send(4, b"y"))
    assert book.core.flows == {}


@pytest.mark.parametrize("port", [70000, -1])
def test_udp_open_with_an_impossible_port_is_reported_as_udp_closed(port):
    book = greeted()
    assert (book >> udp_open(8, "127.0.0.1", port) + udp_send(8, b"x")
            << reply_id(wire.UDP_CLOSED, 8, f"port {port} is out of range".encode()))
    assert book.core.flows == {}


def test_too_many_flows():
    book = Playbook(ControlHandler(now=0.0, udp_idle=IDLE, max_udp_flows=2))
    assert (book >> HELLO.encode() << reply(wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent")) << Greeted(HELLO)
            >> b"".join(udp_open(i, "127.0.0.1", 9999) for i in (1, 2, 3))
            << OpenUdp(1, "127.0.0.1", 9999) << OpenUdp(2, "127.0.0.1", 9999)
            << reply_id(wire.UDP_CLOSED, 3, b"too many UDP flows"))
    assert sorted(book.core.flows) == [1, 2]


def test_idle_flows_expire_with_notice():
    book = open_flow(open_flow(greeted(), 6), 7)      # both at time 0
    assert (book >> Tick(IDLE / 2) >> udp_send(7, b"still here") << SendUdp(7, b"still here")
            >> Tick(IDLE)                              # 6 has been idle for exactly IDLE: not yet
            >> Tick(IDLE * 5 / 4) << CloseUdp(6) << reply_id(wire.UDP_CLOSED, 6, b"idle")
            >> UdpReceived(7, b"answer") << reply_id(wire.UDP_RECV, 7, b"answer")
            >> Tick(IDLE * 3 / 2)                      # 7 was used at IDLE * 5 / 4
            >> Tick(IDLE * 5 / 2) << CloseUdp(7) << reply_id(wire.UDP_CLOSED, 7, b"idle"))
    assert book.core.flows == {}


def test_channel_closed_closes_every_flow_and_ends_the_script():
    book = open_flow(greeted(), 1)
    assert (book >> udp_open(2, "127.0.0.1", 9999) << OpenUdp(2, "127.0.0.1", 9999)
            >> ChannelClosed() << CloseUdp(1) << CloseUdp(2)
            >> UdpReceived(1, b"after channel close")
            >> UdpOpened(2)
            >> DnsAnswered(5, b"late")
            >> Tick(IDLE * 10)
            >> frame(wire.PING, b"x"))
    assert book.core.flows == {}


def test_a_fatal_error_keeps_the_flows_until_the_channel_closes():
    book = open_flow(greeted(), 1)
    assert (book >> frame(0x42) << reply(wire.Error("unexpected message 0x42")) << Fatal("unexpected message 0x42")
            >> UdpReceived(1, b"x")                    # nothing more is sent to a broken client
            >> ChannelClosed() << CloseUdp(1))


def test_reusing_a_flow_id_closes_the_old_socket():
    book = open_flow(greeted(), 1, port=1001)
    assert (book >> udp_send(1, b"a") << SendUdp(1, b"a")
            >> udp_open(1, "127.0.0.1", 1002) + udp_send(1, b"b")
            << CloseUdp(1) << OpenUdp(1, "127.0.0.1", 1002)
            >> UdpOpened(1) << SendUdp(1, b"b"))
