#!/usr/bin/env python3
"""Which SSH library should carry podtwin's link? paramiko vs asyncssh, measured on this machine.

``.venv/bin/python bench/link_choice.py [flags]`` starts, as separate processes (as the agent and
the sidecar are):

* a loopback TCP **sink** (plain sockets): ``D``+u64 N -> sends N zero bytes; ``U``+u64 N -> reads
  N bytes, answers ``K``; ``E`` -> echoes until EOF;
* an **asyncssh server** like podtwin's agent (``agent/link/server.py``: ``run_server`` on an accepted
  unix-socket connection, ed25519 host key, publickey auth, ``connection_requested`` -> True);
* a **paramiko server** doing the same (``check_channel_direct_tcpip_request`` connects to the
  destination, two threads pump each channel).

The client -- this process -- connects over the unix socket the way podtwin's ``runner/link/client.py``
does, opens ``direct-tcpip`` channels to the sink and measures: download and upload throughput
over one channel, 64-byte request/response latency over one channel, and channel-open latency (a
new channel to the sink, and a new channel plus its first 1-byte round trip). A raw loopback TCP
connection from this process to the sink is the baseline. asyncssh is measured with several
ciphers and with a larger channel packet size/window. The table goes to stdout and into
docs/link-choice.md (between the ``bench:results`` markers). Everything it starts is stopped at the
end (also on Ctrl-C); every loop is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import platform
import shlex
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"
MB = 1_000_000
CHUNK = 256 * 1024
PAYLOAD = b"x" * 64
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[link {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(samples: list[float], p: float) -> float:
    if not samples:
        return math.nan
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- servers (each runs in its own process: `link_choice.py --serve KIND ...`) ------------------


def serve_sink(port_file: Path) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s: socket.socket = self.request
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.serve(s)
            except (ConnectionError, OSError):
                pass  # e.g. a channel-open probe closed without a command

        def serve(self, s: socket.socket) -> None:
            cmd = recv_exact(s, 1)
            if cmd == b"D":
                n = struct.unpack("!Q", recv_exact(s, 8))[0]
                block = memoryview(bytes(1 << 20))
                while n > 0:
                    k = min(n, len(block))
                    s.sendall(block[:k])
                    n -= k
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            elif cmd == b"U":
                n = struct.unpack("!Q", recv_exact(s, 8))[0]
                buf = bytearray(1 << 20)
                while n > 0:
                    k = s.recv_into(buf, min(n, len(buf)))
                    if not k:
                        return
                    n -= k
                s.sendall(b"K")
            elif cmd == b"E":
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    s.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 512

    srv = Server(("127.0.0.1", 0), Handler)
    port_file.write_text(str(srv.server_address[1]))
    srv.serve_forever()


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def serve_asyncssh(path: str, keys: Path) -> None:
    import asyncssh

    class Conn(asyncssh.SSHServer):  # as podtwin's AgentConnection
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return False

        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            return True

    async def main() -> None:
        host_key = asyncssh.read_private_key(str(keys / "host_key"))
        authorized = asyncssh.import_authorized_keys((keys / "client_key.pub").read_text())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        tasks = set()

        async def handle(sock: socket.socket) -> None:
            # The same options as agent/link/server.py's Agent.handle (all of asyncssh's default
            # algorithms are allowed; the client picks the cipher).
            await asyncssh.run_server(sock, server_factory=Conn, server_host_keys=[host_key],
                                      authorized_client_keys=authorized, encoding=None, login_timeout=15,
                                      keepalive_interval=5, keepalive_count_max=2, allow_scp=False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            task = loop.create_task(handle(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    asyncio.run(main())


def serve_paramiko(path: str, keys: Path) -> None:
    import paramiko

    host_key = paramiko.Ed25519Key.from_private_key_file(str(keys / "host_key"))
    allowed = (keys / "client_key.pub").read_text().split()[1]

    class Iface(paramiko.ServerInterface):
        def __init__(self) -> None:
            self.pending: dict[int, socket.socket] = {}

        def get_allowed_auths(self, username):
            return "publickey"

        def check_auth_publickey(self, username, key):
            return paramiko.AUTH_SUCCESSFUL if key.get_base64() == allowed else paramiko.AUTH_FAILED

        def check_channel_request(self, kind, chanid):
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

        def check_channel_direct_tcpip_request(self, chanid, origin, destination):
            try:
                s = socket.create_connection(destination, timeout=10)
            except OSError:
                return paramiko.OPEN_FAILED_CONNECT_FAILED
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pending[chanid] = s
            return paramiko.OPEN_SUCCEEDED

    def pump_to_sock(chan, s) -> None:
        try:
            while True:
                data = chan.recv(CHUNK)
                if not data:
                    break
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def pump_to_chan(chan, s) -> None:
        try:
            while True:
                data = s.recv(CHUNK)
                if not data:
                    break
                chan.sendall(data)
            chan.shutdown_write()
        except OSError:
            pass

    def connection(sock: socket.socket) -> None:
        t = paramiko.Transport(sock)
        t.add_server_key(host_key)
        iface = Iface()
        t.start_server(server=iface)
        while t.is_active():
            chan = t.accept(timeout=1)
            if chan is None:
                continue
            s = iface.pending.pop(chan.get_id(), None)
            if s is None:
                chan.close()
                continue

            def run(chan=chan, s=s) -> None:
                a = threading.Thread(target=pump_to_sock, args=(chan, s), daemon=True)
                a.start()
                pump_to_chan(chan, s)
                a.join()
                chan.close()
                s.close()
            threading.Thread(target=run, daemon=True).start()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=connection, args=(sock,), daemon=True).start()


# --- measurements ---------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    cipher: str = ""
    down: list[float] = field(default_factory=list)   # MB/s
    up: list[float] = field(default_factory=list)     # MB/s
    rtt: list[float] = field(default_factory=list)    # ms
    opens: list[float] = field(default_factory=list)  # ms, channel open only
    open_rtt: list[float] = field(default_factory=list)  # ms, open + first 1-byte round trip
    par_rps: float = math.nan     # aggregate round trips/s, parallel channels
    par_lat: list[float] = field(default_factory=list)  # ms, per round trip, parallel channels
    par_rps_all: list[float] = field(default_factory=list)  # per round
    cpu_client: float = math.nan  # CPU seconds per GB downloaded, client process
    cpu_server: float = math.nan  # same, SSH server process
    note: str = ""


@dataclass
class Plan:
    nbytes: int
    repeat: int
    upload: bool
    rtts: int
    opens: int
    max_phase: float
    par_channels: int = 16
    par_rtts: int = 200


def timed_loop(n: int, warm: int, max_s: float, fn) -> list[float]:
    out = []
    deadline = time.monotonic() + max_s
    for i in range(n + warm):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        fn()
        if i >= warm:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def merge(rs: list[Result]) -> Result:
    """One link's rounds as one result: samples pooled, per-round rates and CPU as medians."""
    out = Result(rs[0].name, rs[0].cipher)
    for r in rs:
        out.down += r.down
        out.up += r.up
        out.rtt += r.rtt
        out.opens += r.opens
        out.open_rtt += r.open_rtt
        out.par_lat += r.par_lat
    out.par_rps = statistics.median(r.par_rps for r in rs)
    out.par_rps_all = [r.par_rps for r in rs]
    out.cpu_client = statistics.median(r.cpu_client for r in rs)
    out.cpu_server = statistics.median(r.cpu_server for r in rs)
    return out


