"""TCP stream reassembly for mirror mode: raw IP packets in, per-connection client->server bytes out.

Sans-IO: ``Reassembler`` is fed packets (``feed_packet``), the passing of time (``tick``) and the
driver's decisions (``end``, ``set_ports``, ``close``) and returns events: ``FlowStarted``,
``FlowData``, ``FlowEnded``. It never touches a socket or a clock; ``agent/incoming/mirror/capture.py`` does.

What it sees: only the client->server half of each connection (the capture filter passes packets
*to* the mirrored ports), as L3 packets: the capture socket is ``AF_PACKET``/``SOCK_DGRAM``, which
hands over every interface's packets from the IP header on (``lo``, veth, tun alike), so there is
no link header to guess. ``parse_ethernet`` exists for captures that do carry Ethernet II headers.

Rules, and why:

* A flow is keyed by (client ip, client port, server ip, server port). A SYN (without ACK) starts it;
  data begins at ISN+1 (data carried on the SYN, TCP Fast Open, is delivered too).
* Mid-stream pickup: a data segment of a connection whose SYN we never saw (it was established
  before the capture started) starts a flow at that segment, flagged ``midstream=True``. Bytes sent
  before it are lost; if the first segment seen was itself out of order, so are those before it.
* Sequence numbers are unwrapped into 64-bit stream offsets relative to the next expected byte, so
  the 2**32 wraparound needs no special case. Old bytes (retransmits, duplicates, the
  already-delivered head of an overlapping segment) are dropped; where overlapping copies disagree,
  the first one delivered wins.
* Out-of-order segments wait in a per-flow buffer of at most ``max_buffered`` bytes (and
  ``max_total_buffered`` for all flows together); overflowing it ends the flow (``overflow``).
  A hole that nothing fills within ``gap_timeout`` (the capture socket dropped the packet, so no
  retransmit will ever show it to us) ends the flow (``gap``).
* FIN ends the flow once every byte before it was delivered (``fin``); RST ends it at once (``rst``);
  ``idle_timeout`` without packets ends it (``idle``). Keys of flows that ended by FIN/RST/driver
  are remembered for ``tombstone_ttl`` so that late retransmits are not picked up as a new flow.
* Checksums are not verified: with checksum offload (and always on ``lo``) captured packets carry
  unfinished checksums. IP fragments and IPv6 extension headers are not reassembled (ignored).
"""
from __future__ import annotations

import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Union

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# FlowEnded reasons produced here (the driver adds its own, e.g. "slow sink").
END_FIN = "fin"
END_RST = "rst"
END_IDLE = "idle"
END_GAP = "gap"
END_OVERFLOW = "overflow"
END_TRUNCATED = "truncated"
END_REUSED = "reused"          # a new SYN with another ISN arrived for the same 4-tuple
END_PORT_REMOVED = "port removed"
END_CLOSED = "closed"

_U32 = 1 << 32
_HALF = 1 << 31
_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q, _ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8


# -- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowStarted:
    flow_id: int
    client: tuple[str, int]
    server: tuple[str, int]
    midstream: bool = False


@dataclass(frozen=True)
class FlowData:
    flow_id: int
    data: bytes


@dataclass(frozen=True)
class FlowEnded:
    flow_id: int
    reason: str


Event = Union[FlowStarted, FlowData, FlowEnded]


# -- parsing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One TCP segment, client->server. Addresses are packed (4 or 16 bytes)."""
    src: bytes
    sport: int
    dst: bytes
    dport: int
    seq: int
    flags: int
    payload: bytes = b""
    missing: int = 0  # payload bytes the capture cut off (packet longer than the capture buffer)


def parse_ip(packet, wire_len: int | None = None) -> Segment | None:
    """Parse an IPv4 or IPv6 packet carrying TCP; None for anything else or malformed.

    ``packet`` is bytes-like; ``wire_len`` is the packet's real length when the capture truncated it
    (``len(packet)`` otherwise). An IP length field of 0 (BIG TCP / GRO super-packets) means "the
    whole packet". Trailing link-layer padding is cut off by the IP length.
    """
    have = len(packet)
    if wire_len is None:
        wire_len = have
    if have < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        total, frag = struct.unpack_from(">H2xH", packet, 2)
        if ihl < 20 or packet[9] != 6 or frag & 0x3FFF:  # not TCP, or a fragment (MF or offset)
            return None
        src, dst = bytes(packet[12:16]), bytes(packet[16:20])
        l4, end = ihl, (total or wire_len)
    elif version == 6:
        if have < 40 or packet[6] != 6:  # next header must be TCP: no extension headers
            return None
        plen = struct.unpack_from(">H", packet, 4)[0]
        src, dst = bytes(packet[8:24]), bytes(packet[24:40])
        l4, end = 40, 40 + (plen or wire_len - 40)
    else:
        return None
    if have < l4 + 20:
        return None
    sport, dport, seq, off_flags = struct.unpack_from(">HHI4xH", packet, l4)
    start = l4 + (off_flags >> 12) * 4
    if start < l4 + 20 or end < start or have < start:
        return None
    payload = bytes(packet[start:min(end, have)])
    return Segment(src, sport, dst, dport, seq, off_flags & 0x3F, payload, end - start - len(payload))


