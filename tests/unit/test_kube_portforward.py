"""The port-forward stream's framing (v4.channel.k8s.io), against a local WebSocket server that
frames as the kubelet does: the port number first on each channel (here split over frames),
data on channel 0, errors on channel 1. The real API server is in integration/kube."""
from __future__ import annotations

import asyncio
import struct

import pytest
from aiohttp import WSMsgType, web

from podtwin.runner.adapters.kube_portforward import PortForwardStream, WebSocketSettings
from podtwin.runner.errors import Forbidden


async def _server(handler):
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/portforward", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, WebSocketSettings(host=f"http://127.0.0.1:{port}", ssl=False, headers={"Authorization": "Bearer t"})


def test_bytes_cross_both_ways_and_the_port_prefix_is_not_data():
    seen = {}

    async def kubelet(request):
        seen["auth"] = request.headers.get("Authorization")
        seen["ports"] = request.query.get("ports")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        port = struct.pack("<H", 44128)
        await ws.send_bytes(b"\x00" + port[:1])      # the data channel's port number, in two frames
        await ws.send_bytes(b"\x00" + port[1:] + b"hello ")
        await ws.send_bytes(b"\x01" + port)           # the error channel's, then nothing
        async for msg in ws:
            assert msg.type == WSMsgType.BINARY and msg.data[0] == 0
            await ws.send_bytes(b"\x00" + msg.data[1:].upper())
        return ws

    async def go():
        runner, settings = await _server(kubelet)
        local, remote = await _pipe()
        stream = PortForwardStream(settings, "ns", "agent-pod", 44128)
        await stream.open()
        task = asyncio.ensure_future(stream.splice(*remote))
        reader, writer = local
        writer.write(b"world")
        got = await asyncio.wait_for(reader.readexactly(11), 5)
        writer.close()
        await asyncio.wait_for(task, 5)
        await runner.cleanup()
        return got, stream.failure()

    got, failure = asyncio.run(go())
    assert got == b"hello WORLD" and failure is None
    assert seen == {"auth": "Bearer t", "ports": "44128"}


def test_the_error_channel_is_the_failure_and_a_refusal_is_forbidden():
    async def kubelet(request):
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        await ws.send_bytes(b"\x00\x60\xac")
        await ws.send_bytes(b"\x01\x60\xacconnection refused")
        await ws.close()
        return ws

    async def refuse(request):
        raise web.HTTPForbidden()

    async def go():
        runner, settings = await _server(kubelet)
        local, remote = await _pipe()
        stream = PortForwardStream(settings, "ns", "agent-pod", 44128)
        await stream.open()
        await asyncio.wait_for(stream.splice(*remote), 5)
        eof = await asyncio.wait_for(local[0].read(), 5)
        local[1].close()
        await runner.cleanup()
        runner, settings = await _server(refuse)
        with pytest.raises(Forbidden, match="not allowed to port-forward to pod agent-pod in ns"):
            await PortForwardStream(settings, "ns", "agent-pod", 44128).open()
        await runner.cleanup()
        return eof, stream.failure()

    eof, failure = asyncio.run(go())
    assert eof == b"" and failure == "connection refused"


async def _pipe():
    """Two connected stream pairs: (the session socket's client, the relay's end of it)."""
    import socket
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)