def parallel_threads(chans: list, send, recv_n, plan: Plan) -> tuple[float, list[float]]:
    """Each channel (already in echo mode) does plan.par_rtts round trips in its own thread."""
    lats: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(chans) + 1)
    deadline = time.monotonic() + plan.max_phase

    def worker(ch) -> None:
        local = []
        barrier.wait()
        for _ in range(plan.par_rtts):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            send(ch, PAYLOAD)
            recv_n(ch, len(PAYLOAD))
            local.append((time.perf_counter() - t0) * 1000)
        with lock:
            lats.extend(local)
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in chans]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=plan.max_phase + 30)
    return len(lats) / (time.perf_counter() - t0), lats


def measure_raw(port: int, plan: Plan, server_pid: int) -> Result:
    res = Result("raw loopback TCP (baseline)", "none")

    def conn() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    buf = bytearray(CHUNK)
    c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
    for _ in range(plan.repeat):
        s = conn()
        t0 = time.perf_counter()
        s.sendall(b"D" + struct.pack("!Q", plan.nbytes))
        n = 0
        while True:
            k = s.recv_into(buf)
            if not k:
                break
            n += k
        res.down.append(n / (time.perf_counter() - t0) / MB)
        s.close()
    res.cpu_client = (cpu_seconds(os.getpid()) - c0) / (plan.nbytes * plan.repeat / 1e9)
    res.cpu_server = (cpu_seconds(server_pid) - s0) / (plan.nbytes * plan.repeat / 1e9)
    if plan.upload:
        block = memoryview(bytes(CHUNK))
        for _ in range(plan.repeat):
            s = conn()
            t0 = time.perf_counter()
            s.sendall(b"U" + struct.pack("!Q", plan.nbytes))
            left = plan.nbytes
            while left > 0:
                k = min(left, CHUNK)
                s.sendall(block[:k])
                left -= k
            assert recv_exact(s, 1) == b"K"
            res.up.append(plan.nbytes / (time.perf_counter() - t0) / MB)
            s.close()
    s = conn()
    s.sendall(b"E")

    def rtt() -> None:
        s.sendall(PAYLOAD)
        recv_exact(s, len(PAYLOAD))
    res.rtt = timed_loop(plan.rtts, 50, plan.max_phase, rtt)
    s.close()
    chans = [conn() for _ in range(plan.par_channels)]
    for c in chans:
        c.sendall(b"E")
    res.par_rps, res.par_lat = parallel_threads(chans, lambda c, d: c.sendall(d), recv_exact, plan)
    for c in chans:
        c.close()
    held = []

    def open_only() -> None:
        held.append(conn())

    def open_first() -> None:
        c = conn()
        c.sendall(b"Ex")
        recv_exact(c, 1)
        c.close()
    res.opens = timed_loop(plan.opens, 5, plan.max_phase, open_only)
    for c in held:
        c.close()
    res.open_rtt = timed_loop(plan.opens, 5, plan.max_phase, open_first)
    res.note = "connect() to a listening loopback socket"
    return res


