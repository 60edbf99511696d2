"""The control channel's asyncio driver (agent/link/control_session.py) with real sockets.

The protocol's rules are the playbook's (test_control_playbook.py); this proves the I/O half: UDP
flows on real loopback sockets, DNS through the Forwarder, the idle timer, subscriptions and
notices, and that closing the channel leaves no socket or task behind. No SSH: a fake channel
collects what the session writes, a fake connection stands in for the AgentConnection.
"""
from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from podtwin.agent.link import control_session, wire
from podtwin.agent.link.control_session import ControlSession

HELLO = wire.Hello(wire.PROTOCOL_VERSION, "sidecar").encode()


class FakeTarget:
    """What the session uses of a TargetProcess."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def info(self) -> wire.Info:
        return wire.Info(pid=4242, env={"APP_ENV": "staging"}, resolv_conf=self.read_text("/etc/resolv.conf"),
                         hosts="10.0.0.5\tdb\n", hostname="demo-api")

    def read_text(self, path: str, default: str = "") -> str:
        return self.files.get(path, default)


class FakeConnection:
    """What the session uses of its AgentConnection."""

    def __init__(self) -> None:
        self.agent = SimpleNamespace(target=FakeTarget())
        self.control: ControlSession | None = None
        self.hellos: list[wire.Hello] = []
        self.subscribed: list[tuple] = []

    def greeted(self, hello: wire.Hello) -> None:
        self.hellos.append(hello)

    async def subscribe(self, port: int, mode: str, http_filter: dict | None) -> str | None:
        self.subscribed.append((port, mode, http_filter))
        return None if mode == "steal" else f"incoming mode {mode!r} is not supported by this agent"


class FakeChannel:
    """An SSH channel: what is written to it, decoded."""

    def __init__(self) -> None:
        self.sent: list[wire.Message] = []
        self.closed = False
        self._decoder = wire.FrameDecoder()

    def write(self, data: bytes) -> None:
        self.sent += self._decoder.feed(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Channel:
    """A started ControlSession on a FakeChannel: ``feed(*frames)`` in, ``sent`` out."""

    def __init__(self) -> None:
        self.connection = FakeConnection()
        self.chan = FakeChannel()
        self.session = ControlSession(self.connection)
        self.session.connection_made(self.chan)
        self.session.session_started()

    @property
    def sent(self) -> list[wire.Message]:
        return self.chan.sent

    def feed(self, *frames: bytes) -> None:
        self.session.data_received(b"".join(frames), None)

    def of(self, msg_type: int) -> list[wire.Message]:
        return [m for m in self.sent if m.type == msg_type]

    async def until(self, predicate, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out; sent so far: {[m.name for m in self.sent]}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.session.connection_lost(None)
        await self.session.tasks.wait_all()


def play(scenario) -> None:
    """Run ``scenario(channel)`` in a fresh loop; the channel is always closed afterwards, and
    leaves no socket and no task."""
    async def main() -> None:
        channel = Channel()
        try:
            await scenario(channel)
        finally:
            await channel.close()
        assert channel.session.udp.flows == {} and len(channel.session.tasks) == 0
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
    return wire.UdpOpen(flow, host, port).encode()


def udp_send(flow: int, data: bytes) -> bytes:
    return wire.encode_id(wire.UDP_SEND, flow, data)


def test_hello_info_subscribe_and_notice():
    async def scenario(ch: Channel) -> None:
        ch.feed(HELLO, wire.encode(wire.INFO_REQUEST), wire.encode(wire.PING, b"p"))
        assert [m.name for m in ch.sent] == ["HELLO_OK", "INFO", "PONG"]   # INFO keeps its place
        assert ch.connection.hellos == [wire.Hello(wire.PROTOCOL_VERSION, "sidecar")]
        assert wire.Info.decode(ch.sent[1]) == ch.connection.agent.target.info()
        ch.feed(wire.IncomingSubscribe(80, "steal", None).encode(), wire.IncomingSubscribe(81, "copy", None).encode())
        await ch.until(lambda: len(ch.of(wire.INCOMING_REPLY)) == 2)
        assert sorted((r.port, r.error) for r in map(wire.IncomingReply.decode, ch.of(wire.INCOMING_REPLY))) == [
            (80, None), (81, "incoming mode 'copy' is not supported by this agent")]
        assert ch.connection.control is ch.session
        ch.session.notify("info", "stealing port 80")
        assert wire.Notice.decode(ch.sent[-1]) == wire.Notice("info", "stealing port 80")
    play(scenario)


def test_a_protocol_error_sends_error_and_closes_the_channel():
    async def scenario(ch: Channel) -> None:
        ch.feed(HELLO, wire.encode(0x42))
        assert [m.name for m in ch.sent] == ["HELLO_OK", "ERROR"]
        assert wire.Error.decode(ch.sent[1]).message == "unexpected message 0x42"
        assert ch.chan.closed
    play(scenario)


def test_dns_query_with_no_nameserver_answering_gets_an_empty_answer_with_its_id():
    """The target's resolv.conf points at a loopback address nothing listens on: refused at once."""
    async def scenario(ch: Channel) -> None:
        ch.connection.agent.target.files["/etc/resolv.conf"] = "nameserver 127.0.0.10\noptions timeout:1 attempts:1\n"
        query = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01"
        ch.feed(HELLO, wire.encode_id(wire.DNS_QUERY, 77, query))
        await ch.until(lambda: ch.of(wire.DNS_ANSWER))
        assert ch.of(wire.DNS_ANSWER)[0].split_id() == (77, b"")
    play(scenario)


