"""The incoming service's seams (agent/incoming/service.py): it knows a subscriber only as a
``Subscriber`` (``open_forwarded``) and talks to the user only through ``notify``.

No SSH and no iptables: the subscriber is a fake whose forwarded channel is a loopback stream to
a stand-in app, and running iptables fails the test."""
from __future__ import annotations

import asyncio

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