async def measure_asyncssh(path: str, keys: Path, port: int, plan: Plan, server_pid: int, name: str,
                           cipher: str | None, window: int | None = None, pktsize: int | None = None) -> Result:
    import asyncssh

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await asyncio.get_running_loop().sock_connect(sock, path)
    host_pub = (keys / "host_key.pub").read_text().strip()
    known = ([asyncssh.import_public_key(host_pub)], [], [])
    extra = {"encryption_algs": [cipher]} if cipher else {}
    # the same options as runner/link/client.py's Link.connect
    conn = await asyncssh.run_client(sock, username="podtwin", client_keys=[str(keys / "client_key")],
                                     known_hosts=known, agent_path=None, encoding=None, keepalive_interval=5,
                                     keepalive_count_max=2, compression_algs=None, **extra)
    chan_opts = {}
    if window:
        chan_opts["window"] = window
    if pktsize:
        chan_opts["max_pktsize"] = pktsize
    cipher_name, mac_name = conn.get_extra_info("recv_cipher"), conn.get_extra_info("recv_mac")
    res = Result(name, f"{cipher_name} / {'AEAD' if not mac_name or mac_name == cipher_name else mac_name}")

    async def open_():
        return await conn.open_connection("127.0.0.1", port, encoding=None, **chan_opts)

    async def timed_async(n: int, warm: int, fn) -> list[float]:
        out = []
        deadline = time.monotonic() + plan.max_phase
        for i in range(n + warm):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            await fn()
            if i >= warm:
                out.append((time.perf_counter() - t0) * 1000)
        return out

    try:
        c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
        for _ in range(plan.repeat):
            r, w = await open_()
            t0 = time.perf_counter()
            w.write(b"D" + struct.pack("!Q", plan.nbytes))
            n = 0
            while True:
                data = await r.read(CHUNK)
                if not data:
                    break
                n += len(data)
            res.down.append(n / (time.perf_counter() - t0) / MB)
            w.close()
        gb = plan.nbytes * plan.repeat / 1e9
        res.cpu_client = (cpu_seconds(os.getpid()) - c0) / gb
        res.cpu_server = (cpu_seconds(server_pid) - s0) / gb
        if plan.upload:
            block = bytes(CHUNK)
            for _ in range(plan.repeat):
                r, w = await open_()
                t0 = time.perf_counter()
                w.write(b"U" + struct.pack("!Q", plan.nbytes))
                left = plan.nbytes
                while left > 0:
                    k = min(left, CHUNK)
                    w.write(block[:k])
                    await w.drain()
                    left -= k
                assert await r.readexactly(1) == b"K"
                res.up.append(plan.nbytes / (time.perf_counter() - t0) / MB)
                w.close()
        r, w = await open_()
        w.write(b"E")

        async def rtt() -> None:
            w.write(PAYLOAD)
            await r.readexactly(len(PAYLOAD))
        res.rtt = await timed_async(plan.rtts, 50, rtt)
        w.close()
        chans = [await open_() for _ in range(plan.par_channels)]
        for _, w2 in chans:
            w2.write(b"E")
        deadline = time.monotonic() + plan.max_phase

        async def worker(r2, w2) -> list[float]:
            local = []
            for _ in range(plan.par_rtts):
                if time.monotonic() > deadline:
                    break
                t1 = time.perf_counter()
                w2.write(PAYLOAD)
                await r2.readexactly(len(PAYLOAD))
                local.append((time.perf_counter() - t1) * 1000)
            return local
        t0 = time.perf_counter()
        per = await asyncio.gather(*(worker(r2, w2) for r2, w2 in chans))
        res.par_lat = [x for lst in per for x in lst]
        res.par_rps = len(res.par_lat) / (time.perf_counter() - t0)
        for _, w2 in chans:
            w2.close()
        held = []

        async def open_only() -> None:
            held.append(await open_())

        async def open_first() -> None:
            r2, w2 = await open_()
            w2.write(b"Ex")
            await r2.readexactly(1)
            w2.close()
        res.opens = await timed_async(plan.opens, 5, open_only)
        for _, w2 in held:
            w2.close()
        res.open_rtt = await timed_async(plan.opens, 5, open_first)
    finally:
        conn.close()
        await conn.wait_closed()
    return res