def test_udp_open_and_send_in_one_feed_get_the_reply():
    async def scenario(ch: Channel) -> None:
        echo = await echo_server()
        # the socket does not exist yet when UDP_SEND is handled: the datagrams wait, in order
        ch.feed(HELLO, udp_open(5, "127.0.0.1", echo.port), udp_send(5, b"one"), udp_send(5, b"two"))
        await ch.until(lambda: len(ch.of(wire.UDP_RECV)) == 2)
        assert [m.split_id() for m in ch.of(wire.UDP_RECV)] == [(5, b"echo:one"), (5, b"echo:two")]
        assert [data for data, _ in echo.received] == [b"one", b"two"]
        assert len({addr for _, addr in echo.received}) == 1  # one socket per flow
        ch.feed(udp_send(5, b"three"))                       # now the socket is open
        await ch.until(lambda: len(ch.of(wire.UDP_RECV)) == 3)
        assert ch.of(wire.UDP_RECV)[2].split_id() == (5, b"echo:three")
        assert not ch.of(wire.UDP_CLOSED)
        echo.transport.close()
    play(scenario)


def test_two_flows_are_kept_apart():
    async def scenario(ch: Channel) -> None:
        a, b = await echo_server(b"A:"), await echo_server(b"B:")
        ch.feed(HELLO, udp_open(1, "127.0.0.1", a.port), udp_open(2, "127.0.0.1", b.port),
                udp_send(2, b"to-b"), udp_send(1, b"to-a"))
        await ch.until(lambda: len(ch.of(wire.UDP_RECV)) == 2)
        assert sorted(m.split_id() for m in ch.of(wire.UDP_RECV)) == [(1, b"A:to-a"), (2, b"B:to-b")]
        for server in (a, b):
            server.transport.close()
    play(scenario)


def test_udp_close_stops_delivery_and_sending():
    async def scenario(ch: Channel) -> None:
        echo = await echo_server()
        ch.feed(HELLO, udp_open(9, "127.0.0.1", echo.port), udp_send(9, b"hi"))
        await ch.until(lambda: ch.of(wire.UDP_RECV))
        flow_addr = echo.received[0][1]
        ch.feed(wire.encode_id(wire.UDP_CLOSE, 9))
        assert ch.session.udp.flows == {}
        # the server still answers the flow's old address, and the client sends on the closed flow
        echo.transport.sendto(b"late reply", flow_addr)
        ch.feed(udp_send(9, b"after close"))
        await asyncio.sleep(0.2)
        assert [m.split_id() for m in ch.of(wire.UDP_RECV)] == [(9, b"echo:hi")]
        assert [data for data, _ in echo.received] == [b"hi"]
        assert not ch.of(wire.UDP_CLOSED)   # the client closed it: no notice back
        echo.transport.close()
    play(scenario)


