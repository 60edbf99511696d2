"""Mirror mode (agent/incoming/mirror/capture.py) capturing for real, on ``lo`` of the test's network namespace.

Needs CAP_NET_RAW (run as root under ``unshare --net`` with ``lo`` up, like the rest of the unit
tests); skipped without it. An echo server stands in for the target's process: it must keep
answering every client while the mirror copies what the clients sent.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from podtwin.agent.incoming.mirror import capture as mirror
from podtwin.agent.incoming.mirror.capture import Mirror, attach_filter, bpf_program


def _can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()
        return True
    except (PermissionError, OSError):
        return False


pytestmark = pytest.mark.timeout(60)
needs_capture = pytest.mark.skipif(not _can_capture(), reason="needs CAP_NET_RAW (run as root)")


class Recorder:
    """on_flow/on_end for a Mirror: every flow's bytes, keyed by the client's port."""

    def __init__(self, write_delay: asyncio.Event | None = None) -> None:
        self.flows: dict[int, dict] = {}
        self.ended: dict[int, str] = {}
        self.closed = asyncio.Event()
        self.block = write_delay  # when set, writes wait for it: a sink that does not keep up

    async def on_flow(self, flow_id: int, client: tuple, server: tuple):
        record = self.flows[flow_id] = {"client": client, "server": server, "data": bytearray(),
                                        "closed": False}
        recorder = self

        class Sink:
            async def write(self, data: bytes) -> None:
                if recorder.block is not None:
                    await recorder.block.wait()
                record["data"] += data

            def close(self) -> None:
                record["closed"] = True
                recorder.closed.set()

        return Sink()

    def on_end(self, flow_id: int, reason: str) -> None:
        self.ended[flow_id] = reason

    def by_client_port(self) -> dict[int, bytes]:
        return {f["client"][1]: bytes(f["data"]) for f in self.flows.values()}

    async def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; flows {self.summary()}")
            await asyncio.sleep(0.02)

    def summary(self) -> dict:
        return {i: (f["client"], len(f["data"]), f["closed"], self.ended.get(i))
                for i, f in self.flows.items()}


async def echo_server(host: str = "127.0.0.1"):
    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
    server = await asyncio.start_server(echo, host, 0)
    return server, server.sockets[0].getsockname()[1]


async def talk(host: str, port: int, payload: bytes) -> int:
    """Send payload, half-close, read the echo until EOF; returns the client's port."""
    reader, writer = await asyncio.open_connection(host, port)
    client_port = writer.get_extra_info("sockname")[1]

    async def send() -> None:
        for i in range(0, len(payload), 50000):
            writer.write(payload[i:i + 50000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    echoed = await reader.read(-1)
    await sender
    writer.close()
    await writer.wait_closed()
    assert echoed == payload, "the target's server did not answer normally"
    return client_port


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


@needs_capture
def test_three_connections_mirrored_exactly_server_unaffected_other_port_not_captured():
    async def main():
        server, port = await echo_server()
        other, other_port = await echo_server()
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end)
        await m.start({port})
        try:
            payloads = [b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n", os.urandom(300_000),
                        bytes(range(256)) * 40]
            ports = await asyncio.gather(*(talk("127.0.0.1", port, p) for p in payloads))
            await talk("127.0.0.1", other_port, b"not for the mirror")
            await rec.until(lambda: len(rec.flows) == 3 and all(f["closed"] for f in rec.flows.values()))
            assert rec.by_client_port() == dict(zip(ports, payloads))
            assert sorted(rec.ended.values()) == ["fin"] * 3
            assert {f["server"] for f in rec.flows.values()} == {("127.0.0.1", port)}
            await asyncio.sleep(0.1)
            assert len(rec.flows) == 3  # nothing from the other port
            stats = m.stats()
            assert stats["kernel_drops"] == 0 and stats["dropped_flows"] == 0
            assert stats["duplicate_bytes"] == 0  # lo's outgoing copies were never seen
        finally:
            m.close()
            await m.wait_closed()
            server.close()
            other.close()
    run(main())


@needs_capture
def test_update_ports():
    async def main():
        server, port = await echo_server()
        other, other_port = await echo_server()
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end)
        await m.start({port})
        try:
            # A connection left open across the change: its flow ends when its port is removed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"open")
            assert await reader.readexactly(4) == b"open"
            await rec.until(lambda: len(rec.flows) == 1 and rec.flows[1]["data"] == b"open")

            m.update_ports({other_port})
            await rec.until(lambda: rec.flows[1]["closed"])
            assert rec.ended[1] == "port removed"
            writer.write(b" still served")
            assert await reader.readexactly(13) == b" still served"
            writer.close()
            await writer.wait_closed()

            mirrored = await talk("127.0.0.1", other_port, b"now mirrored")
            await talk("127.0.0.1", port, b"no longer mirrored")
            await rec.until(lambda: len(rec.flows) == 2 and rec.flows[2]["closed"])
            await asyncio.sleep(0.1)
            assert len(rec.flows) == 2
            assert rec.flows[2]["client"][1] == mirrored and rec.flows[2]["data"] == b"now mirrored"

            m.update_ports(set())
            await talk("127.0.0.1", other_port, b"nothing mirrored")
            await asyncio.sleep(0.1)
            assert len(rec.flows) == 2
        finally:
            m.close()
            await m.wait_closed()
            server.close()
            other.close()
    run(main())