def measure_paramiko(path: str, keys: Path, port: int, plan: Plan, server_pid: int, name: str,
                     cipher: str | None) -> Result:
    import paramiko

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    t = paramiko.Transport(sock)
    if cipher:
        t.get_security_options().ciphers = (cipher,)
    t.start_client(timeout=15)
    host_pub = (keys / "host_key.pub").read_text().split()[1]
    if t.get_remote_server_key().get_base64() != host_pub:
        raise RuntimeError("paramiko: unexpected host key")
    t.auth_publickey("podtwin", paramiko.Ed25519Key.from_private_key_file(str(keys / "client_key")))
    mac = t.remote_mac if "gcm" not in t.remote_cipher else "AEAD"
    res = Result(name, f"{t.remote_cipher} / {mac}")

    def open_():
        return t.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=15)

    def recv_n(chan, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = chan.recv(n - len(buf))
            if not data:
                raise ConnectionError("channel closed")
            buf += data
        return buf

    try:
        c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
        for _ in range(plan.repeat):
            chan = open_()
            t0 = time.perf_counter()
            chan.sendall(b"D" + struct.pack("!Q", plan.nbytes))
            n = 0
            while True:
                data = chan.recv(CHUNK)
                if not data:
                    break
                n += len(data)
            res.down.append(n / (time.perf_counter() - t0) / MB)
            chan.close()
        gb = plan.nbytes * plan.repeat / 1e9
        res.cpu_client = (cpu_seconds(os.getpid()) - c0) / gb
        res.cpu_server = (cpu_seconds(server_pid) - s0) / gb
        if plan.upload:
            block = bytes(CHUNK)
            for _ in range(plan.repeat):
                chan = open_()
                t0 = time.perf_counter()
                chan.sendall(b"U" + struct.pack("!Q", plan.nbytes))
                left = plan.nbytes
                while left > 0:
                    k = min(left, CHUNK)
                    chan.sendall(block[:k])
                    left -= k
                assert recv_n(chan, 1) == b"K"
                res.up.append(plan.nbytes / (time.perf_counter() - t0) / MB)
                chan.close()
        chan = open_()
        chan.sendall(b"E")

        def rtt() -> None:
            chan.sendall(PAYLOAD)
            recv_n(chan, len(PAYLOAD))
        res.rtt = timed_loop(plan.rtts, 50, plan.max_phase, rtt)
        chan.close()
        chans = [open_() for _ in range(plan.par_channels)]
        for c in chans:
            c.sendall(b"E")
        res.par_rps, res.par_lat = parallel_threads(chans, lambda c, d: c.sendall(d), recv_n, plan)
        for c in chans:
            c.close()
        held = []

        def open_first() -> None:
            c = open_()
            c.sendall(b"Ex")
            recv_n(c, 1)
            c.close()
        res.opens = timed_loop(plan.opens, 5, plan.max_phase, lambda: held.append(open_()))
        for c in held:
            c.close()
        res.open_rtt = timed_loop(plan.opens, 5, plan.max_phase, open_first)
    finally:
        t.close()
    return res


# --- orchestration --------------------------------------------------------------------------------


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def write_keys(d: Path) -> None:
    import asyncssh

    for name in ("host_key", "client_key"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        (d / name).write_bytes(key.export_private_key())
        (d / name).chmod(0o600)
        (d / f"{name}.pub").write_bytes(key.export_public_key())


def render(results: list[Result], plan: Plan, rounds: int, command: str, started: dt.datetime,
           elapsed: float) -> str:
    import asyncssh
    import cryptography
    import paramiko

    f = lambda x, d=1: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"  # noqa: E731
    med = lambda xs: statistics.median(xs) if xs else math.nan  # noqa: E731
    lines = [f"Run on {started.strftime('%Y-%m-%d %H:%M %Z').strip()} in {elapsed:.0f} s with:", "", "```", command,
             "```", "",
             f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), kernel {platform.release()}, "
             f"python {platform.python_version()}, asyncssh {asyncssh.__version__}, paramiko {paramiko.__version__}, "
             f"cryptography {cryptography.__version__}, load average at the end "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}.", "",
             f"{rounds} rounds, each measuring every link once, in the order of the table. Throughput: median of "
             f"{rounds * plan.repeat} transfers of {plan.nbytes / MB:g} MB over one channel (MB = 10^6 bytes). "
             f"Latency: 64-byte request/response over one channel (n={rounds * plan.rtts}). Parallel: "
             f"{plan.par_channels} channels at once, {plan.par_rtts} round trips each, aggregate round trips/s "
             f"(median of the rounds) and per-round-trip p99. Channel open: a new direct-tcpip channel to the sink "
             f"(n={rounds * plan.opens}), and a new channel plus its first 1-byte round trip. CPU: seconds of CPU per GB "
             "downloaded, client process (this one) and SSH server process (median of the rounds).", "",
             "| Link | cipher / MAC | download MB/s | upload MB/s | RTT p50 ms | RTT p99 ms | "
             f"{plan.par_channels}-parallel RTT/s | {plan.par_channels}-parallel p99 ms | open p50 ms | "
             "open p99 ms | open+1st RTT p50 ms | CPU s/GB client | CPU s/GB server |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.cipher} | {f(med(r.down), 0)} | {f(med(r.up), 0)} | {f(pct(r.rtt, 50), 3)} | "
                     f"{f(pct(r.rtt, 99), 3)} | {f(r.par_rps, 0)} | {f(pct(r.par_lat, 99), 2)} | {f(pct(r.opens, 50), 3)} | {f(pct(r.opens, 99), 3)} | "
                     f"{f(pct(r.open_rtt, 50), 3)} | {f(r.cpu_client, 2)} | {f(r.cpu_server, 2)} |")
    lines += ["", "Raw download MB/s, by round: " + "; ".join(
        f"{r.name}: " + ", ".join(f"{x:.0f}" for x in r.down) for r in results) + ".",
              "", f"Raw {plan.par_channels}-parallel round trips/s, by round: " + "; ".join(
        f"{r.name}: " + ", ".join(f"{x:.0f}" for x in r.par_rps_all) for r in results) + "."]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


