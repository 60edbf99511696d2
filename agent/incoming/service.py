"""Incoming traffic: connections stolen from the target's ports, handed to a client over the link.

A client (the sidecar) subscribes a port on its control channel, then asks for SSH remote
forwarding of ``(INCOMING_HOST, port)``. The agent adds a REDIRECT for that port to its own
listener; each connection arriving there is forwarded back to the subscriber as a
``forwarded-tcpip`` channel, whose other end is the app's port in the app's namespace. This
module knows the subscriber only as a ``Subscriber``: something that opens such a channel.

Several sessions may steal one port if each has an HTTP filter. The newest session's chain is
entered first; what its filter does not match it passes to the next session's agent on the
loopback, with a PROXY protocol (v1) line naming the real client and destination, and the last
one passes it to the target's own process. A session that ends takes its rule away, and the
others pass around it.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import asyncssh

from podtwin.agent.incoming.http.filter import HttpFilter
from podtwin.agent.incoming.http.relay import relay_filtered
from podtwin.agent.incoming.steal.nat import NatState, SessionRules, ip6tables_usable, liveness_name, steal_conflict
from podtwin.agent.incoming.steal.proxyline import PROXY_LINE_MAX, parse_proxy_line, proxy_line
from podtwin.agent.sockopts import no_delay, original_dst
from podtwin.agent.streams import splice
from podtwin.agent.tasks import TaskSet

log = logging.getLogger("podtwin.agent.incoming.service")
STEAL_MODES = ("steal",)
MODES = ("steal", "mirror")
PROXY_TIMEOUT = 3.0
RECLAIM_SECONDS = 10.0    # a client that came back has this long to ask for its parked ports again
HOPS_TTL = 1.0            # seconds a port's next hops are trusted before the nat table is read again
Address = tuple[str, int]


class Subscriber(Protocol):
    """The client a subscribed port's connections go to (the agent's SSH connection to it)."""

    async def open_forwarded(self, port: int, peer: Address) -> tuple[asyncio.StreamReader, Any]:
        """A channel to the client for one connection to ``port`` from ``peer``: (reader, writer).
        Raises ``asyncssh.Error`` or ``OSError`` when the client does not take it."""


@dataclass
class Subscription:
    port: int
    mode: str
    subscriber: Subscriber | None   # None: parked, its client's link broke (the rule stays)
    http_filter: dict | None = None
    active: bool = False
    filter: HttpFilter | None = None
    parks: int = 0   # how many times its client's link broke

    async def open_forwarded(self, peer: Address):
        """A channel to the subscriber for one connection from ``peer``."""
        if self.subscriber is None:
            raise ConnectionError(f"port {self.port}: the session's client is away")
        return await self.subscriber.open_forwarded(self.port, peer)


class PortListener(asyncssh.SSHListener):
    """What the agent returns to a remote-forwarding request: it does not bind the port (the
    target's process has it); it only marks the subscription active until the client cancels."""

    def __init__(self, on_close: Callable[[], None], port: int) -> None:
        super().__init__()
        self._on_close = on_close
        self._port = port
        self._closed = asyncio.Event()

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._on_close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _is_local(address: str) -> bool:
    """Whether ``address`` belongs to this network namespace (it can be bound here)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
            return True
        except OSError:
            return False


def _listen6(port: int) -> socket.socket | None:
    """An IPv6 listener on ``port`` (IPv6 only: IPv4 has its own), or None without IPv6 here."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        no_delay(sock)
        sock.bind(("::", port))
        sock.listen(128)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


@dataclass
class IncomingServer:
    session_id: str
    notify: Callable[[str, str], None] = lambda level, message: None
    subs: dict[int, Subscription] = field(default_factory=dict)
    rules: SessionRules | None = None
    _listener: socket.socket | None = None
    _listener6: socket.socket | None = None
    _liveness: socket.socket | None = None
    tasks: TaskSet = field(default_factory=lambda: TaskSet("incoming"))
    _mirror: Any = None
    _next_hops: dict = field(default_factory=dict)   # port -> (read at, listener ports of later sessions)
    _stolen_ever: set = field(default_factory=set)   # ports this session has redirected
    push: Any = None   # handoff.IncomingPush: whole-port steals' connections as sockets, where it is held

    async def start(self) -> None:
        """Listen (any port, all addresses; IPv6 too where the namespace has it, on the same
        port) and announce liveness in this namespace."""
        self._listener = no_delay(socket.create_server(("0.0.0.0", 0), backlog=128))
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self._listener6 = _listen6(port) if await asyncio.to_thread(ip6tables_usable) else None
        self.rules = SessionRules(self.session_id, port, v6=self._listener6 is not None)
        self._liveness = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._liveness.bind(liveness_name(self.session_id))
        self._liveness.listen(8)
        self._liveness.setblocking(False)
        self.tasks.spawn(self._accept(self._listener), "accept")
        if self._listener6 is not None:
            self.tasks.spawn(self._accept(self._listener6), "accept6")
        self.tasks.spawn(self._hold_liveness(), "liveness")

    async def _hold_liveness(self) -> None:
        """Accept guards' connections and keep them open: they see EOF when the agent dies."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._liveness)
            self.tasks.spawn(self._hold(conn), "liveness-conn")

    @staticmethod
    async def _hold(conn: socket.socket) -> None:
        """Keep one liveness connection until its other end goes (a guard, or a one-off probe)."""
        try:
            while await asyncio.get_running_loop().sock_recv(conn, 64):
                pass
        finally:
            conn.close()

    # -- subscriptions (called from the control channel and the SSH server) ----------------
    async def subscribe(self, subscriber: Subscriber, port: int, mode: str,
                        http_filter: dict | None) -> str | None:
        """Validate a subscription; None if accepted, else the reason it is refused."""
        if mode not in MODES:
            return f"incoming mode {mode!r} is not supported by this agent"
        if not 0 < port < 65536:
            return f"port {port} is out of range"
        current = self.subs.get(port)
        if current is not None and current.subscriber is None:
            if (current.mode, current.http_filter) == (mode, http_filter):
                current.subscriber = subscriber   # the client is back: its rule is still in place
                log.info("port %d: its client is back", port)
                return None
            self._release(port)   # back with other wishes: start afresh
            current = None
        if current is not None and current.subscriber is not subscriber:
            return f"port {port} is already taken by another client of this session"
        sub = Subscription(port, mode, subscriber, http_filter)
        if http_filter:
            if mode != "steal":
                return "an HTTP filter works with mode steal"
            try:
                sub.filter = HttpFilter.from_dict(http_filter)
            except ValueError as exc:
                return f"bad http_filter: {exc}"
        if mode in STEAL_MODES:  # mirroring takes nothing away, so any number of sessions may mirror
            others = await asyncio.to_thread(self.rules.others_on, port)
            conflict = steal_conflict(port, self._filters(sub), others)
            if conflict:
                return conflict
        self.subs[port] = sub
        return None

    def activate(self, subscriber: Subscriber, port: int) -> PortListener | None:
        """The client's remote-forwarding request for a subscribed port: install the rule."""
        sub = self.subs.get(port)
        if sub is None or sub.subscriber is not subscriber:
            return None
        if sub.mode == "mirror":
            sub.active = True
            self.tasks.spawn(self._mirror_ports(), f"mirror:{port}")
            self.notify("info", f"mirroring port {port}")
        elif self.rules.ports.get(port) == self._filters(sub):
            sub.active = True   # taken over from the client's broken link: the rule never went
            self.notify("info", f"port {port}: stealing again")
        else:
            filtered = self._filters(sub)
            self.rules.add(port, filtered)
            self._stolen_ever.add(port)
            self._next_hops.clear()
            sub.active = True
            self.notify("info", f"stealing port {port}" + (" (requests matching the HTTP filter)" if filtered else ""))
        # Deferred: asyncssh closes a broken connection's listeners just before it reports the
        # loss (which parks the port rather than releasing it); a cancelled forwarding releases it.
        return PortListener(lambda: asyncio.get_running_loop().call_soon(self._cancelled, sub, subscriber), port)

    def _cancelled(self, sub: Subscription, subscriber: Subscriber) -> None:
        """A forwarding ended: release its port if that very subscription is still this
        subscriber's (not parked by a broken link, not taken over or replaced meanwhile)."""
        if self.subs.get(sub.port) is sub and sub.subscriber is subscriber:
            self._release(sub.port)

    @staticmethod
    def _filters(sub: Subscription) -> bool:
        return sub.filter is not None and sub.filter.filters_port(sub.port)

    def _release(self, port: int) -> None:
        sub = self.subs.pop(port)
        if sub.mode == "mirror":
            self.tasks.spawn(self._mirror_ports(), f"mirror-release:{port}")
        else:
            self.rules.remove(port)
            self._next_hops.clear()
        if sub.active:
            self.notify("info", f"port {port} released")

    def drop_subscriber(self, subscriber: Subscriber) -> None:
        """It left: release every port it holds."""
        for port, sub in list(self.subs.items()):
            if sub.subscriber is subscriber:
                self._release(port)

    def park_subscriber(self, subscriber: Subscriber) -> None:
        """Its link broke: keep its ports' rules for a client that comes back (``subscribe``
        with the same wishes takes them over). Meanwhile connections to them pass on to the
        target's own process, as if no session were there, and mirroring copies nothing."""
        for port, sub in self.subs.items():
            if sub.subscriber is subscriber:
                sub.subscriber, sub.active = None, False
                sub.parks += 1
                log.info("port %d: its client's link broke; the target answers until it is back", port)

    def client_back(self, settle: float = RECLAIM_SECONDS) -> None:
        """A client of the role that holds ports connected again: what it has not asked for
        again within ``settle`` seconds (its app stopped listening meanwhile, say) is released."""
        parked = [(sub, sub.parks) for sub in self.subs.values() if sub.subscriber is None]
        if parked:
            asyncio.get_running_loop().call_later(settle, self._release_unclaimed, parked)

    def _release_unclaimed(self, parked: list) -> None:
        for sub, parks in parked:
            if self.subs.get(sub.port) is sub and sub.subscriber is None and sub.parks == parks:
                log.info("port %d: not asked for again; released", sub.port)
                self._release(sub.port)

    # -- connections -----------------------------------------------------------------------
    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(listener)
            self.tasks.spawn(self._handle(conn, peer), "conn")

    async def _handle(self, conn: socket.socket, peer) -> None:
        try:
            original = original_dst(conn)
        except OSError:
            original = None
        if original is not None and self.push is not None and original[1] != self.rules.listen_port:
            sub = self.subs.get(original[1])
            if sub is not None and sub.active and not self._filters(sub) and self.push.send(conn, original[1]):
                conn.close()   # the sidecar holds it now
                return
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            await self._route(reader, writer, peer, original)
        except Exception:  # one connection's trouble (iptables-save failing...) must not leak it
            log.exception("incoming connection from %s", peer)
            writer.close()

    async def _route(self, reader, writer, peer, original) -> None:
        if original is None or original[1] == self.rules.listen_port:
            # Dialled directly: only another session's agent passing a request on does that.
            passed = await self._read_proxy_line(reader, peer)
            if passed is None:
                writer.close()
                return
            peer, original = passed
        port = original[1]
        sub = self.subs.get(port)
        if sub is None or not sub.active:  # the rule is on its way out: pass the connection on
            await self._pass_on(reader, writer, peer, original)
            return
        if self._filters(sub):
            await self._filtered(sub, reader, writer, original, peer)
            return
        try:
            r_reader, r_writer = await sub.open_forwarded(peer)
        except (asyncssh.Error, OSError) as exc:
            log.info("port %d: the client did not take the connection: %s", port, exc)
            writer.close()
            return
        await splice(reader, writer, r_reader, r_writer)

    async def _read_proxy_line(self, reader, peer) -> tuple[Address, Address] | None:
        if not peer or not str(peer[0]).startswith("127."):
            return None  # a connection from outside to the listener itself: nobody's business
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), PROXY_TIMEOUT)
            if len(line) > PROXY_LINE_MAX:
                raise ValueError("PROXY line too long")
            client, original = parse_proxy_line(line)
            # Only what a session before us could have taken: a port we redirect(ed), on an
            # address of this namespace. Anything else would make us a relay to anywhere.
            if original[1] not in self._stolen_ever or not _is_local(original[0]):
                raise ValueError(f"{original[0]}:{original[1]} is not a port this session steals")
            return client, original
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError) as exc:
            log.info("direct connection from %s without a PROXY line: %s", peer, exc)
            return None

    async def open_next(self, peer: Address, original: Address):
        """A connection to whoever comes after this session for ``original``: the next filtering
        session's agent (told the real client and destination), else the target's own process.
        Made from here (locally generated), so PREROUTING's REDIRECT does not catch it."""
        port = original[1]
        now = asyncio.get_running_loop().time()
        read_at, hops = self._next_hops.get(port, (None, None))
        if hops is None or now - read_at > HOPS_TTL:
            state = await asyncio.to_thread(NatState.read)
            hops = [r.to_port for r in state.after(self.session_id, port)]
            self._next_hops[port] = (now, hops)
        for to_port in list(hops):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", to_port)
            except OSError:  # that session ended; its rule goes with it (or is swept)
                hops.remove(to_port)
                continue
            w.write(proxy_line(peer, original))
            return r, w
        return await asyncio.open_connection(*original)

    async def _pass_on(self, reader, writer, peer: Address, original: Address) -> None:
        try:
            r_reader, r_writer = await self.open_next(peer, original)
        except OSError as exc:
            log.info("port %d: cannot pass the connection on: %s", original[1], exc)
            writer.close()
            return
        await splice(reader, writer, r_reader, r_writer)

    # -- mirror ------------------------------------------------------------------------------
    async def _mirror_ports(self) -> None:
        """Capture exactly the ports mirrored now (a passive copy: the target is not touched)."""
        from podtwin.agent.incoming.mirror.capture import Mirror

        ports = {p for p, sub in self.subs.items() if sub.mode == "mirror" and sub.active}
        if self._mirror is None:
            if not ports:
                return
            self._mirror = Mirror(self._mirror_flow)
            try:
                await self._mirror.start(ports)
            except PermissionError as exc:
                self._mirror = None
                self.notify("fatal", f"mirroring needs CAP_NET_RAW in the agent: {exc}")
        else:
            self._mirror.update_ports(ports)

    def _mirror_flow(self, flow_id: int, client, server):
        sub = self.subs.get(server[1])
        if sub is None or sub.mode != "mirror" or not sub.active:
            return None
        return _MirrorSink(self, sub, client)

    async def _filtered(self, sub: Subscription, reader, writer, original, peer) -> None:
        """Each HTTP request to the app or to the target's own process, by the filter."""
        async def open_target():
            return await self.open_next(peer, original)

        async def open_local():
            if sub.subscriber is None:   # its client's link broke: the target answers meanwhile
                return await open_target()
            return await sub.open_forwarded(peer)
        await relay_filtered(reader, writer, sub.filter, open_target, open_local)

    def close(self) -> None:
        if self._mirror is not None:
            self._mirror.close()
        self.tasks.cancel_all()
        if self.rules is not None:
            self.rules.remove_all()
        for sock in (self._listener, self._listener6, self._liveness):
            if sock is not None:
                sock.close()


class _MirrorSink:
    """One mirrored connection: its client bytes go to the app over a forwarded channel, opened
    on the first bytes; whatever the app answers is read and thrown away."""

    def __init__(self, server: IncomingServer, sub: Subscription, client) -> None:
        self.server, self.sub, self.client = server, sub, client
        self.writer = None
        self.failed = False

    async def write(self, data: bytes) -> None:
        if self.failed:
            return
        if self.writer is None:
            try:
                reader, self.writer = await self.sub.open_forwarded(self.client)
            except (asyncssh.Error, OSError) as exc:
                log.info("mirror of port %d: the client did not take it: %s", self.sub.port, exc)
                self.failed = True
                return
            self.server.tasks.spawn(_discard(reader), "mirror:discard")
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write_eof()
            except (OSError, asyncssh.Error):
                self.writer.close()


async def _discard(reader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (asyncssh.Error, OSError):
        pass