def parse_ethernet(frame, wire_len: int | None = None) -> Segment | None:
    """Parse an Ethernet II frame (optionally 802.1Q/802.1ad tagged) carrying IP/TCP."""
    off = 12
    while True:
        if len(frame) < off + 2:
            return None
        ethertype = struct.unpack_from(">H", frame, off)[0]
        if ethertype in (_ETH_P_8021Q, _ETH_P_8021AD):
            off += 4
            continue
        break
    if ethertype not in (_ETH_P_IP, _ETH_P_IPV6):
        return None
    return parse_ip(memoryview(frame)[off + 2:], None if wire_len is None else wire_len - off - 2)


def format_addr(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


# -- reassembly ---------------------------------------------------------------------------
Key = tuple[bytes, int, bytes, int]


@dataclass(eq=False)
class _Flow:
    flow_id: int
    key: Key
    isn: int | None        # None for a mid-stream pickup
    base: int              # sequence number of stream offset 0
    last_seen: float
    delivered: int = 0     # stream offset of the next byte we expect
    fin_at: int | None = None
    pending: dict[int, bytes] = field(default_factory=dict)  # stream offset -> out-of-order data
    buffered: int = 0
    gap_since: float | None = None

    def offset(self, seq: int) -> int:
        """Stream offset of ``seq``, unwrapped around the next expected byte."""
        diff = (seq - self.base - self.delivered) % _U32
        if diff >= _HALF:
            diff -= _U32
        return self.delivered + diff


class Reassembler:
    """Client->server byte streams of the TCP connections to ``ports`` (None: every port)."""

    def __init__(self, ports: Iterable[int] | None = None, *, max_flows: int = 1024,
                 max_buffered: int = 1 << 20, max_total_buffered: int = 64 << 20,
                 idle_timeout: float = 300.0,
                 gap_timeout: float = 5.0, tombstone_ttl: float = 60.0,
                 midstream: bool = True) -> None:
        self.ports = None if ports is None else frozenset(ports)
        self.max_flows = max_flows
        self.max_buffered = max_buffered
        self.max_total_buffered = max_total_buffered
        self.total_buffered = 0  # out-of-order bytes held, all flows together
        self.idle_timeout = idle_timeout
        self.gap_timeout = gap_timeout
        self.tombstone_ttl = tombstone_ttl
        self.midstream = midstream
        self.flows: dict[Key, _Flow] = {}
        self.by_id: dict[int, _Flow] = {}
        self.tombstones: OrderedDict[Key, tuple[float, int | None]] = OrderedDict()  # -> (expiry, isn)
        self.stats = {"segments": 0, "ignored": 0, "flows_refused": 0, "duplicate_bytes": 0}
        self._next_id = 1

    # -- input ----------------------------------------------------------------------------
    def feed_packet(self, packet, now: float, wire_len: int | None = None) -> list[Event]:
        seg = parse_ip(packet, wire_len)
        if seg is None:
            self.stats["ignored"] += 1
            return []
        return self.feed_segment(seg, now)

    def feed_segment(self, seg: Segment, now: float) -> list[Event]:
        if self.ports is not None and seg.dport not in self.ports:
            self.stats["ignored"] += 1
            return []
        self.stats["segments"] += 1
        out: list[Event] = []
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        flow = self.flows.get(key)
        flags = seg.flags
        if flags & SYN:
            if flags & (ACK | RST):  # a SYN-ACK *to* a server port is not a client's connection
                self.stats["ignored"] += 1
                return out
            if flow is not None:
                if flow.isn == seg.seq:
                    return out  # retransmitted SYN
                self._end(flow, END_REUSED, now, out)
            elif self._tombstoned(key, now, seg.seq):
                return out
            flow = self._start(key, seg.seq, (seg.seq + 1) % _U32, now, out)
            if flow is None:
                return out
            return self._segment(flow, (seg.seq + 1) % _U32, seg, now, out)
        if flow is None:
            if not seg.payload or flags & RST or not self.midstream or self._tombstoned(key, now):
                return out
            flow = self._start(key, None, seg.seq, now, out)
            if flow is None:
                return out
        if flags & RST:
            self._end(flow, END_RST, now, out)
            return out
        return self._segment(flow, seg.seq, seg, now, out)

    def tick(self, now: float) -> list[Event]:
        """Expire idle flows, flows stuck behind a hole, and old tombstones."""
        out: list[Event] = []
        for flow in list(self.flows.values()):
            if now - flow.last_seen >= self.idle_timeout:
                self._end(flow, END_IDLE, now, out, tombstone=False)
            elif flow.gap_since is not None and now - flow.gap_since >= self.gap_timeout:
                self._end(flow, END_GAP, now, out)
        while self.tombstones:
            key, (expiry, _) = next(iter(self.tombstones.items()))
            if expiry > now:
                break
            del self.tombstones[key]
        return out

    def end(self, flow_id: int, reason: str, now: float) -> list[Event]:
        """The driver gives up on a flow (e.g. its sink is too slow); later segments are ignored."""
        out: list[Event] = []
        flow = self.by_id.get(flow_id)
        if flow is not None:
            self._end(flow, reason, now, out)
        return out

    def set_ports(self, ports: Iterable[int] | None, now: float) -> list[Event]:
        """Change the mirrored ports; flows to ports no longer mirrored end (``port removed``)."""
        self.ports = None if ports is None else frozenset(ports)
        out: list[Event] = []
        if self.ports is not None:
            for flow in list(self.flows.values()):
                if flow.key[3] not in self.ports:
                    self._end(flow, END_PORT_REMOVED, now, out, tombstone=False)
        return out

    def close(self, reason: str = END_CLOSED) -> list[Event]:
        out: list[Event] = []
        for flow in list(self.flows.values()):
            self._end(flow, reason, 0.0, out, tombstone=False)
        self.tombstones.clear()
        return out

    # -- internals ------------------------------------------------------------------------
    def _tombstoned(self, key: Key, now: float, syn_seq: int | None = None) -> bool:
        entry = self.tombstones.get(key)
        if entry is None:
            return False
        expiry, isn = entry
        if expiry <= now or (syn_seq is not None and syn_seq != isn):
            del self.tombstones[key]  # expired, or a new connection reusing the 4-tuple
            return False
        return True

    def _start(self, key: Key, isn: int | None, base: int, now: float,
               out: list[Event]) -> _Flow | None:
        if len(self.flows) >= self.max_flows:
            # Refuse, and remember the refusal so the connection is not picked up half-way later.
            self.stats["flows_refused"] += 1
            self._bury(key, isn, now)
            return None
        flow = _Flow(self._next_id, key, isn, base, now)
        self._next_id += 1
        self.flows[key] = self.by_id[flow.flow_id] = flow
        self.tombstones.pop(key, None)
        out.append(FlowStarted(flow.flow_id, (format_addr(key[0]), key[1]),
                               (format_addr(key[2]), key[3]), midstream=isn is None))
        return flow

    def _segment(self, flow: _Flow, seq: int, seg: Segment, now: float,
                 out: list[Event]) -> list[Event]:
        flow.last_seen = now
        off = flow.offset(seq)
        data = seg.payload
        if seg.flags & FIN and flow.fin_at is None:
            flow.fin_at = off + len(data) + seg.missing
        if data:
            chunks: list[bytes] = []
            end = off + len(data)
            if end <= flow.delivered:
                self.stats["duplicate_bytes"] += len(data)
            elif off <= flow.delivered:
                chunks.append(data[flow.delivered - off:] if off < flow.delivered else data)
                flow.delivered = end
                self._drain(flow, chunks)
            else:
                grow = len(data) - len(flow.pending.get(off, b""))
                if grow > 0:
                    flow.buffered += grow
                    self.total_buffered += grow
                    flow.pending[off] = data
                if flow.gap_since is None:
                    flow.gap_since = now
                if (flow.buffered > self.max_buffered
                        or self.total_buffered > self.max_total_buffered):
                    self._end(flow, END_OVERFLOW, now, out)
                    return out
            if chunks:
                out.append(FlowData(flow.flow_id, b"".join(chunks)))
        if seg.missing and off + len(data) + seg.missing > flow.delivered:
            self._end(flow, END_TRUNCATED, now, out)  # the cut-off bytes are gone for good
        elif flow.fin_at is not None and flow.delivered >= flow.fin_at:
            self._end(flow, END_FIN, now, out)
        return out

    def _drain(self, flow: _Flow, chunks: list[bytes]) -> None:
        if not flow.pending:
            return
        for off in sorted(flow.pending):
            if off > flow.delivered:
                break
            data = flow.pending.pop(off)
            flow.buffered -= len(data)
            self.total_buffered -= len(data)
            if off + len(data) > flow.delivered:
                chunks.append(data[flow.delivered - off:])
                flow.delivered = off + len(data)
            else:
                self.stats["duplicate_bytes"] += len(data)
        if not flow.pending:
            flow.gap_since = None

    def _end(self, flow: _Flow, reason: str, now: float, out: list[Event],
             tombstone: bool = True) -> None:
        del self.flows[flow.key]
        del self.by_id[flow.flow_id]
        self.total_buffered -= flow.buffered
        flow.pending.clear()
        flow.buffered = 0
        if tombstone:
            self._bury(flow.key, flow.isn, now)
        out.append(FlowEnded(flow.flow_id, reason))

    def _bury(self, key: Key, isn: int | None, now: float) -> None:
        self.tombstones.pop(key, None)
        self.tombstones[key] = (now + self.tombstone_ttl, isn)
        while len(self.tombstones) > 4 * self.max_flows:
            self.tombstones.popitem(last=False)
