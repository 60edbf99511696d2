"""The incoming service's seams (agent/incoming/service.py): it knows a subscriber only as a
``Subscriber`` (``open_forwarded``) and talks to the user only through ``notify``.

No SSH and no iptables: the subscriber is a fake whose forwarded channel is a loopback stream to
a stand-in app, and running iptables fails the test."""
from __future__ import annotations

import asyncio

import socket
from types import SimpleNamespace

import pytest

from podtwin.agent.incoming.service import IncomingServer, Subscription
from podtwin.agent.incoming.steal import nat


@pytest.fixture(autouse=True)
def no_iptables(monkeypatch):
    def explode(*args, **kwargs):
        raise AssertionError(f"iptables was run: {args}")
    monkeypatch.setattr(nat, "iptables", explode)


class FakeSubscriber:
    """A client that takes every forwarded connection to ``app`` (host, port) on loopback."""

    def __init__(self, app: tuple[str, int] | None = None) -> None:
        self.app = app
        self.opened: list[tuple[int, tuple[str, int]]] = []

    async def open_forwarded(self, port: int, peer: tuple[str, int]):
        self.opened.append((port, peer))
        return await asyncio.open_connection(*self.app)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_stolen_connection_goes_to_its_subscriber_named_after_the_real_client():
    async def scenario() -> None:
        async def app(reader, writer):
            writer.write(b"app:" + await reader.read(100))
            writer.close()
        app_server = await asyncio.start_server(app, "127.0.0.1", 0)
        subscriber = FakeSubscriber(app_server.sockets[0].getsockname())
        server = IncomingServer("abcd")
        server.rules = nat.SessionRules("abcd", listen_port=1)
        server.subs[80] = Subscription(80, "steal", subscriber, active=True)

        routed: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_stolen(reader, writer):   # stands in for the agent's own listener
            routed.set_result(None)
            await server._route(reader, writer, ("10.1.2.3", 5555), ("10.1.2.9", 80))
        listener = await asyncio.start_server(on_stolen, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname())
        writer.write(b"hello")
        writer.write_eof()
        assert await reader.read() == b"app:hello"
        await routed
        assert subscriber.opened == [(80, ("10.1.2.3", 5555))]
        writer.close()
        for s in (listener, app_server):
            s.close()
    run(scenario())


def test_a_port_belongs_to_one_subscriber_until_its_connection_goes():
    async def scenario() -> None:
        notices: list[tuple[str, str]] = []
        server = IncomingServer("abcd", notify=lambda level, message: notices.append((level, message)))
        first, second = FakeSubscriber(), FakeSubscriber()
        assert await server.subscribe(first, 80, "mirror", None) is None
        assert await server.subscribe(second, 80, "mirror", None) == \
            "port 80 is already taken by another client of this session"
        assert server.activate(second, 80) is None       # not its subscription: no listener
        server.subs[80].active = True                     # as if activated (without a capture)
        server.drop_subscriber(first)
        await server.tasks.wait_all()
        assert server.subs == {} and notices == [("info", "port 80 released")]
        assert await server.subscribe(second, 80, "mirror", None) is None
        assert server.subs[80].subscriber is second
        server.close()
    run(scenario())


def test_subscriptions_are_checked_before_anything_is_touched():
    async def scenario() -> None:
        server = IncomingServer("abcd")
        sub = FakeSubscriber()
        assert await server.subscribe(sub, 80, "copy", None) == "incoming mode 'copy' is not supported by this agent"
        assert await server.subscribe(sub, 0, "steal", None) == "port 0 is out of range"
        assert await server.subscribe(sub, 80, "mirror", {"header_filter": "x: y"}) == \
            "an HTTP filter works with mode steal"
        assert server.subs == {}
    run(scenario())



def test_a_handed_over_connection_waiting_on_both_sides_survives_a_garbage_collection():
    """The sidecar's task for a stolen connection handed over as a socket is held: the loop holds
    tasks only weakly, and a connection whose two sides both wait (the client for its answer, the
    app still working on it) is otherwise a cycle the collector frees mid-request (the client then
    sees EOF: it happened under load in `make bench`)."""
    import gc
    import json as _json

    from podtwin.runner.sidecar.incoming.ports import IncomingPorts
    from podtwin.runner.sidecar.settings import IncomingSettings

    async def go():
        release = asyncio.Event()

        async def slow_app(reader, writer):
            await reader.readline()
            await release.wait()
            writer.write(b"answer\n")
            await writer.drain()
            writer.close()
        app = await asyncio.start_server(slow_app, "127.0.0.1", 0)
        local = app.sockets[0].getsockname()[1]
        ports = IncomingPorts(links=None, settings=IncomingSettings(port_mapping={local: 80}), own_ports=set())
        ports.listeners[local] = SimpleNamespace(close=lambda: None)   # the app's port is taken
        agent_end, sidecar_end = socket.socketpair()    # the push channel
        receiving = asyncio.ensure_future(ports._receive(sidecar_end))
        stolen = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(stolen.getsockname())
        conn, _ = stolen.accept()
        socket.send_fds(agent_end, [_json.dumps({"port": 80}).encode() + b"\n"], [conn.fileno()])
        conn.close()
        reader, writer = await asyncio.open_connection(sock=client)
        writer.write(b"question\n")
        await asyncio.sleep(0.3)                        # delivered; both sides wait now
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.05)
        release.set()
        answer = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        ports.close()
        receiving.cancel()
        agent_end.close()
        stolen.close()
        app.close()
        return answer

    assert asyncio.run(go()) == b"answer\n"
