#!/usr/bin/env python3
"""port-forward vs exec stdio: how fast is podtwin's link to a Kubernetes agent over each?

``PODTWIN_IMAGE=... .venv/bin/python bench/kube_transport.py [--kubeconfig F] [--mib 64] [--write-docs]``

In a namespace of its own (``eph-bench-<hex>``, deleted at the end, also on an error or Ctrl-C):
a target pod (the podtwin image, so no other image is needed) running a small **sink** on
127.0.0.1:9999 of its own network namespace: ``D``+u64 N -> N zero bytes; ``E`` -> echo until
EOF. For each arm -- agent {Job, ephemeral} x transport {port-forward, exec} -- the runner's own
code starts an agent (``KubeEngine.start_agent`` / ``start_ephemeral_agent``), serves the
session's unix socket with a ``backends.kube_streams`` transport and connects ``runner.link.client.Link`` to it,
exactly as a session does; then, over ``direct-tcpip`` channels the agent opens to the sink:

1. **link set-up**: transport stream + SSH handshake + control hello (what a sidecar pays once);
2. **download**: ``--mib`` MiB over one channel (MB/s, MB = 10^6 bytes);
3. **latency**: ``--requests`` 64-byte echoes over one channel, p50 and p99 (after 50 warm-up);
4. **channel open**: a new channel to the sink plus one 1-byte round trip (what each new TCP
   connection of the app costs), ``--opens`` times, p50.

Arms run ``--rounds`` times, interleaved; the table gives medians over rounds and exec/port-forward
ratios. This process is both the runner (its transport pumps) and the client, so on a small
machine they share CPU as a session's runner and sidecar do. The image must be in the cluster
(``make cluster-load IMAGE=$PODTWIN_IMAGE``, and its agent image: ``IMAGE=podtwin-agent:...``).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
START, END = "<!-- bench:kube-transport:start -->", "<!-- bench:kube-transport:end -->"
MB = 1_000_000
SINK = r"""
import asyncio, struct
async def serve(r, w):
    cmd = await r.readexactly(1)
    if cmd == b"D":
        (n,) = struct.unpack("!Q", await r.readexactly(8))
        chunk = bytes(256 * 1024)
        while n > 0:
            w.write(chunk[:min(n, len(chunk))]); n -= min(n, len(chunk))
            await w.drain()
    else:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", 9999)
    print("sink ready", flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


def log(msg: str) -> None:
    print(f"[kube-transport {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Bench:
    def __init__(self, args) -> None:
        from kubernetes import client

        from podtwin.runner.adapters.kube import KubeEngine
        self.args = args
        self.kube = KubeEngine(args.kubeconfig, None)
        self.client = client
        self.ns = f"eph-bench-{secrets.token_hex(3)}"
        from podtwin.runner.config.image import podtwin_image_name
        self.image = podtwin_image_name()

    # -- staging ----------------------------------------------------------------------------
    def stage(self):
        c = self.client
        self.kube.core.create_namespace(c.V1Namespace(metadata=c.V1ObjectMeta(name=self.ns)))
        deadline = time.monotonic() + 60
        while True:  # pods need the namespace's default ServiceAccount
            try:
                self.kube.core.read_namespaced_service_account("default", self.ns)
                break
            except c.ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        pod = c.V1Pod(metadata=c.V1ObjectMeta(name="target", labels={"app": "target"}), spec=c.V1PodSpec(
            termination_grace_period_seconds=1, containers=[c.V1Container(
                name="app", image=self.image, image_pull_policy="IfNotPresent",
                command=["python3", "-c", SINK])]))
        self.kube.core.create_namespaced_pod(self.ns, pod)
        deadline = time.monotonic() + 120
        while True:
            p = self.kube.core.read_namespaced_pod("target", self.ns)
            if p.status.phase == "Running" and all(s.ready for s in p.status.container_statuses or []):
                return self.kube._pod_target(p, "app")
            if time.monotonic() > deadline:
                raise RuntimeError("the target pod did not start (is the image loaded into the cluster?)")
            time.sleep(0.3)

    def cleanup(self) -> None:
        try:
            self.kube.core.delete_namespace(self.ns)
            log(f"deleted namespace {self.ns}")
        except Exception as exc:  # noqa: BLE001
            log(f"could not delete namespace {self.ns}: {exc}")

    # -- one arm ------------------------------------------------------------------------------
    def arm(self, pod, ephemeral: bool, transport: str) -> dict:
        from podtwin.runner.backends.kube_agents import KubeEphemeralAgent, KubeJobAgent
        from podtwin.runner.backends.kube_streams import TRANSPORTS
        from podtwin.runner.config.models import PodtwinConfig
        from podtwin.runner.link.loop import LoopThread
        from podtwin.runner.state.session import Session
        from podtwin.runner.targets import parse_target

        from podtwin.runner.config.image import agent_image_name
        cfg = PodtwinConfig.model_validate({"agent": {"startup_timeout": 60, "image": agent_image_name(self.image)}})
        placement = (KubeEphemeralAgent if ephemeral else KubeJobAgent)(
            parse_target(f"pod/{pod.pod}"), cfg, self.image, self.kube, self.ns, None, None)
        placement.pod = pod   # resolved already
        stream = TRANSPORTS[transport](self.kube)
        session = Session.create("pod/target")
        loop = LoopThread("bench-link")
        quiet = lambda message: None  # noqa: E731
        try:
            session.write_keys(agent_host_key=placement.runner_makes_host_key)
            placement.setup(session, quiet)
            ready = placement.wait_ready(quiet)
            stream.setup(session, ready, loop)
            return loop.run(self.measure(session, ready.host_key), 600)
        finally:
            stream.restore()
            loop.stop()
            placement.restore()
            session.remove_dir()

    async def measure(self, session, host_key: str) -> dict:
        from podtwin.runner.link.client import Link, LinkKeys

        keys = LinkKeys(str(session.files.client_key), host_key)
        t0 = time.perf_counter()
        link = await Link.connect_unix(str(session.files.agent_socket), keys, role="runner")
        setup = time.perf_counter() - t0
        try:
            n = self.args.mib * 1024 * 1024
            reader, writer = await link.open_tcp("127.0.0.1", 9999)
            t0 = time.perf_counter()
            writer.write(b"D" + struct.pack("!Q", n))
            got = 0
            while got < n:
                data = await reader.read(1 << 20)
                if not data:
                    raise RuntimeError(f"download ended after {got} bytes")
                got += len(data)
            download = n / (time.perf_counter() - t0) / MB
            writer.close()

            reader, writer = await link.open_tcp("127.0.0.1", 9999)
            writer.write(b"E")
            payload, rtts = b"x" * 64, []
            for i in range(50 + self.args.requests):
                t0 = time.perf_counter()
                writer.write(payload)
                await reader.readexactly(64)
                if i >= 50:
                    rtts.append((time.perf_counter() - t0) * 1000)
            writer.close()

            opens = []
            for _ in range(self.args.opens):
                t0 = time.perf_counter()
                reader, writer = await link.open_tcp("127.0.0.1", 9999)
                writer.write(b"E1")
                await reader.readexactly(1)
                opens.append((time.perf_counter() - t0) * 1000)
                writer.close()
            return {"setup_ms": setup * 1000, "download_mbs": download, "p50_ms": pct(rtts, 50),
                    "p99_ms": pct(rtts, 99), "open_ms": pct(opens, 50)}
        finally:
            link.close()
            await asyncio.sleep(0.1)


ARMS = [(False, "port-forward"), (False, "exec"), (True, "port-forward"), (True, "exec")]
METRICS = [("setup_ms", "link set-up (ms)"), ("download_mbs", "download (MB/s)"),
           ("p50_ms", "64 B echo p50 (ms)"), ("p99_ms", "64 B echo p99 (ms)"),
           ("open_ms", "new channel + 1 B round trip p50 (ms)")]


def table(results: dict, args, took: float, command: str) -> str:
    def med(arm, key):
        return statistics.median(r[key] for r in results[arm])
    head = "| | " + " | ".join(f"{'ephemeral' if e else 'Job'} agent, {t}" for e, t in ARMS) + \
           " | exec / port-forward (Job) | exec / port-forward (ephemeral) |"
    lines = [head, "|---" * (len(ARMS) + 3) + "|"]
    for key, label in METRICS:
        cells = [f"{med(arm, key):.1f}" if key != "p99_ms" and key != "p50_ms" else f"{med(arm, key):.2f}"
                 for arm in ARMS]
        ratios = [med(ARMS[1], key) / med(ARMS[0], key), med(ARMS[3], key) / med(ARMS[2], key)]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    import kubernetes
    import websocket
    machine = (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), kernel {platform.release()}, "
               f"Python {platform.python_version()}, kubernetes client {kubernetes.__version__}, "
               f"websocket-client {websocket.__version__}")
    return "\n".join([
        f"Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {took:.0f} s with:", "", "```",
        command, "```", "",
        f"{args.rounds} rounds, arms interleaved, medians over rounds; download {args.mib} MiB over one "
        f"channel, {args.requests} echoes, {args.opens} channel opens. {machine}. Load average at "
        f"the start {args.load_start}, at the end {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
        "(the machine is shared: figures move by ±20% between runs; compare the ratios).", "", *lines])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--opens", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-docs", action="store_true", help=f"replace the results in {DOC.name}")
    args = p.parse_args()
    args.load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    bench = Bench(args)
    start = time.monotonic()
    results: dict = {arm: [] for arm in ARMS}
    try:
        pod = bench.stage()
        log(f"target pod ready in {bench.ns}")
        for r in range(args.rounds):
            for arm in ARMS:
                log(f"round {r + 1}: {'ephemeral' if arm[0] else 'Job'} agent over {arm[1]}")
                results[arm].append(bench.arm(pod, *arm))
                log("  " + ", ".join(f"{k} {v:.2f}" for k, v in results[arm][-1].items()))
    finally:
        bench.cleanup()
    command = "PODTWIN_IMAGE=podtwin:dev .venv/bin/python bench/kube_transport.py " + shlex.join(
        a for a in sys.argv[1:] if a != "--write-docs")
    text = table(results, args, time.monotonic() - start, command.strip())
    print(text)
    if args.write_docs:
        doc = DOC.read_text()
        if START in doc and END in doc:
            doc = doc[:doc.index(START) + len(START)] + "\n" + text + "\n" + doc[doc.index(END):]
            DOC.write_text(doc)
            log(f"wrote {DOC}")
        else:
            log(f"no {START} markers in {DOC}: not written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
