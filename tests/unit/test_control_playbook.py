"""The agent's control channel (agent/link/control.py) as a playbook: feed frames, read what it sends.

No SSH and no agent process: a ControlHandler in an asyncio loop, a fake target process, and the
frames a client would send. UDP goes to echo sockets on loopback created here.
"""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from podtwin.agent.link import control, wire
from podtwin.agent.link.control import ControlHandler

HELLO = wire.encode_json(wire.HELLO, {"version": wire.PROTOCOL_VERSION, "role": "sidecar"})


class FakeTarget:
    """What ControlHandler uses of a TargetProcess."""

    def __init__(self, files: dict[str, str] | None = None) -> None:
        self.files = files or {}
        self.info_calls = 0

    def info(self) -> wire.Info:
        self.info_calls += 1
        return wire.Info(pid=4242, env={"APP_ENV": "staging", "EMPTY": ""}, hostname="demo-api",
                         resolv_conf=self.files.get("/etc/resolv.conf", ""), hosts="10.0.0.5\tdb\n")

    def read_text(self, path: str, default: str = "") -> str:
        return self.files.get(path, default)

    def exists(self) -> bool:
        return True


class Playbook:
    """One control channel: ``feed(*frames)`` in, ``sent`` (decoded messages) out."""

    def __init__(self, target: FakeTarget | None = None) -> None:
        self.target = target or FakeTarget()
        self.sent: list[wire.Message] = []
        self.hellos: list[dict] = []
        self._decoder = wire.FrameDecoder()
        self.handler = ControlHandler(self.target, self._send, self.hellos.append)

    def _send(self, data: bytes) -> None:
        self.sent += self._decoder.feed(data)

    def feed(self, *frames: bytes) -> None:
        self.handler.feed(b"".join(frames))

    def types(self) -> list[str]:
        return [m.name for m in self.sent]

    def of(self, msg_type: int) -> list[wire.Message]:
        return [m for m in self.sent if m.type == msg_type]

    async def until(self, predicate, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out; sent so far: {self.types()}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.handler.close()
        await asyncio.sleep(0)  # let the cancelled tasks finish


def play(scenario) -> None:
    """Run ``scenario(playbook)`` in a fresh loop; the handler is always closed afterwards."""
    async def main() -> None:
        book = Playbook()
        try:
            await scenario(book)
        finally:
            await book.close()
        assert not book.handler.tasks or all(t.done() for t in book.handler.tasks)
    asyncio.run(asyncio.wait_for(main(), 20))


class EchoServer(asyncio.DatagramProtocol):
    """A UDP echo on 127.0.0.1 that records who sent what."""

    def __init__(self, prefix: bytes = b"echo:") -> None:
        self.prefix = prefix
        self.received: list[tuple[bytes, tuple]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append((data, addr))
        self.transport.sendto(self.prefix + data, addr)

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]


async def echo_server(prefix: bytes = b"echo:") -> EchoServer:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: EchoServer(prefix), local_addr=("127.0.0.1", 0))
    return proto


def udp_open(flow: int, host: str, port: int) -> bytes:
    return wire.encode_id(wire.UDP_OPEN, flow, json.dumps({"host": host, "port": port}).encode())


def udp_send(flow: int, data: bytes) -> bytes:
    return wire.encode_id(wire.UDP_SEND, flow, data)


# -- handshake ----------------------------------------------------------------------------------
def test_hello_ok_is_the_reply_to_hello():
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO)
        assert book.types() == ["HELLO_OK"]
        assert book.sent[0].json() == {"version": wire.PROTOCOL_VERSION, "agent": "podtwin-agent"}
        assert wire.check_hello(book.sent[0])  # what the client will check
        assert book.hellos == [wire.Hello(wire.PROTOCOL_VERSION, "sidecar")]
    play(scenario)


@pytest.mark.parametrize("first", [
    wire.encode(wire.INFO_REQUEST),
    wire.encode(wire.PING, b"x"),
    udp_open(1, "127.0.0.1", 9),
    wire.encode(0x42),
])
def test_anything_but_hello_first_is_a_protocol_error(first):
    async def scenario(book: Playbook) -> None:
        with pytest.raises(wire.ProtocolError, match="expected HELLO"):
            book.feed(first, HELLO)
        assert book.sent == [] and book.hellos == [] and book.handler.flows == {}
        assert book.target.info_calls == 0
    play(scenario)


def test_hello_with_another_version_is_refused():
    async def scenario(book: Playbook) -> None:
        with pytest.raises(wire.ProtocolError, match="protocol version mismatch"):
            book.feed(wire.encode_json(wire.HELLO, {"version": wire.PROTOCOL_VERSION + 1, "role": "runner"}))
        assert book.sent == [] and book.hellos == []
    play(scenario)


