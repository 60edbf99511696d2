"""Mirror mode: copy the client->server bytes of incoming TCP connections to a sink, passively.

The target keeps serving every connection itself; we only watch. One ``AF_PACKET`` socket, not
bound to an interface, sees the packets of every interface of the network namespace we run in
(including interfaces created later). Needs CAP_NET_RAW there.

* ``SOCK_DGRAM``: the kernel strips the link header, so every packet starts at the IP header
  whatever the interface (``lo``'s all-zero Ethernet header, veth, tun, ...).
* A classic BPF program (``bpf_program``) passes only TCP to the mirrored ports and drops our own
  outgoing copies (``PACKET_OUTGOING``: on ``lo`` every packet is seen twice, once leaving and once
  arriving; we keep the arriving one). Everything else is rejected in the kernel, never copied to us.
* ``PACKET_IGNORE_OUTGOING`` as well where the kernel has it (4.20+): outgoing packets are then not
  even cloned for us.
* The target is never slowed by us: the kernel copies packets into our socket buffer (made large
  with ``SO_RCVBUFFORCE``), and when we fall behind it drops *our* copies, not the target's packets.
  The flows that lost a packet then end (``gap``). Towards the sinks, every flow has a bounded
  backlog; a flow whose sink does not keep up is dropped (``slow sink``), never waited for.

Cost to the target: in the kernel, one JIT-compiled BPF run per packet of the namespace and a
clone of each accepted packet (measured on ``lo``: within run-to-run noise). In user space the
agent spends CPU in proportion to the mirrored bytes (one Python thread kept up with 300 MB/s on
``lo``); if it cannot (CPU-starved node, GB/s of traffic) it loses copies and flows, it never
slows the target.

Not supported: IP fragments and IPv6 extension headers (such packets are dropped; the flow then
ends with ``gap``), packets longer than ``capture_size`` (1 MiB; GRO/TSO/BIG TCP super-packets
below that are fine, above it the flow ends ``truncated``), the server->client direction (not
captured at all, so a connection the server resets ends only by the client's FIN/RST or by
``idle_timeout``), SCTP/UDP.

The reassembly is ``reassembly.Reassembler`` (sans-IO); this module is its I/O driver.
"""
from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import socket
import struct
from collections import deque
from typing import Any, Callable, Iterable

from podtwin.agent.incoming.mirror import reassembly
from podtwin.agent.incoming.mirror.reassembly import FlowData, FlowEnded, FlowStarted
from podtwin.agent.tasks import TaskSet

log = logging.getLogger("podtwin.agent.incoming.mirror.capture")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_OUTGOING = 4
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

END_SLOW_SINK = "slow sink"
END_SINK_ERROR = "sink error"
END_REJECTED = "rejected"      # on_flow returned None

# -- classic BPF --------------------------------------------------------------------------
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x01, 0x04, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0
BPF_AND = 0x50
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K = 0x00
SKF_AD_PKTTYPE_K = (-0x1000 + 4) & 0xFFFFFFFF  # ld #pkttype: the skb's packet type
BPF_MAXINSNS = 4096
ACCEPT = 0xFFFFFFFF  # return value = bytes to keep: the whole packet