DEFAULT_DOC = """# Link choice: asyncssh or paramiko

The section between the markers is written by `bench/link_choice.py`.

""" + RESULTS_START + "\n" + RESULTS_END + "\n"


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else DEFAULT_DOC
    if RESULTS_START not in text or RESULTS_END not in text:
        text = text.rstrip("\n") + "\n\n" + RESULTS_START + "\n" + RESULTS_END + "\n"
    head, _, rest = text.partition(RESULTS_START)
    _, _, tail = rest.partition(RESULTS_END)
    path.write_text(head + RESULTS_START + "\n" + block + RESULTS_END + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=200, help="MB per transfer (default 200)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each measures every link once, interleaved (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="transfers per direction, link and round (default 1)")
    p.add_argument("--no-upload", action="store_true")
    p.add_argument("--rtts", type=int, default=1000, help="request/response round trips per round (default 1000)")
    p.add_argument("--opens", type=int, default=100, help="channel opens per round (default 100)")
    p.add_argument("--parallel", type=int, default=16, help="channels in the parallel round-trip test (default 16)")
    p.add_argument("--parallel-rtts", type=int, default=100,
                   help="round trips per parallel channel and round (default 100)")
    p.add_argument("--max-phase", type=float, default=60, help="upper bound on each measurement loop, s")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only the links whose name contains TEXT (repeatable)")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "link-choice.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--serve", choices=["sink", "asyncssh", "paramiko"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import logging
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    if args.serve:  # a child process: ends on SIGTERM/SIGINT (the parent stops it) without a traceback
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
        {"sink": lambda: serve_sink(Path(args.path)),
         "asyncssh": lambda: serve_asyncssh(args.path, args.keys),
         "paramiko": lambda: serve_paramiko(args.path, args.keys)}[args.serve]()
        return 0

    command = shlex.join([".venv/bin/python", "bench/link_choice.py", *(sys.argv[1:] if argv is None else argv)])
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    plan = Plan(int(args.mb * MB), args.repeat, not args.no_upload, args.rtts, args.opens, args.max_phase,
                args.parallel, args.parallel_rtts)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="ptlink-"))
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    results: list[Result] = []
    try:
        write_keys(tmp)
        sink = procs.start("--serve", "sink", "--path", str(tmp / "sink.port"))
        wait_for(lambda: (tmp / "sink.port").exists() and (tmp / "sink.port").read_text(), 10, "the sink")
        port = int((tmp / "sink.port").read_text())
        servers = {}
        for kind in ("asyncssh", "paramiko"):
            proc = procs.start("--serve", kind, "--path", str(tmp / f"{kind}.sock"), "--keys", str(tmp))
            wait_for(lambda: (tmp / f"{kind}.sock").exists(), 20, f"the {kind} server")
            servers[kind] = proc

        KIB = 1024
        configs = [
            ("raw loopback TCP (baseline)", lambda: measure_raw(port, plan, sink.pid)),
            ("asyncssh, default ciphers (podtwin today)", lambda: asyncio.run(measure_asyncssh(
                str(tmp / "asyncssh.sock"), tmp, port, plan, servers["asyncssh"].pid,
                "asyncssh, default ciphers (podtwin today)", None))),
        ]
        for cipher in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                       "aes128-ctr"):
            name = f"asyncssh, {cipher}"
            configs.append((name, lambda c=cipher, n=name: asyncio.run(measure_asyncssh(
                str(tmp / "asyncssh.sock"), tmp, port, plan, servers["asyncssh"].pid, n, c))))
        for cipher in (None, "aes128-gcm@openssh.com"):
            name = "asyncssh, default ciphers, 256 KiB packets, 8 MiB window" if cipher is None else \
                f"asyncssh, {cipher}, 256 KiB packets, 8 MiB window"
            configs.append((name, lambda c=cipher, n=name: asyncio.run(measure_asyncssh(
                str(tmp / "asyncssh.sock"), tmp, port, plan, servers["asyncssh"].pid, n, c,
                window=8 * 1024 * KIB, pktsize=256 * KIB))))
        for cipher in (None, "aes128-gcm@openssh.com"):
            name = "paramiko, default ciphers" if cipher is None else f"paramiko, {cipher}"
            configs.append((name, lambda c=cipher, n=name: measure_paramiko(
                str(tmp / "paramiko.sock"), tmp, port, plan, servers["paramiko"].pid, n, c)))

        configs = [(n, r) for n, r in configs if not args.only or any(w in n for w in args.only)]
        # Rounds: every link is measured once per round, so a burst of load from elsewhere on a
        # shared machine hits all of them alike instead of one of them entirely.
        rounds: dict[str, list[Result]] = {}
        for i in range(args.rounds):
            for name, run in configs:
                log(f"round {i + 1}/{args.rounds}: {name}")
                rounds.setdefault(name, []).append(run())
        results = [merge(rs) for rs in rounds.values()]
        block = render(results, plan, args.rounds, command, started, time.monotonic() - t0)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(block)
    if not args.no_write:
        write_doc(args.output, block)
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