def test_a_second_hello_is_a_protocol_error():
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO)
        with pytest.raises(wire.ProtocolError, match="unexpected message HELLO"):
            book.feed(HELLO)
        assert book.types() == ["HELLO_OK"] and len(book.hellos) == 1
    play(scenario)


# -- requests and replies -----------------------------------------------------------------------
def test_info_reply_is_the_targets_info():
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO, wire.encode(wire.INFO_REQUEST))
        assert book.types() == ["HELLO_OK", "INFO"]
        assert wire.Info.decode(book.sent[1]) == book.target.info()
        assert book.sent[1].json()["env"] == {"APP_ENV": "staging", "EMPTY": ""}
    play(scenario)


@pytest.mark.parametrize("payload", [b"", b"beat-1", bytes(range(256)) * 4])
def test_ping_is_echoed_as_pong(payload):
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO, wire.encode(wire.PING, payload))
        assert book.types() == ["HELLO_OK", "PONG"]
        assert book.sent[1].payload == payload
    play(scenario)


def test_frames_split_byte_by_byte_give_the_same_replies_in_order():
    async def scenario(book: Playbook) -> None:
        stream = b"".join([HELLO, wire.encode(wire.PING, b"a"), wire.encode(wire.INFO_REQUEST),
                           wire.encode(wire.PING, b"b")])
        for i in range(len(stream)):
            book.feed(stream[i:i + 1])
        assert book.types() == ["HELLO_OK", "PONG", "INFO", "PONG"]
        assert [m.payload for m in book.of(wire.PONG)] == [b"a", b"b"]
    play(scenario)


@pytest.mark.parametrize("msg_type", [0x42, wire.HELLO_OK, wire.INFO, wire.UDP_RECV, wire.PONG, wire.ERROR])
def test_unknown_or_agent_only_types_are_protocol_errors(msg_type):
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO)
        with pytest.raises(wire.ProtocolError, match="unexpected message"):
            book.feed(wire.encode(msg_type, b"{}"))
    play(scenario)


def test_oversize_frame_is_a_protocol_error():
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO)
        with pytest.raises(wire.ProtocolError, match="out of range"):
            book.feed((wire.MAX_FRAME + 1).to_bytes(4, "big") + bytes([wire.UDP_SEND]))
    play(scenario)


def test_dns_query_with_no_nameserver_answering_gets_an_empty_answer_with_its_id():
    """The target's resolv.conf points at a loopback address nothing listens on: refused at once."""
    async def scenario(book: Playbook) -> None:
        book.target.files["/etc/resolv.conf"] = "nameserver 127.0.0.10\noptions timeout:1 attempts:1\n"
        query = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01"
        book.feed(HELLO, wire.encode_id(wire.DNS_QUERY, 77, query))
        await book.until(lambda: book.of(wire.DNS_ANSWER))
        assert book.of(wire.DNS_ANSWER)[0].split_id() == (77, b"")
    play(scenario)


# -- UDP flows ----------------------------------------------------------------------------------
def test_udp_open_and_send_in_one_feed_get_the_reply():
    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        # the socket does not exist yet when UDP_SEND is handled: the datagrams wait, in order
        book.feed(HELLO, udp_open(5, "127.0.0.1", echo.port), udp_send(5, b"one"), udp_send(5, b"two"))
        await book.until(lambda: len(book.of(wire.UDP_RECV)) == 2)
        assert [m.split_id() for m in book.of(wire.UDP_RECV)] == [(5, b"echo:one"), (5, b"echo:two")]
        assert [data for data, _ in echo.received] == [b"one", b"two"]
        assert len({addr for _, addr in echo.received}) == 1  # one socket per flow
        book.feed(udp_send(5, b"three"))                     # now the socket is open
        await book.until(lambda: len(book.of(wire.UDP_RECV)) == 3)
        assert book.of(wire.UDP_RECV)[2].split_id() == (5, b"echo:three")
        assert not book.of(wire.UDP_CLOSED)
        echo.transport.close()
    play(scenario)


def test_two_flows_are_kept_apart():
    async def scenario(book: Playbook) -> None:
        a, b = await echo_server(b"A:"), await echo_server(b"B:")
        book.feed(HELLO, udp_open(1, "127.0.0.1", a.port), udp_open(2, "127.0.0.1", b.port),
                  udp_send(2, b"to-b"), udp_send(1, b"to-a"))
        await book.until(lambda: len(book.of(wire.UDP_RECV)) == 2)
        assert sorted(m.split_id() for m in book.of(wire.UDP_RECV)) == [(1, b"A:to-a"), (2, b"B:to-b")]
        for server in (a, b):
            server.transport.close()
    play(scenario)