def test_udp_close_before_the_socket_is_open():
    async def scenario(ch: Channel) -> None:
        echo = await echo_server()
        ch.feed(HELLO, udp_open(3, "127.0.0.1", echo.port), udp_send(3, b"early"),
                wire.encode_id(wire.UDP_CLOSE, 3))
        await asyncio.sleep(0.2)
        assert echo.received == [] and [m.name for m in ch.sent] == ["HELLO_OK"]
        assert ch.session.udp.flows == {} and ch.session.core.flows == {}
        echo.transport.close()
    play(scenario)


def test_udp_open_that_fails_is_reported_as_udp_closed():
    async def scenario(ch: Channel) -> None:
        # connect() to the broadcast address fails (no route, or no SO_BROADCAST); nothing is sent
        ch.feed(HELLO, udp_open(4, "255.255.255.255", 9), udp_send(4, b"x"))
        await ch.until(lambda: ch.of(wire.UDP_CLOSED))
        ident, reason = ch.of(wire.UDP_CLOSED)[0].split_id()
        assert ident == 4 and reason
        assert 4 not in ch.session.udp.flows and 4 not in ch.session.core.flows
    play(scenario)


def test_idle_flows_expire_with_notice(monkeypatch):
    monkeypatch.setattr(control_session, "UDP_IDLE_SECONDS", 0.2)

    async def scenario(ch: Channel) -> None:
        echo = await echo_server()
        ch.feed(HELLO, udp_open(6, "127.0.0.1", echo.port), udp_send(6, b"once"))
        await ch.until(lambda: ch.of(wire.UDP_RECV))
        await ch.until(lambda: ch.of(wire.UDP_CLOSED), timeout=3)
        assert ch.of(wire.UDP_CLOSED)[0].split_id() == (6, b"idle")
        assert ch.session.udp.flows == {}
        echo.transport.close()
    play(scenario)


def test_close_stops_every_flow_and_task():
    async def scenario(ch: Channel) -> None:
        echo = await echo_server()
        ch.feed(HELLO, udp_open(1, "127.0.0.1", echo.port), udp_send(1, b"x"))
        await ch.until(lambda: ch.of(wire.UDP_RECV))
        addr = echo.received[0][1]
        await ch.close()
        assert ch.session.udp.flows == {} and len(ch.session.tasks) == 0
        echo.transport.sendto(b"after channel close", addr)
        await asyncio.sleep(0.2)
        assert len(ch.of(wire.UDP_RECV)) == 1
        echo.transport.close()
    play(scenario)


def test_reusing_a_flow_id_closes_the_old_socket():
    async def scenario(ch: Channel) -> None:
        first, second = await echo_server(b"first:"), await echo_server(b"second:")
        ch.feed(HELLO, udp_open(1, "127.0.0.1", first.port), udp_send(1, b"a"))
        await ch.until(lambda: ch.of(wire.UDP_RECV))
        old_addr, old_flow = first.received[0][1], ch.session.udp.flows[1]
        try:
            ch.feed(udp_open(1, "127.0.0.1", second.port), udp_send(1, b"b"))
            assert old_flow.transport.is_closing()
            await ch.until(lambda: len(ch.of(wire.UDP_RECV)) == 2)
            first.transport.sendto(b"stale", old_addr)   # to the first flow's socket
            await asyncio.sleep(0.2)
            assert [m.payload[4:] for m in ch.of(wire.UDP_RECV)] == [b"first:a", b"second:b"]
        finally:
            old_flow.transport.close()  # idempotent; no socket left to the GC if the test failed
            for server in (first, second):
                server.transport.close()
    play(scenario)


def test_loopback_is_up():
    """The UDP tests need 127.0.0.1 (under `unshare --net`, `ip link set lo up` first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", 9))


@pytest.mark.parametrize("level", ["info", "fatal"])
def test_the_agent_notifies_the_runner_through_its_control_session(level):
    from podtwin.agent.link.server import Agent

    async def scenario(ch: Channel) -> None:
        ch.feed(HELLO)
        agent = Agent(target=ch.connection.agent.target, authorized_keys=None, host_key=None)
        agent.notify(level, "before any runner")                  # nobody to tell: dropped
        agent.runner = ch.connection
        agent.notify(level, "port 80 is already stolen")
        assert [wire.Notice.decode(m) for m in ch.of(wire.NOTICE)] == [wire.Notice(level, "port 80 is already stolen")]
    play(scenario)