@needs_capture
def test_ipv6_loopback():
    async def main():
        server, port = await echo_server("::1")
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end)
        await m.start({port})
        try:
            client_port = await talk("::1", port, b"over v6" * 1000)
            await rec.until(lambda: rec.flows and rec.flows[1]["closed"])
            assert rec.flows[1]["client"] == ("::1", client_port)
            assert rec.flows[1]["data"] == b"over v6" * 1000
        finally:
            m.close()
            await m.wait_closed()
            server.close()
    run(main())


@needs_capture
def test_slow_sink_is_dropped_and_the_server_is_not_slowed():
    async def main():
        server, port = await echo_server()
        stuck = asyncio.Event()  # never set: the sink never finishes a write
        rec = Recorder(write_delay=stuck)
        m = Mirror(rec.on_flow, on_end=rec.on_end, max_backlog=64 << 10)
        await m.start({port})
        try:
            await talk("127.0.0.1", port, os.urandom(500_000))  # asserts the echo is complete
            await rec.until(lambda: rec.flows and rec.flows[1]["closed"])
            assert rec.ended[1] == mirror.END_SLOW_SINK
            assert m.stats()["backlog"] == 0
        finally:
            m.close()
            await m.wait_closed()
            server.close()
    run(main())


@needs_capture
def test_close_closes_open_flows_sinks():
    async def main():
        server, port = await echo_server()
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end)
        await m.start({port})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        await rec.until(lambda: rec.flows and rec.flows[1]["data"] == b"hi")
        m.close()
        await m.wait_closed()
        assert rec.flows[1]["closed"] and rec.ended[1] == "closed"
        m.close()  # idempotent
        writer.close()
        await writer.wait_closed()
        server.close()
    run(main())