def test_udp_close_stops_delivery_and_sending():
    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        book.feed(HELLO, udp_open(9, "127.0.0.1", echo.port), udp_send(9, b"hi"))
        await book.until(lambda: book.of(wire.UDP_RECV))
        flow_addr = echo.received[0][1]
        book.feed(wire.encode_id(wire.UDP_CLOSE, 9))
        assert 9 not in book.handler.flows
        # the server still answers the flow's old address, and the client sends on the closed flow
        echo.transport.sendto(b"late reply", flow_addr)
        book.feed(udp_send(9, b"after close"))
        await asyncio.sleep(0.2)
        assert [m.split_id() for m in book.of(wire.UDP_RECV)] == [(9, b"echo:hi")]
        assert [data for data, _ in echo.received] == [b"hi"]
        assert not book.of(wire.UDP_CLOSED)   # the client closed it: no notice back
        echo.transport.close()
    play(scenario)


def test_udp_close_before_the_socket_is_open():
    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        book.feed(HELLO, udp_open(3, "127.0.0.1", echo.port), udp_send(3, b"early"),
                  wire.encode_id(wire.UDP_CLOSE, 3))
        await asyncio.sleep(0.2)
        assert echo.received == [] and book.types() == ["HELLO_OK"] and book.handler.flows == {}
        echo.transport.close()
    play(scenario)


def test_udp_open_that_fails_is_reported_as_udp_closed():
    async def scenario(book: Playbook) -> None:
        # connect() to the broadcast address fails (no route, or no SO_BROADCAST); nothing is sent
        book.feed(HELLO, udp_open(4, "255.255.255.255", 9), udp_send(4, b"x"))
        await book.until(lambda: book.of(wire.UDP_CLOSED))
        ident, reason = book.of(wire.UDP_CLOSED)[0].split_id()
        assert ident == 4 and reason
        assert 4 not in book.handler.flows
    play(scenario)


def test_udp_open_with_an_impossible_port_is_reported_as_udp_closed():
    async def scenario(book: Playbook) -> None:
        book.feed(HELLO, udp_open(8, "127.0.0.1", 70000), udp_send(8, b"x"))
        await book.until(lambda: book.of(wire.UDP_CLOSED), timeout=1)
        assert book.of(wire.UDP_CLOSED)[0].split_id()[0] == 8
        assert 8 not in book.handler.flows
    play(scenario)


def test_too_many_flows(monkeypatch):
    monkeypatch.setattr(control, "MAX_UDP_FLOWS", 2)

    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        book.feed(HELLO, *(udp_open(i, "127.0.0.1", echo.port) for i in (1, 2, 3)))
        assert [m.split_id() for m in book.of(wire.UDP_CLOSED)] == [(3, b"too many UDP flows")]
        assert sorted(book.handler.flows) == [1, 2]
        echo.transport.close()
    play(scenario)


def test_idle_flows_expire_with_notice(monkeypatch):
    monkeypatch.setattr(control, "UDP_IDLE_SECONDS", 0.2)

    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        book.feed(HELLO, udp_open(6, "127.0.0.1", echo.port), udp_send(6, b"once"))
        await book.until(lambda: book.of(wire.UDP_RECV))
        await book.until(lambda: book.of(wire.UDP_CLOSED), timeout=3)
        assert book.of(wire.UDP_CLOSED)[0].split_id() == (6, b"idle")
        assert book.handler.flows == {}
        echo.transport.close()
    play(scenario)


def test_close_stops_every_flow_and_task():
    async def scenario(book: Playbook) -> None:
        echo = await echo_server()
        book.feed(HELLO, udp_open(1, "127.0.0.1", echo.port), udp_send(1, b"x"))
        await book.until(lambda: book.of(wire.UDP_RECV))
        addr = echo.received[0][1]
        await book.close()
        assert book.handler.flows == {}
        assert all(t.done() for t in book.handler.tasks)
        echo.transport.sendto(b"after channel close", addr)
        await asyncio.sleep(0.2)
        assert len(book.of(wire.UDP_RECV)) == 1
        echo.transport.close()
    play(scenario)


def test_reusing_a_flow_id_closes_the_old_socket():
    async def scenario(book: Playbook) -> None:
        first, second = await echo_server(b"first:"), await echo_server(b"second:")
        book.feed(HELLO, udp_open(1, "127.0.0.1", first.port), udp_send(1, b"a"))
        await book.until(lambda: book.of(wire.UDP_RECV))
        old_addr, old_flow = first.received[0][1], book.handler.flows[1]
        try:
            book.feed(udp_open(1, "127.0.0.1", second.port), udp_send(1, b"b"))
            await book.until(lambda: len(book.of(wire.UDP_RECV)) == 2)
            await book.close()
            first.transport.sendto(b"stale", old_addr)   # to the first flow's socket
            await asyncio.sleep(0.2)
            assert [m.payload[4:] for m in book.of(wire.UDP_RECV)] == [b"first:a", b"second:b"]
        finally:
            old_flow.transport.close()  # what close() should have done: no socket left to the GC
            for server in (first, second):
                server.transport.close()
    play(scenario)


def test_loopback_is_up():
    """The UDP tests need 127.0.0.1 (under `unshare --net`, `ip link set lo up` first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", 9))
