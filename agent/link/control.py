"""The agent's side of the control channel: one instance per SSH control channel.

Sans-IO at heart: ``ControlHandler.feed(data)`` decodes frames and dispatches them; replies go
through the ``send`` callable it was built with. The asyncio parts it needs (DNS forwarding, UDP
sockets) are started as named tasks owned by the handler and cancelled when the channel closes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from podtwin.agent.link import wire
from podtwin.agent.dns import Forwarder
from podtwin.agent.outgoing import UDP_IDLE_SECONDS
from podtwin.agent.target.process import TargetProcess

log = logging.getLogger("podtwin.agent.link.control")

MAX_UDP_FLOWS = 1024


class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, handler: "ControlHandler", flow_id: int) -> None:
        self.handler = handler
        self.flow_id = flow_id
        self.transport: asyncio.DatagramTransport | None = None
        self.early: list[bytes] = []  # datagrams sent before the socket was ready
        self.last_used = asyncio.get_running_loop().time()

    def datagram_received(self, data: bytes, addr) -> None:
        self.last_used = asyncio.get_running_loop().time()
        self.handler.send(wire.encode_id(wire.UDP_RECV, self.flow_id, data))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the app would see ECONNREFUSED on a connected
        # socket, but a datagram flow cannot carry that; drop silently like the network would.
        log.debug("udp flow %d: %r", self.flow_id, exc)


class ControlHandler:
    def __init__(self, target: TargetProcess, send: Callable[[bytes], None],
                 on_hello: Callable[[wire.Hello], None], subscribe=None) -> None:
        self.target = target
        self.send = send
        self.on_hello = on_hello
        # async (port, mode, http_filter) -> None or the reason it is refused; None: no incoming
        self.subscribe = subscribe
        self.decoder = wire.FrameDecoder()
        self.greeted = False
        self.dns = Forwarder(lambda: target.read_text("/etc/resolv.conf"))
        self.flows: dict[int, _UdpFlow] = {}
        self.tasks: set[asyncio.Task] = set()
        self._spawn(self._expire_flows(), "udp-expiry")

    # -- plumbing -------------------------------------------------------------------------
    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"control:{name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %r", task.get_name(), task.exception())

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for flow in self.flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self.flows.clear()

    # -- input ----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        for msg in self.decoder.feed(data):
            log.debug("<- %s (%d bytes)", msg.name, len(msg.payload))
            if not self.greeted:
                hello = wire.check_hello(msg, expected=wire.Hello)
                self.greeted = True
                self.send(wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent").encode())
                self.on_hello(hello)
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == wire.INFO_REQUEST:
            self.send(self.target.info().encode())
        elif msg.type == wire.PING:
            self.send(wire.encode(wire.PONG, msg.payload))
        elif msg.type == wire.DNS_QUERY:
            ident, query = msg.split_id()
            self._spawn(self._dns(ident, query), f"dns-{ident}")
        elif msg.type == wire.UDP_OPEN:
            dest = wire.UdpOpen.decode(msg)
            ident = dest.flow
            if len(self.flows) >= MAX_UDP_FLOWS:
                self.send(wire.encode_id(wire.UDP_CLOSED, ident, b"too many UDP flows"))
                return
            self._close_flow(ident, notify=False)  # a reused id replaces the old flow entirely
            # Register now: UDP_SEND for this flow may be in the same read, before the socket exists.
            flow = self.flows[ident] = _UdpFlow(self, ident)
            self._spawn(self._udp_open(flow, dest.host, dest.port), f"udp-open-{ident}")
        elif msg.type == wire.UDP_SEND:
            ident, data = msg.split_id()
            flow = self.flows.get(ident)
            if flow is None:
                return
            flow.last_used = asyncio.get_running_loop().time()
            if flow.transport is not None:
                flow.transport.sendto(data)
            else:
                flow.early.append(data)
        elif msg.type == wire.UDP_CLOSE:
            ident, _ = msg.split_id()
            self._close_flow(ident, notify=False)
        elif msg.type == wire.INCOMING_SUBSCRIBE:
            sub = wire.IncomingSubscribe.decode(msg)
            self._spawn(self._subscribe(sub.port, sub.mode, sub.http_filter), f"subscribe-{sub.port}")
        else:
            raise wire.ProtocolError(f"unexpected message {msg.name}")

    async def _subscribe(self, port: int, mode: str, http_filter: dict | None) -> None:
        if self.subscribe is None:
            error = "this agent was started without incoming traffic (agent --incoming)"
        else:
            error = await self.subscribe(port, mode, http_filter)
        self.send(wire.IncomingReply(port, error).encode())

    # -- DNS and UDP ----------------------------------------------------------------------
    async def _dns(self, ident: int, query: bytes) -> None:
        answer = await self.dns.forward(query)
        self.send(wire.encode_id(wire.DNS_ANSWER, ident, answer))

    async def _udp_open(self, flow: _UdpFlow, host: str, port: int) -> None:
        ident = flow.flow_id
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: flow, remote_addr=(host, port))
        except (OSError, OverflowError, ValueError) as exc:  # refused, unresolvable, bad port
            if self.flows.get(ident) is flow:
                del self.flows[ident]
                self.send(wire.encode_id(wire.UDP_CLOSED, ident, str(exc).encode()))
            return
        if self.flows.get(ident) is not flow:  # closed while we were opening
            transport.close()
            return
        flow.transport = transport
        for data in flow.early:
            transport.sendto(data)
        flow.early.clear()

    def _close_flow(self, ident: int, notify: bool, reason: bytes = b"") -> None:
        flow = self.flows.pop(ident, None)
        if flow is None:
            return
        if flow.transport is not None:
            flow.transport.close()
        if notify:
            self.send(wire.encode_id(wire.UDP_CLOSED, ident, reason))

    async def _expire_flows(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(UDP_IDLE_SECONDS / 4)
            now = loop.time()
            for ident, flow in list(self.flows.items()):
                if now - flow.last_used > UDP_IDLE_SECONDS:
                    self._close_flow(ident, notify=True, reason=b"idle")