def _port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}")
        if ranges and ranges[-1][1] == port - 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def bpf_program(ports: Iterable[int]) -> list[tuple[int, int, int, int]]:
    """``tcp and dst port in PORTS and not outgoing`` for packets that start at the IP header.

    Returns ``struct sock_filter`` tuples (code, jt, jf, k). IPv4 (options allowed, fragments
    after the first rejected) and IPv6 whose next header is TCP (no extension headers).
    Contiguous ports become one range test, so large sets fit in BPF_MAXINSNS.
    """
    # (code, jt label, jf label, k); a label is a name or None for "next instruction".
    prog: list[tuple[int, Any, Any, int]] = []
    labels: dict[str, int] = {}

    def op(code: int, k: int = 0, jt: Any = None, jf: Any = None) -> None:
        prog.append((code, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(prog)

    op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_PKTTYPE_K)
    op(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, jt="reject")
    op(BPF_LD | BPF_B | BPF_ABS, 0)
    op(BPF_ALU | BPF_AND | BPF_K, 0xF0)
    op(BPF_JMP | BPF_JEQ | BPF_K, 0x40, jf="not4")
    op(BPF_LD | BPF_B | BPF_ABS, 9)                        # IPv4 protocol
    op(BPF_JMP | BPF_JEQ | BPF_K, socket.IPPROTO_TCP, jf="reject")
    op(BPF_LD | BPF_H | BPF_ABS, 6)                        # flags + fragment offset
    op(BPF_JMP | BPF_JSET | BPF_K, 0x1FFF, jt="reject")   # not the first fragment: no TCP header
    op(BPF_LDX | BPF_B | BPF_MSH, 0)                       # X = IPv4 header length
    op(BPF_LD | BPF_H | BPF_IND, 2)                        # TCP destination port
    op(BPF_JMP | BPF_JA, k=0, jt="ports")
    label("not4")
    op(BPF_JMP | BPF_JEQ | BPF_K, 0x60, jf="reject")
    op(BPF_LD | BPF_B | BPF_ABS, 6)                        # IPv6 next header
    op(BPF_JMP | BPF_JEQ | BPF_K, socket.IPPROTO_TCP, jf="reject")
    op(BPF_LD | BPF_H | BPF_ABS, 40 + 2)
    op(BPF_JMP | BPF_JA, k=0, jt="ports")
    label("reject")
    op(BPF_RET | BPF_K, 0)
    label("ports")
    for low, high in _port_ranges(ports):
        if low == high:
            op(BPF_JMP | BPF_JEQ | BPF_K, low, jf="+1")
        else:
            op(BPF_JMP | BPF_JGE | BPF_K, low, jf="+2")
            op(BPF_JMP | BPF_JGT | BPF_K, high, jt="+1")
        op(BPF_RET | BPF_K, ACCEPT)
    op(BPF_RET | BPF_K, 0)
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"too many port ranges for one BPF program ({len(prog)} instructions)")

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if code == BPF_JMP | BPF_JA:
            out.append((code, 0, 0, labels[jt] - i - 1))
            continue
        offsets = []
        for target in (jt, jf):
            if target is None:
                offsets.append(0)
            elif target.startswith("+"):
                offsets.append(int(target[1:]))
            else:
                offsets.append(labels[target] - i - 1)
        if not all(0 <= o <= 255 for o in offsets):
            raise AssertionError(f"BPF jump out of range at {i}: {offsets}")
        out.append((code, offsets[0], offsets[1], k))
    return out


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: replaces any previous filter atomically."""
    insns = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("HP", len(program), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# -- the driver ---------------------------------------------------------------------------
async def _maybe_await(value):
    if inspect.isawaitable(value):
        return await value
    return value


class _Pump:
    """One flow's way to its sink: a bounded backlog and the task that empties it."""

    def __init__(self, flow_id: int, client: tuple[str, int], server: tuple[str, int]) -> None:
        self.flow_id = flow_id
        self.client = client
        self.server = server
        self.chunks: deque[bytes] = deque()
        self.queued = 0
        self.ended = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.midstream = False