@needs_capture
def test_bpf_program_alone_passes_only_arriving_tcp_to_the_ports():
    """Without PACKET_IGNORE_OUTGOING: the filter itself must drop lo's outgoing copies."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(mirror.ETH_P_ALL))
    try:
        attach_filter(cap, bpf_program({port}))
        cap.setblocking(False)
        while True:
            try:
                cap.recv(1)
            except BlockingIOError:
                break
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            client.sendall(b"ping")
            conn.recv(4)
            conn.sendall(b"pong")  # server->client: not to the port, must not pass
            client.recv(4)
            conn.close()
        socket.create_connection(("127.0.0.1", port)).close()
        packets = []
        cap.settimeout(0.5)
        while True:
            try:
                data, addr = cap.recvfrom(65536)
            except TimeoutError:
                break
            packets.append((data, addr))
        assert packets
        for data, addr in packets:
            assert addr[2] != mirror.PACKET_OUTGOING
            assert data[0] >> 4 == 4 and data[9] == socket.IPPROTO_TCP  # starts at the IP header
            assert struct.unpack_from(">H", data, 22)[0] == port
        syns = [d for d, _ in packets if d[33] & 0x02]
        assert len(syns) == 2  # each SYN once, not twice
    finally:
        cap.close()
        listener.close()


def test_bpf_program_shapes():
    assert bpf_program(set())[-1] == (mirror.BPF_RET | mirror.BPF_K, 0, 0, 0)
    big = bpf_program(set(range(1000, 3000)) | set(range(4000, 6000, 2)))  # ranges + many singles
    assert len(big) <= mirror.BPF_MAXINSNS
    with pytest.raises(ValueError):
        bpf_program({0})
    with pytest.raises(ValueError):
        bpf_program(set(range(1, 65536, 2)))  # 32768 single ports do not fit


@needs_capture
def test_rejected_flow_is_ignored_to_its_end():
    async def main():
        server, port = await echo_server()
        ended: dict[int, str] = {}
        calls = []

        def on_flow(flow_id, client, server_addr):
            calls.append(flow_id)
            return None  # not interested

        m = Mirror(on_flow, on_end=ended.__setitem__)
        await m.start({port})
        try:
            await talk("127.0.0.1", port, b"x" * 100_000)
            await asyncio.sleep(0.2)
            assert calls == [1] and ended == {1: mirror.END_REJECTED}
            assert m.stats()["open_flows"] == 0
        finally:
            m.close()
            await m.wait_closed()
            server.close()
    run(main())


@needs_capture
def test_packets_larger_than_the_capture_buffer_end_the_flow_as_truncated():
    async def main():
        server, port = await echo_server()
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end, capture_size=2048)
        await m.start({port})
        try:
            payload = os.urandom(200_000)  # lo sends it in segments far above 2 KB
            await talk("127.0.0.1", port, payload)
            await rec.until(lambda: rec.flows and rec.flows[1]["closed"])
            assert rec.ended[1] == "truncated"
            assert payload.startswith(bytes(rec.flows[1]["data"]))
        finally:
            m.close()
            await m.wait_closed()
            server.close()
    run(main())


@needs_capture
def test_a_stalled_mirror_loses_its_copies_not_the_servers_packets():
    """The agent's loop is blocked while a thread's client and server talk: the kernel drops our
    copies (counted), the server answers everything, and the flow ends without claiming a FIN."""
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = os.urandom(4_000_000)
    result = {}

    def server_side():
        conn, _ = listener.accept()
        with conn:
            got = bytearray()
            while data := conn.recv(1 << 20):
                got += data
            conn.sendall(b"%d" % len(got))

    def client_side():
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            result["answer"] = client.recv(100)

    async def main():
        rec = Recorder()
        m = Mirror(rec.on_flow, on_end=rec.on_end, rcvbuf=1, idle_timeout=1.0, gap_timeout=0.5)
        await m.start({port})
        threads = [threading.Thread(target=server_side), threading.Thread(target=client_side)]
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)  # block the loop: the mirror reads nothing meanwhile
            for t in threads:
                t.join(10)
            assert result["answer"] == b"%d" % len(payload)
            await rec.until(lambda: rec.flows and rec.flows[1]["closed"], timeout=5)
            assert rec.ended[1] in ("gap", "idle")
            assert m.stats()["kernel_drops"] > 0
            assert payload.startswith(bytes(rec.flows[1]["data"]))
        finally:
            m.close()
            await m.wait_closed()
            listener.close()
    run(main())


@needs_capture
def test_connection_opened_before_start_is_picked_up_mid_stream():
    async def main():
        server, port = await echo_server()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"before the mirror;")
        assert await reader.readexactly(18) == b"before the mirror;"
        rec = Recorder()
        midstream = []
        m = Mirror(lambda *args: midstream.append(m.is_midstream(args[0])) or rec.on_flow(*args),
                   on_end=rec.on_end)
        await m.start({port})
        try:
            writer.write(b"after it")
            writer.write_eof()
            assert await reader.read() == b"after it"
            await rec.until(lambda: rec.flows and rec.flows[1]["closed"])
            assert midstream == [True]
            assert rec.flows[1]["data"] == b"after it" and rec.ended[1] == "fin"
        finally:
            writer.close()
            await writer.wait_closed()
            m.close()
            await m.wait_closed()
            server.close()
    run(main())
