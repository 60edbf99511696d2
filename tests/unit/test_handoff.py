"""The socket handoff (agent/link/handoff.py) over real sockets: a unix socket carrying a TCP
connection's descriptor (SCM_RIGHTS), a TCP server on loopback as the destination."""
from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from podtwin.agent.link.handoff import HandoffClient, HandoffServer, decode_request, encode_request


def test_request_lines_round_trip_and_refuse_names():
    assert decode_request(encode_request("10.1.2.3", 80)) == ("10.1.2.3", 80)
    assert decode_request(encode_request("::1", 443)) == ("::1", 443)
    for bad in (encode_request("backend", 80), encode_request("10.0.0.1", 0), b'{"host": "10.0.0.1"}', b"{"):
        with pytest.raises((ValueError, KeyError)):
            decode_request(bad)


async def _session(tmp_path, fn):
    path = str(tmp_path / "handoff.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)
    server = HandoffServer(listener)
    server.start()
    try:
        return await fn(HandoffClient(path))
    finally:
        server.close()
        listener.close()


def test_the_client_gets_a_connected_socket_and_bytes_flow_both_ways(tmp_path):
    async def go(client: HandoffClient):
        async def echo(reader, writer):
            writer.write(b"hello " + await reader.readline())
            await writer.drain()
            writer.close()
        dest = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = dest.sockets[0].getsockname()[1]
        sock = await client.connect("127.0.0.1", port)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert writer.get_extra_info("peername")[1] == port   # connected by the server, handed over
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1   # small writes leave at once
        writer.write(b"from the app\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        dest.close()
        return answer
    assert asyncio.run(_session(tmp_path, go)) == b"hello from the app\n"


def test_a_refused_connection_comes_back_as_the_same_error(tmp_path):
    async def go(client: HandoffClient):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()   # nothing listens there now
        with pytest.raises(OSError) as err:
            await client.connect("127.0.0.1", port)
        return err.value.errno
    assert asyncio.run(_session(tmp_path, go)) == errno.ECONNREFUSED


def test_dns_through_a_handed_udp_socket_keeps_the_apps_id_and_falls_back_when_truncated(tmp_path):
    """The sidecar's resolver on a UDP socket the agent handed over: the query reaches the
    nameserver with the resolver's own id, the answer comes back with the app's; a truncated
    answer is asked again through the fallback (the agent, which retries over TCP)."""
    from podtwin.agent.dns import ResolvConf
    from podtwin.runner.sidecar.dns.handed import HandedResolver

    async def go(client: HandoffClient):
        loop = asyncio.get_running_loop()
        seen = []

        class Nameserver(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                seen.append(data[:2])
                flags = b"\x83\x80" if data[12:].startswith(b"\x03big") else b"\x81\x80"   # TC for "big"
                self.transport.sendto(data[:2] + flags + data[4:], addr)

        ns, _ = await loop.create_datagram_endpoint(Nameserver, local_addr=("127.0.0.1", 0))
        port = ns.get_extra_info("sockname")[1]
        fallbacks = []

        async def fallback(query):
            fallbacks.append(query)
            return b"via-agent"
        resolver = HandedResolver(await client.udp(), ResolvConf(nameservers=("127.0.0.1",)), fallback)
        await resolver.start()
        resolver.transport = _PortShift(resolver.transport, port)   # the test's nameserver is not on 53
        q = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05small\x00\x00\x01\x00\x01"
        answer = await resolver.query(q)
        big = b"\x12\x34" + q[2:12] + b"\x03big\x00\x00\x01\x00\x01"
        via = await resolver.query(big)
        resolver.close()
        ns.close()
        return answer, seen, via, fallbacks, q
    answer, seen, via, fallbacks, q = asyncio.run(_session(tmp_path, go))
    assert answer[:2] == b"\xab\xcd" and answer[2:4] == b"\x81\x80" and answer[4:] == q[4:]
    assert seen[0] != b"\xab\xcd"          # the resolver's own id went out
    assert via == b"via-agent" and fallbacks[0][:2] == b"\x12\x34"


class _PortShift:
    """A datagram transport that sends what goes to port 53 to the test nameserver's port."""

    def __init__(self, transport, port):
        self.transport, self.port = transport, port

    def sendto(self, data, addr):
        self.transport.sendto(data, (addr[0], self.port))

    def close(self):
        self.transport.close()


def test_stolen_connections_are_pushed_as_sockets_while_the_channel_is_held(tmp_path):
    """A whole-port steal on a Docker target: the agent sends each stolen connection to the
    sidecar's held channel with its target port; without a held channel it sends nothing (the
    caller forwards it over the link instead)."""
    from podtwin.agent.link.handoff import IncomingPush, readable

    async def go():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "push.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        listener.setblocking(False)
        push = IncomingPush()
        a, b = socket.socketpair()
        assert push.send(a, 80) is False              # nobody holds the channel
        server = HandoffServer(listener, push)
        server.start()
        channel = await HandoffClient(path).incoming()
        for _ in range(100):                          # until the agent holds it
            if push.channel is not None:
                break
            await asyncio.sleep(0.01)
        assert push.send(a, 8080) is True
        await readable(loop, channel)
        msg, fds, _, _ = socket.recv_fds(channel, 4096, 4)
        got = socket.socket(fileno=fds[0])
        b.sendall(b"through the pushed socket")
        data = got.recv(100)
        for s in (a, b, got, channel):
            s.close()
        server.close()
        listener.close()
        return msg, data
    msg, data = asyncio.run(go())
    assert msg == b'{"port": 8080}\n' and data == b"through the pushed socket"