class Mirror:
    """Passive mirror of the incoming TCP connections to some ports of this network namespace.

    ``on_flow(flow_id, client, server)`` is called (and awaited if it returns an awaitable) for
    each new connection; ``client`` and ``server`` are ``(ip, port)``. It returns the flow's sink,
    or None to ignore the flow. ``sink.write(data)`` gets the client's bytes in order (awaited if
    it returns an awaitable: awaiting is the sink's flow control); ``sink.close()`` (awaited
    likewise) is called exactly once when the flow ends for any reason, after the backlog was
    written, or at once when the flow is dropped (slow sink, mirror closed).
    ``on_end(flow_id, reason)``, optional and synchronous, says when and why a flow ended.
    """

    def __init__(self, on_flow: Callable[[int, tuple[str, int], tuple[str, int]], Any], *,
                 on_end: Callable[[int, str], None] | None = None,
                 max_flows: int = 1024, max_buffered: int = 1 << 20,
                 max_total_buffered: int = 32 << 20,
                 max_backlog: int = 4 << 20, max_total_backlog: int = 32 << 20,
                 idle_timeout: float = 300.0, gap_timeout: float = 5.0,
                 midstream: bool = True, rcvbuf: int = 16 << 20,
                 capture_size: int = 1 << 20, batch: int = 256,
                 read_budget: int = 1 << 20) -> None:
        self.on_flow = on_flow
        self.on_end = on_end
        self.max_backlog = max_backlog
        self.max_total_backlog = max_total_backlog
        self.rcvbuf = rcvbuf
        self.batch = batch
        self.read_budget = read_budget
        self.reassembler = reassembly.Reassembler(
            (), max_flows=max_flows, max_buffered=max_buffered,
            max_total_buffered=max_total_buffered, idle_timeout=idle_timeout,
            gap_timeout=gap_timeout, midstream=midstream)
        self.ports: frozenset[int] = frozenset()
        self.pumps: dict[int, _Pump] = {}
        self.backlog = 0
        self.counters = {"packets": 0, "kernel_drops": 0, "flows": 0, "dropped_flows": 0}
        self._buf = bytearray(capture_size)
        self._view = memoryview(self._buf)
        self._sock: socket.socket | None = None
        self._tasks = TaskSet("mirror")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- public API -----------------------------------------------------------------------
    async def start(self, ports: Iterable[int]) -> None:
        """Open the capture socket. Raises PermissionError without CAP_NET_RAW."""
        if self._sock is not None or self._closed:
            raise RuntimeError("Mirror.start() called twice")
        self._loop = asyncio.get_running_loop()
        self.ports = frozenset(ports)
        program = bpf_program(self.ports)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            sock.setblocking(False)
            attach_filter(sock, program)
            # Packets queued between socket() and the filter passed no filter: discard them.
            while True:
                try:
                    sock.recv(1)
                except BlockingIOError:
                    break
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass  # old kernel: the BPF program drops outgoing copies
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.reassembler.set_ports(self.ports, self._loop.time())
        self._loop.add_reader(sock.fileno(), self._readable)
        self._tasks.spawn(self._ticker(), "tick")
        log.info("mirroring TCP ports %s", sorted(self.ports))

    def update_ports(self, ports: Iterable[int]) -> None:
        """Mirror these ports from now on; flows to ports no longer mirrored end."""
        ports = frozenset(ports)
        program = bpf_program(ports)  # validate before changing anything
        self.ports = ports
        if self._sock is None:
            return
        attach_filter(self._sock, program)
        assert self._loop is not None
        self._handle(self.reassembler.set_ports(ports, self._loop.time()))
        log.info("mirroring TCP ports %s", sorted(ports))

    def close(self) -> None:
        """Stop capturing and drop every flow (their sinks are closed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._handle(self.reassembler.close())
        self._tasks.cancel_all()

    async def wait_closed(self) -> None:
        """Wait until every sink was closed after ``close()``."""
        await self._tasks.wait_all()

    def is_midstream(self, flow_id: int) -> bool:
        """True for a connection picked up mid-stream (its start was not seen); for on_flow."""
        pump = self.pumps.get(flow_id)
        return pump is not None and pump.midstream

    def stats(self) -> dict[str, int]:
        if self._sock is not None and not self._closed:
            try:
                _, drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
                self.counters["kernel_drops"] += drops  # reading resets the kernel's counters
            except OSError:
                pass
        return {**self.counters, **self.reassembler.stats, "open_flows": len(self.pumps),
                "backlog": self.backlog}

    # -- capture --------------------------------------------------------------------------
    def _readable(self) -> None:
        sock, view, size = self._sock, self._view, len(self._buf)
        assert sock is not None and self._loop is not None
        now = self._loop.time()
        budget = self.read_budget
        # Bounded in packets and bytes, so that a flood starves neither the rest of the agent nor
        # the sinks' tasks (a sink is only "slow" if it had its turn and did not keep up).
        for _ in range(self.batch):
            if budget <= 0:
                return
            try:
                n = sock.recv_into(view, size, socket.MSG_TRUNC)  # n: the packet's real length
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ENETDOWN when an interface goes away: keep going
                log.debug("capture recv: %r", exc)
                return
            self.counters["packets"] += 1
            budget -= n
            events = self.reassembler.feed_packet(view[:min(n, size)], now, wire_len=n)
            if events:
                self._handle(events)

    async def _ticker(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(1.0)
            self._handle(self.reassembler.tick(self._loop.time()))

    # -- events -> pumps ------------------------------------------------------------------
    def _handle(self, events: list[reassembly.Event]) -> None:
        for event in events:
            if isinstance(event, FlowData):
                self._push(event.flow_id, event.data)
            elif isinstance(event, FlowStarted):
                self.counters["flows"] += 1
                pump = _Pump(event.flow_id, event.client, event.server)
                pump.midstream = event.midstream
                self.pumps[event.flow_id] = pump
                pump.task = self._tasks.spawn(self._pump(pump), f"flow-{event.flow_id}")
            elif isinstance(event, FlowEnded):
                log.debug("flow %d ended: %s", event.flow_id, event.reason)
                pump = self.pumps.get(event.flow_id)
                if pump is not None:
                    pump.ended = True
                    pump.wake.set()
                    if event.reason in (END_SLOW_SINK, reassembly.END_CLOSED) and pump.task:
                        pump.task.cancel()
                if self.on_end is not None:
                    try:
                        self.on_end(event.flow_id, event.reason)
                    except Exception:
                        log.exception("on_end callback failed")

    def _push(self, flow_id: int, data: bytes) -> None:
        pump = self.pumps.get(flow_id)
        if pump is None or pump.ended:
            return
        if (pump.queued + len(data) > self.max_backlog
                or self.backlog + len(data) > self.max_total_backlog):
            self._give_up(pump, END_SLOW_SINK)
            return
        pump.chunks.append(data)
        pump.queued += len(data)
        self.backlog += len(data)
        pump.wake.set()

    def _give_up(self, pump: _Pump, reason: str) -> None:
        self.counters["dropped_flows"] += 1
        assert self._loop is not None
        events = self.reassembler.end(pump.flow_id, reason, self._loop.time())
        if events:
            self._handle(events)
        elif not pump.ended:  # the reassembler had already ended it
            pump.ended = True
            if pump.task is not None and reason == END_SLOW_SINK:
                pump.task.cancel()

    async def _pump(self, pump: _Pump) -> None:
        sink = None
        try:
            sink = await _maybe_await(self.on_flow(pump.flow_id, pump.client, pump.server))
            if sink is None:
                self._give_up(pump, END_REJECTED)
                return
            while True:
                if pump.chunks:
                    data = self._take(pump)
                    await _maybe_await(sink.write(data))
                elif pump.ended:
                    return
                else:
                    pump.wake.clear()
                    await pump.wake.wait()
        except Exception:
            log.exception("mirror flow %d: sink failed", pump.flow_id)
            self._give_up(pump, END_SINK_ERROR)
        finally:
            self.backlog -= pump.queued
            pump.chunks.clear()
            pump.queued = 0
            self.pumps.pop(pump.flow_id, None)
            if sink is not None:
                try:
                    await _maybe_await(sink.close())
                except Exception:
                    log.exception("mirror flow %d: sink close failed", pump.flow_id)

    def _take(self, pump: _Pump, limit: int = 256 << 10) -> bytes:
        """Up to ``limit`` queued bytes as one write (fewer, larger writes to the sink)."""
        parts, size = [], 0
        while pump.chunks and (not parts or size + len(pump.chunks[0]) <= limit):
            chunk = pump.chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        pump.queued -= size
        self.backlog -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

