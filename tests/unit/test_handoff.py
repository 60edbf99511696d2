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
