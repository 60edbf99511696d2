"""The agent's side of the control channel, as a protocol core: one instance per channel.

Sans-IO: ``feed(data)`` takes the channel's bytes and ``handle(event)`` everything else it must
know (``control_events``); both return the commands that follow, in order. It keeps the
handshake, the UDP flows' state (which are open, which datagrams wait for their socket, when each
was last used) and the rules of the protocol; it opens no socket, starts no task and reads no
clock. ``control_session.ControlSession`` drives it with asyncio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from podtwin.agent.link import wire
from podtwin.agent.link.control_events import (
    ChannelClosed, CloseUdp, Command, DnsAnswered, EndSession, Event, Fatal, ForwardDns, Greeted, NoticeFromAgent,
    OpenUdp, ReadTargetInfo, Reply, SendUdp, Subscribe, SubscribeDone, TargetInfoRead, Tick, UdpOpened,
    UdpOpenFailed, UdpReceived)

log = logging.getLogger("podtwin.agent.link.control")

MAX_UDP_FLOWS = 1024
AGENT_NAME = "podtwin-agent"


@dataclass
class _Flow:
    # The time of the last Tick before it carried a datagram: flows expire only at a Tick, so
    # the time between two Ticks needs no finer clock.
    last_used: float
    opened: bool = False
    early: list[bytes] = field(default_factory=list)  # sent before its socket was open


class ControlHandler:
    def __init__(self, now: float, udp_idle: float, max_udp_flows: int = MAX_UDP_FLOWS) -> None:
        """``now``: the driver's clock, as later ``Tick`` events give it; ``udp_idle``: seconds
        after which a flow that carried nothing is forgotten."""
        self.now = now
        self.udp_idle = udp_idle
        self.max_udp_flows = max_udp_flows
        self.decoder = wire.FrameDecoder()
        self.greeted = False
        self.failed = False      # the client broke the protocol: no more input is taken
        self.closed = False
        self.flows: dict[int, _Flow] = {}

    # -- the channel's bytes ------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Command]:
        if self.failed or self.closed:
            return []
        out: list[Command] = []
        try:
            for msg in self.decoder.feed(data):
                log.debug("<- %s (%d bytes)", msg.name, len(msg.payload))
                out += self._message(msg)
        except wire.ProtocolError as exc:
            self.failed = True
            out += [Reply(wire.Error(str(exc)).encode()), Fatal(str(exc))]
        return out

    def _message(self, msg: wire.Message) -> list[Command]:
        if not self.greeted:
            hello = wire.check_hello(msg, expected=wire.Hello)
            self.greeted = True
            return [Reply(wire.HelloOk(wire.PROTOCOL_VERSION, AGENT_NAME).encode()), Greeted(hello)]
        if msg.type == wire.INFO_REQUEST:
            return [ReadTargetInfo()]
        if msg.type == wire.PING:
            return [Reply(wire.encode(wire.PONG, msg.payload))]
        if msg.type == wire.END:
            return [EndSession()]
        if msg.type == wire.DNS_QUERY:
            return [ForwardDns(*msg.split_id())]
        if msg.type == wire.UDP_OPEN:
            return self._udp_open(wire.UdpOpen.decode(msg))
        if msg.type == wire.UDP_SEND:
            return self._udp_send(*msg.split_id())
        if msg.type == wire.UDP_CLOSE:
            return self._close_flow(msg.split_id()[0])
        if msg.type == wire.INCOMING_SUBSCRIBE:
            sub = wire.IncomingSubscribe.decode(msg)
            return [Subscribe(sub.port, sub.mode, sub.http_filter)]
        raise wire.ProtocolError(f"unexpected message {msg.name}")

    def _udp_open(self, dest: wire.UdpOpen) -> list[Command]:
        if len(self.flows) >= self.max_udp_flows:
            return [_udp_closed(dest.flow, "too many UDP flows")]
        out = self._close_flow(dest.flow)  # a reused id replaces the old flow entirely
        if not 0 <= dest.port <= 0xFFFF:
            return out + [_udp_closed(dest.flow, f"port {dest.port} is out of range")]
        # Known from now on: UDP_SEND for this flow may come in the same read, before its socket.
        self.flows[dest.flow] = _Flow(self.now)
        return out + [OpenUdp(dest.flow, dest.host, dest.port)]

    def _udp_send(self, ident: int, data: bytes) -> list[Command]:
        flow = self.flows.get(ident)
        if flow is None:  # closed, expired or never opened: dropped, as the network would
            return []
        flow.last_used = self.now
        if not flow.opened:
            flow.early.append(data)
            return []
        return [SendUdp(ident, data)]

    def _close_flow(self, ident: int) -> list[Command]:
        return [CloseUdp(ident)] if self.flows.pop(ident, None) is not None else []

    # -- everything else ----------------------------------------------------------------------
    def handle(self, event: Event) -> list[Command]:
        if isinstance(event, ChannelClosed):
            # The client is gone (one that broke the protocol too): every socket goes.
            self.closed = True
            out: list[Command] = [CloseUdp(ident) for ident in self.flows]
            self.flows.clear()
            return out
        if self.closed or self.failed:
            return []
        match event:
            case Tick(now):
                self.now = now
                return self._expire()
            case TargetInfoRead(info):
                return [Reply(info.encode())]
            case DnsAnswered(ident, answer):
                return [Reply(wire.encode_id(wire.DNS_ANSWER, ident, answer))]
            case UdpOpened(ident):
                flow = self.flows.get(ident)
                if flow is None or flow.opened:
                    return []
                flow.opened = True
                early, flow.early = flow.early, []
                return [SendUdp(ident, data) for data in early]
            case UdpOpenFailed(ident, reason):
                if ident not in self.flows:
                    return []
                del self.flows[ident]
                return [_udp_closed(ident, reason)]
            case UdpReceived(ident, data):
                flow = self.flows.get(ident)
                if flow is None:
                    return []
                flow.last_used = self.now
                return [Reply(wire.encode_id(wire.UDP_RECV, ident, data))]
            case SubscribeDone(port, error):
                return [Reply(wire.IncomingReply(port, error).encode())]
            case NoticeFromAgent(level, message):
                return [Reply(wire.Notice(level, message).encode())]
        raise TypeError(f"not a control event: {event!r}")

    def _expire(self) -> list[Command]:
        """UDP has no end of its own: a flow that carried nothing for ``udp_idle`` is forgotten
        (the client's end forgets it after as long), and the client is told."""
        out: list[Command] = []
        for ident, flow in list(self.flows.items()):
            if self.now - flow.last_used > self.udp_idle:
                out += self._close_flow(ident) + [_udp_closed(ident, "idle")]
        return out


def _udp_closed(ident: int, reason: str) -> Reply:
    return Reply(wire.encode_id(wire.UDP_CLOSED, ident, reason.encode()))
