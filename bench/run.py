#!/usr/bin/env python3
"""podtwin's benchmark: the same client, run through podtwin and directly in the target's network.

``make bench`` (or ``.venv/bin/python bench/run.py [flags]``) builds a small client/server image
(``bench/ptbench``, static Go, stdlib only), sets up a private staging -- an ``--internal`` Docker
network that only the target can reach, a server on it (alias ``backend``) and a target container
-- and runs the client twice:

* **direct**: ``docker run --network container:TARGET IMAGE ptbench client ...`` -- the baseline:
  the client inside the target's own network namespace, using the target's resolver;
* **podtwin**: ``podtwin container run --target container/TARGET IMAGE ptbench client ...`` -- the
  same image and command, its traffic carried by the sidecar, the SSH link and the agent.

Measured: bulk download/upload throughput, small HTTP request latency (one kept-alive connection,
and a new TCP connection per request), DNS lookup latency, session start-up time (to the app's first
output line), and the RSS/CPU of the agent, sidecar and runner during the transfers. The results
table goes to stdout and into docs/performance.md (between the ``bench:results`` markers).

Three more sections run in the same command, each skippable: **incoming** (``bench/incoming.py``:
stolen, filtered and mirrored requests against direct ones, on the same staging; ``--no-incoming``),
**files** (``bench/files.py``: the target's files read through podtwin, in the target, through
sshfs over OpenSSH and by ``docker exec cat``; ``--no-files``) and **kubernetes** (``bench/kube_session.py``: a ``deploy/`` target on the test cluster, podtwin
against the same client exec'd in the target pod; ``--no-kube``, skipped with a message when no
cluster answers). Their tables go between the ``bench:incoming``, ``bench:files`` and ``bench:kube``
markers.

Everything the run creates carries the label ``podtwin-bench=<tag>`` (podtwin's own session
objects carry ``podtwin.target=container/<this run's target>``) and is removed at the end, also
on an error, Ctrl-C or SIGTERM. Every loop and every child process has a time bound.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import queue
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# the sections (bench/incoming.py, bench/kube_session.py) import their helpers from here
sys.modules.setdefault("run", sys.modules[__name__])

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
from podtwin.runner.config.image import agent_image_name, podtwin_image_name  # noqa: E402 - after the sections' alias

PODTWIN_IMAGE = podtwin_image_name()   # what sessions run: podtwin:<version>, or PODTWIN_IMAGE
APP_BASE_IMAGE = "podtwin-test/busybox:latest"
LABEL = "podtwin-bench"
RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"
INCOMING_START, INCOMING_END = "<!-- bench:incoming:start -->", "<!-- bench:incoming:end -->"
KUBE_START, KUBE_END = "<!-- bench:kube:start -->", "<!-- bench:kube:end -->"
FILES_START, FILES_END = "<!-- bench:files:start -->", "<!-- bench:files:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, timeout: float = 120, input: str | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          input=input, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed: {proc.stderr.strip()[:500]}")
    return proc


def sh(*cmd: str, timeout: float = 60) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def json_events(lines):
    """The JSON objects among ``lines`` (ptbench's output), in order; other lines are skipped."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


# --- statistics -----------------------------------------------------------------------------------


def pct(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not samples:
        return math.nan
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None, unit: str = "", digits: int = 2) -> str:
    """a/b, and with a unit also the difference: "6.20× (+1.06 ms)"."""
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}×" + (f" ({a - b:+.{digits}f} {unit})" if unit else "")


# --- processes on the host ------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Watched:
    """A process whose memory and CPU are sampled while a suite runs."""
    name: str
    pid: int
    rss_max: dict[str, int] = field(default_factory=dict)   # phase -> max VmRSS KiB seen
    cpu_at: dict[str, float] = field(default_factory=dict)  # "start:P"/"end:P" -> cpu seconds
    hwm: int = 0

    def sample(self, phase: str) -> None:
        st = proc_status(self.pid)
        if "VmRSS" in st:
            self.rss_max[phase] = max(self.rss_max.get(phase, 0), st["VmRSS"])
            self.hwm = max(self.hwm, st.get("VmHWM", 0))

    def mark(self, key: str) -> None:
        cpu = proc_cpu_seconds(self.pid)
        if cpu is not None:
            self.cpu_at[key] = cpu


# --- the run ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = secrets.token_hex(3)
        self.label = f"{LABEL}={self.tag}"
        self.image = f"podtwin-bench/ptbench:{self.tag}"
        self.network = f"ptbench-net-{self.tag}"
        self.server = f"ptbench-server-{self.tag}"
        self.target = f"ptbench-target-{self.tag}"
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"ptbench-{self.tag}-"))
        self.children: list[subprocess.Popen] = []
        self.image_built = False
        self.variant_image = f"podtwin-bench/podtwin-variant:{self.tag}"
        self.variant_built = False
        self.podtwin = [str(Path(sys.executable).parent / "podtwin")]
        self.env = {**os.environ, "PODTWIN_STATE_DIR": str(self.state_dir)}
        self.kube_sessions: list[str] = []   # session ids seen by the kubernetes section
        self.kube_cleanup = None             # set by the kubernetes section

    # -- set-up ------------------------------------------------------------------------------
    def build_image(self) -> None:
        go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
                                         if Path(p).exists()), None)
        if go is None:
            raise RuntimeError("no Go toolchain: install Go to build bench/ptbench")
        with tempfile.TemporaryDirectory(prefix="ptbench-ctx-") as ctx:
            log("compiling bench/ptbench (static Go, CGO_ENABLED=0)")
            env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
            subprocess.run([go, "build", "-C", str(BENCH / "ptbench"), "-trimpath", "-ldflags", "-s -w",
                            "-o", str(Path(ctx) / "ptbench"), "."], env=env, check=True, timeout=300)
            shutil.copy2(BENCH / "ptbench" / "Dockerfile", Path(ctx) / "Dockerfile")
            log(f"building {self.image}")
            self.image_built = True  # from here on, remove it at the end
            docker("build", "-q", "-t", self.image, "--label", self.label, ctx, timeout=300,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})

    def staging(self) -> None:
        log(f"staging: network {self.network}, server {self.server}, target {self.target}")
        docker("network", "create", "--internal", "--label", self.label, self.network)
        docker("run", "-d", "--name", self.server, "--label", self.label, "--network", self.network,
               "--network-alias", "backend", self.image, "ptbench", "serve", "-addr", ":8080")
        docker("run", "-d", "--name", self.target, "--label", self.label, "--network", self.network,
               self.image, "sleep", "86400")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = docker("exec", self.target, "wget", "-qO-", "http://backend:8080/ping", check=False,
                           timeout=10)
            if probe.stdout.strip() == "pong":
                return
            time.sleep(0.2)
        raise RuntimeError("the bench server did not answer within 30s")

    # -- the two arms --------------------------------------------------------------------------
    def client_args(self, mb: float | None = None) -> list[str]:
        a = self.args
        return ["ptbench", "client", "-name", "backend", "-port", "8080",
                "-bytes", str(int((mb or a.mb) * MB)), "-repeat", str(a.repeat),
                "-upload=" + ("false" if a.no_upload else "true"),
                "-keepalive", str(a.keepalive), "-newconn", str(a.newconn), "-dns", str(a.dns),
                "-max-phase", f"{a.max_phase}s", "-settle", "1s"]

    def direct_cmd(self, client: list[str], name: str) -> list[str]:
        return ["docker", "run", "--rm", "--name", name, "--label", self.label,
                "--network", f"container:{self.target}", self.image, *client]

    def podtwin_cmd(self, client: list[str], config: Path | None = None) -> list[str]:
        extra = ["-f", str(config)] if config else []
        return [*self.podtwin, "container", "run", "-q", *extra, "--target", f"container/{self.target}",
                self.image, *client]

    def build_variant(self, cipher: str) -> Path | None:
        """An experiment, not podtwin as shipped: podtwin:dev with the sidecar's link asking for
        ``cipher`` first (runner/link/client.py patched in a derived image, the sidecar's through
        PODTWIN_IMAGE; the agent keeps its own image through agent.image). Returns the config file
        that selects it, or None if the patch does not apply."""
        source = (REPO / "runner" / "link" / "client.py").read_text()
        anchor = "encryption_algs=CIPHERS,"
        if source.count(anchor) != 1:
            log("cipher variant: runner/link/client.py has changed shape; skipping the experiment")
            return None
        patched = source.replace(anchor, f"encryption_algs={[cipher]!r},  # bench experiment")
        where = docker("run", "--rm", PODTWIN_IMAGE, "python", "-c",
                       "import podtwin.runner.link.client as m; print(m.__file__)").stdout.strip()
        with tempfile.TemporaryDirectory(prefix="ptbench-variant-") as ctx:
            (Path(ctx) / "link.py").write_text(patched)
            (Path(ctx) / "Dockerfile").write_text(
                f"FROM {PODTWIN_IMAGE}\nCOPY link.py {where}\n"
                f"RUN python -c \"import podtwin.runner.link.client as m, inspect; "
                f"assert {cipher!r} in inspect.getsource(m)\"\n")
            log(f"building {self.variant_image} (sidecar link cipher {cipher}; an experiment)")
            self.variant_built = True
            docker("build", "-q", "-t", self.variant_image, "--label", self.label, ctx, timeout=300,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})
        config = self.state_dir / "variant.json"
        config.write_text(json.dumps({"agent": {"image": agent_image_name()}}))
        return config

    def session_pids(self, target: str | None = None) -> dict[str, int]:
        """PIDs (host view) of this run's podtwin agent and sidecar containers' main processes."""
        out = {}
        for role in ("agent", "sidecar"):
            ids = docker("ps", "-q", "--filter", f"label=podtwin.target=container/{target or self.target}",
                         "--filter", f"label=podtwin.role={role}", check=False, timeout=20).stdout.split()
            if ids:
                pid = docker("inspect", "-f", "{{.State.Pid}}", ids[0], check=False, timeout=20).stdout.strip()
                if pid.isdigit() and pid != "0":
                    out[role] = int(pid)
        return out

    def run_suite(self, arm: str, config: Path | None = None, cmd: list[str] | None = None,
                  find_pids=None, env: dict | None = None) -> dict:
        """Run the client through one arm; sample the session's processes while it runs.
        ``cmd`` and ``find_pids`` (-> {role: host pid}) for other targets than this staging's;
        arms named "direct", "in-pod" or "port-forward" are baselines (nothing of podtwin to sample)."""
        name = f"ptbench-client-{self.tag}"
        baseline = arm in ("direct", "in-pod", "port-forward")
        find_pids = find_pids or self.session_pids
        if cmd is None:
            cmd = self.direct_cmd(self.client_args(), name) if arm == "direct" else \
                self.podtwin_cmd(self.client_args(), config)
        log(f"{arm}: {shlex.join(cmd)}")
        err = open(self.state_dir / f"{arm}.stderr", "w+")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, env={**self.env, **(env or {})})
        self.children.append(proc)
        events: queue.Queue = queue.Queue()
        watched: list[Watched] = []
        state = {"phase": "setup"}
        lock = threading.Lock()

        def reader() -> None:
            assert proc.stdout is not None
            for msg in json_events(proc.stdout):
                with lock:
                    if msg.get("event") == "resolved":
                        state["phase"] = "idle"
                    elif msg.get("event") == "start":
                        state["phase"] = msg["phase"]
                        for w in watched:
                            w.mark("start:" + msg["phase"])
                    elif msg.get("event") == "result":
                        for w in watched:
                            w.mark("end:" + msg["phase"])
                            w.sample(msg["phase"])
                        state["phase"] = "after:" + msg["phase"]
                events.put(msg)
            events.put(None)

        threading.Thread(target=reader, daemon=True).start()
        results: dict = {}
        deadline = time.monotonic() + self.args.max_phase * 6 + 120
        done = False
        found: set[str] = set()
        last_poll = 0.0
        if not baseline:
            watched.append(Watched("runner", proc.pid))
        while True:
            # the session's agent and sidecar exist before the app starts; the client waits 1 s
            # after its first lookup, so they are found before the first phase begins
            if not baseline and len(found) < 2 and state["phase"] in ("setup", "idle") \
                    and time.monotonic() - last_poll > 0.3:
                last_poll = time.monotonic()
                for role, pid in find_pids().items():
                    if role not in found:
                        found.add(role)
                        with lock:
                            watched.append(Watched(role, pid))
            if time.monotonic() > deadline:
                self.stop(proc)
                raise RuntimeError(f"{arm}: the client did not finish in time")
            try:
                msg = events.get(timeout=0.2)
            except queue.Empty:
                msg = ...
            if msg is None:
                break
            if isinstance(msg, dict):
                if msg.get("event") == "error":
                    raise RuntimeError(f"{arm}: client failed in {msg['phase']}: {msg['error']}")
                if msg.get("event") == "result":
                    results[msg["phase"]] = msg
                if msg.get("event") == "done":
                    done = True
            with lock:
                for w in watched:
                    w.sample(state["phase"])
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{arm}: the client did not exit")
        if code != 0 or not done:
            err.seek(0)
            raise RuntimeError(f"{arm}: exit code {code}: {err.read()[-1500:]}")
        if not baseline and len(found) < 2:
            log(f"podtwin: warning: found only {sorted(found)} of the agent/sidecar processes to sample")
        results["_watched"] = watched
        return results

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # podtwin removes its session on SIGTERM, as on Ctrl-C
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # -- start-up ------------------------------------------------------------------------------
    def first_line(self, cmd: list[str], timeout: float = 90) -> dict[str, float]:
        """Times (s since the command was started) of: its first stdout line ("first"), its exit
        ("exit"), and of podtwin's progress lines on stderr ("agent", "agent_ready", "bridged")."""
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, env=self.env)
        self.children.append(proc)
        times: dict[str, float] = {}
        errors: list[str] = []
        marks = {"starting the agent": "agent", "creating the agent Job": "agent", "agent ready": "agent_ready",
                 "network bridged": "bridged"}

        def read_out() -> None:
            assert proc.stdout is not None
            for _ in proc.stdout:
                times.setdefault("first", time.monotonic() - t0)

        def read_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                errors.append(line)
                for text, key in marks.items():
                    if text in line:
                        times.setdefault(key, time.monotonic() - t0)

        readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
        for r in readers:
            r.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"start-up run timed out: {shlex.join(cmd)}")
        times["exit"] = time.monotonic() - t0
        for r in readers:
            r.join(timeout=5)
        if code != 0 or "first" not in times:
            raise RuntimeError(f"start-up run failed ({code}): {shlex.join(cmd)}: {''.join(errors)[-800:]}")
        return times

    def startup(self) -> dict[str, list[dict[str, float]]]:
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "podtwin": []}
        n = self.args.startup_runs
        log(f"start-up: {n} runs per arm, alternating (plus one warm-up each)")
        for i in range(n + 1):
            d = self.first_line(self.direct_cmd(["echo", "ready"], f"ptbench-start-{self.tag}"))
            # without -q: podtwin's progress lines on stderr give the steps' times
            cmd = self.podtwin_cmd(["echo", "ready"])
            cmd.remove("-q")
            p = self.first_line(cmd)
            if i > 0:  # the first pair warms caches
                runs["direct"].append(d)
                runs["podtwin"].append(p)
        return runs

    def soak(self) -> dict:
        """``--soak`` concurrent connections through podtwin's outgoing path (ptbench soak): each
        answered a request when opened and again after being held; errors, and the RSS of the
        sidecar and the agent before the connections and while they are all held."""
        n = self.args.soak
        log(f"soak: {n} concurrent connections through podtwin")
        cmd = self.podtwin_cmd(["ptbench", "soak", "-addr", "backend:8080", "-c", str(n), "-hold", "5s",
                                "-wait", "3s"])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, env=self.env)
        self.children.append(proc)
        out: dict = {"before": {}, "held": {}}
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            pids = self.session_pids()
            time.sleep(0.2)
        time.sleep(1)
        out["before"] = {role: proc_status(pid).get("VmRSS", 0) for role, pid in pids.items()}
        assert proc.stdout is not None
        for msg in json_events(proc.stdout):
            if msg.get("event") == "held":
                out["held"] = {role: proc_status(pid).get("VmRSS", 0) for role, pid in pids.items()}
            elif msg.get("event") == "result":
                out["result"] = msg
        proc.wait(timeout=120)
        if "result" not in out:
            raise RuntimeError(f"soak: no result: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        return out

    # -- clean-up ------------------------------------------------------------------------------
    def session_selectors(self) -> list[str]:
        """Docker label filters for the podtwin sessions this run started (outgoing, incoming)."""
        return [f"label=podtwin.target=container/{t}" for t in (self.target, f"ptbench-web-{self.tag}")] \
            + [f"label=podtwin.session={s}" for s in self.kube_sessions]

    def cleanup(self) -> None:
        for proc in self.children:
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                log(f"clean-up: stopping pid {proc.pid}: {exc}")
        if self.kube_cleanup is not None:
            try:
                self.kube_cleanup()
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                log(f"clean-up: kubernetes: {exc}")
        for selector in (f"label={self.label}", *self.session_selectors()):
            ids = docker("ps", "-aq", "--filter", selector, check=False, timeout=30).stdout.split()
            if ids:
                docker("rm", "-f", *ids, check=False, timeout=60)
        # the session's own networks, if any, then ours
        for selector in (*self.session_selectors(), f"label={self.label}"):
            nets = docker("network", "ls", "-q", "--filter", selector, check=False, timeout=30).stdout.split()
            if nets:
                docker("network", "rm", *nets, check=False, timeout=60)
        if self.image_built and not self.args.keep_image:
            docker("image", "rm", "-f", self.image, check=False, timeout=60)
        if self.variant_built:
            docker("image", "rm", "-f", self.variant_image, check=False, timeout=60)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        left = docker("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
        for selector in self.session_selectors():
            left += docker("ps", "-aq", "--filter", selector, check=False).stdout.split()
        left += docker("network", "ls", "-q", "--filter", f"label={self.label}", check=False).stdout.split()
        if left:
            log(f"clean-up incomplete, still present: {left}")
        else:
            log("clean-up: everything this run created is gone")


# --- facts and report -----------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        kib = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal")))
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    image_py = docker("run", "--rm", PODTWIN_IMAGE, "python", "-c",
                      "import sys, asyncssh, cryptography; print(sys.version.split()[0], asyncssh.__version__,"
                      " cryptography.__version__)", check=False, timeout=60).stdout.split()
    image_id = docker("image", "inspect", "-f", "{{.Id}}", PODTWIN_IMAGE, check=False).stdout.strip()
    image_hash = docker("image", "inspect", "-f", '{{index .Config.Labels "podtwin.source-hash"}}',
                        PODTWIN_IMAGE, check=False).stdout.strip()
    try:
        from podtwin.runner.tools.images import source_hash
        fresh = "yes" if source_hash() == image_hash else "NO (rebuild with `make images`)"
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        fresh = "?"
    commit = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = sh("git", "-C", str(REPO), "status", "--porcelain", "--", "runner", "agent")
    return {
        "nproc": sh("nproc"),
        "kernel": platform.release(),
        "cpu": cpu,
        "memory": mem,
        "docker": sh("docker", "version", "--format", "{{.Server.Version}}"),
        "go": sh("go", "version").replace("go version ", ""),
        "podtwin commit": commit + (" (runner/ or agent/ modified in the working tree)" if dirty else ""),
        PODTWIN_IMAGE: f"{image_id[7:19]} (up to date with the working tree: {fresh})",
        "agent/sidecar runtime": (f"python {image_py[0]}, asyncssh {image_py[1]}, cryptography {image_py[2]}"
                                  if len(image_py) == 3 else "?"),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def throughput(res: dict, phase: str) -> tuple[float | None, list[float]]:
    r = res.get(phase)
    if not r or not r["seconds"]:
        return None, []
    rates = [r["bytes"] / s / MB for s in r["seconds"]]
    return statistics.median(rates), rates


def lat(res: dict, phase: str) -> tuple[float, float, int]:
    us = res.get(phase, {}).get("us") or []
    return pct(us, 50) / 1000, pct(us, 99) / 1000, len(us)


def _cpu_pct(w: Watched, phase: str, res: dict) -> str:
    secs = res.get(phase, {}).get("seconds") or []
    if f"start:{phase}" in w.cpu_at and f"end:{phase}" in w.cpu_at and secs:
        return f"{100 * (w.cpu_at[f'end:{phase}'] - w.cpu_at[f'start:{phase}']) / sum(secs):.0f}"
    return "n/a"


def _mib(kib: int) -> str:
    return fmt(kib / 1024, 1) if kib else "n/a"


def report(b: Bench, facts: dict, direct: dict, pod: dict, variant: dict, start: dict, command: str,
           started: dt.datetime, elapsed: float, soak: dict | None = None, image_mb: float | None = None) -> str:
    a = b.args
    var = bool(variant)
    rows = []
    for phase, what in (("download", "Download"), ("upload", "Upload")):
        d, _ = throughput(direct, phase)
        p, prates = throughput(pod, phase)
        v, _ = throughput(variant, phase)
        if d is None and p is None:
            continue
        rows.append([f"{what} throughput, MB/s (median of {len(prates)} × {a.mb:g} MB; higher is better)",
                     fmt(d, 0), fmt(p, 1), ratio(p, d), fmt(v, 1)])
    for phase, what in (("keepalive", "HTTP request, one kept-alive connection"),
                        ("newconn", "HTTP request, new TCP connection each"),
                        ("dns", "DNS lookup of `backend` (A, uncached)")):
        d50, d99, dn = lat(direct, phase)
        p50, p99, pn = lat(pod, phase)
        v50, v99, _ = lat(variant, phase)
        if not dn and not pn:
            continue
        rows.append([f"{what}: p50, ms (n={pn})", fmt(d50, 3), fmt(p50, 3), ratio(p50, d50, "ms"), fmt(v50, 3)])
        rows.append([f"{what}: p99, ms", fmt(d99, 3), fmt(p99, 3), ratio(p99, d99, "ms"), fmt(v99, 3)])
    if start["podtwin"]:
        n = len(start["podtwin"])
        med = lambda arm, key: statistics.median(x[key] for x in start[arm])  # noqa: E731
        rows.append([f"Start-up: command to the app's first output line, s (median of {n})",
                     fmt(med("direct", "first")), fmt(med("podtwin", "first")),
                     ratio(med("podtwin", "first"), med("direct", "first"), "s"), "not measured"])
        rows.append([f"Whole run of `echo ready` incl. teardown, s (median of {n})",
                     fmt(med("direct", "exit")), fmt(med("podtwin", "exit")),
                     ratio(med("podtwin", "exit"), med("direct", "exit"), "s"), "not measured"])

    if soak:
        r = soak["result"]
        rows.append([f"Concurrent connections through the outgoing path ({r['connections']}, each answering when "
                     "opened and after 5 s held): answered / failed", "", f"{r['ok']} / {r['failed']}",
                     r.get("first_error") or "no error", ""])
        for role in ("sidecar", "agent"):
            if role in soak["before"] and role in soak["held"]:
                rows.append([f"{role} RSS before the connections → with all held, MiB", "",
                             f"{_mib(soak['before'][role])} → {_mib(soak['held'][role])}", "", ""])
    if image_mb:
        rows.append(["Image a cluster pulls for the agent (agent image, uncompressed), MB", "", f"{image_mb:.0f}",
                     "", ""])

    out = [f"Run on {started.strftime('%Y-%m-%d %H:%M %Z').strip()} in {elapsed:.0f} s with:", "",
           "```", command, "```", ""]
    out += ["| Machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()]
    head = "| Measurement | direct | podtwin | podtwin / direct |"
    rule = "|---|---:|---:|---:|"
    if var:
        head += f" experiment: podtwin, sidecar link cipher `{a.cipher_variant}` |"
        rule += "---:|"
    out += ["", head, rule]
    out += ["| " + " | ".join(r if var else r[:4]) + " |" for r in rows]

    if start["podtwin"] and all(k in x for x in start["podtwin"] for k in ("agent", "agent_ready", "bridged")):
        med = lambda f: statistics.median(f(x) for x in start["podtwin"])  # noqa: E731
        steps = [
            ("runner start-up: Python imports, config, Docker checks, session key, guard",
             med(lambda x: x["agent"])),
            ("agent container started, its SSH server up, runner's link connected",
             med(lambda x: x["agent_ready"] - x["agent"])),
            ("sidecar container started, link connected, iptables/routes applied",
             med(lambda x: x["bridged"] - x["agent_ready"])),
            ("app container created and started, to its first output line",
             med(lambda x: x["first"] - x["bridged"])),
            ("after the app's output: app exit, teardown of app, sidecar, agent",
             med(lambda x: x["exit"] - x["first"])),
        ]
        out += ["", "Where podtwin's start-up time goes (medians; from the arrival times of podtwin's "
                "progress lines on stderr):", "", "| Step | s |", "|---|---:|"]
        out += [f"| {name} | {fmt(v)} |" for name, v in steps]

    for title, res in (("podtwin", pod), (f"experiment (cipher `{a.cipher_variant}`)", variant)):
        watched: list[Watched] = res.get("_watched", []) if res else []
        if not watched:
            continue
        out += ["", f"Memory and CPU of podtwin's processes, {title} run (read from the host's `/proc/PID`; "
                "the runner is the `podtwin` CLI process on the host):", "",
                "| Process | RSS idle, MiB | RSS peak during download, MiB | RSS peak during upload, MiB "
                "| VmHWM at the end, MiB | CPU during download, % of one core | CPU during upload, % of one core |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for w in watched:
            out.append(f"| {w.name} | {_mib(w.rss_max.get('idle', 0))} | {_mib(w.rss_max.get('download', 0))} | "
                       f"{_mib(w.rss_max.get('upload', 0))} | {_mib(w.hwm)} | {_cpu_pct(w, 'download', res)} | "
                       f"{_cpu_pct(w, 'upload', res)} |")
    detail = []
    for arm, res in (("direct", direct), ("podtwin", pod), ("experiment", variant)):
        for phase in ("download", "upload"):
            _, rates = throughput(res, phase)
            if rates:
                detail.append(f"{arm} {phase} MB/s: " + ", ".join(f"{r:.1f}" for r in rates))
    for arm in ("direct", "podtwin"):
        if start[arm]:
            detail.append(f"{arm} start-up to first line, s: " + ", ".join(f"{x['first']:.2f}" for x in start[arm]))
    out += [""] + (["Raw figures: " + "; ".join(detail) + "."] if detail else [])
    out += [f"Load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}."]
    return "\n".join(out) + "\n"


DEFAULT_DOC = """# Performance

What podtwin costs compared with running the same client directly in the target's network
namespace. The section between the markers below is written by `make bench` (`bench/run.py`);
see the script's docstring for the method.

""" + RESULTS_START + "\n" + RESULTS_END + "\n"


def write_doc(path: Path, block: str, start: str = RESULTS_START, end: str = RESULTS_END) -> None:
    text = path.read_text() if path.exists() else DEFAULT_DOC
    if start not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + start + "\n" + end + "\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + start + "\n" + block + end + tail)


def section_head(command: str, started: dt.datetime, elapsed: float, note: str = "") -> str:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"Run on {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, this section {elapsed:.0f} s, with:\n\n"
            f"```\n{command}\n```\n\n{note}Load average at the end of the section: {load}.\n\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=200, help="MB (10^6 bytes) per download/upload (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="downloads and uploads per arm (default 3; 0 skips)")
    p.add_argument("--no-upload", action="store_true", help="skip the upload measurement")
    p.add_argument("--keepalive", type=int, default=2000, help="requests over one kept-alive connection")
    p.add_argument("--newconn", type=int, default=500, help="requests with a new TCP connection each")
    p.add_argument("--dns", type=int, default=500, help="DNS lookups")
    p.add_argument("--startup-runs", type=int, default=5, help="start-up runs per arm (0 skips)")
    p.add_argument("--soak", type=int, default=1000,
                   help="concurrent connections held through podtwin's outgoing path (0 skips)")
    p.add_argument("--max-phase", type=int, default=60, help="upper bound on each client phase, s")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md",
                   help="markdown file to update (default docs/performance.md)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--keep-image", action="store_true", help="keep the bench image afterwards")
    p.add_argument("--no-outgoing", action="store_true",
                   help="skip the outgoing section (throughput, latency, DNS, start-up, memory)")
    p.add_argument("--no-incoming", action="store_true", help="skip the incoming section (steal/filter/mirror)")
    p.add_argument("--incoming-requests", type=int, default=2000,
                   help="incoming: requests over one kept-alive connection per latency phase")
    p.add_argument("--incoming-newconn", type=int, default=300,
                   help="incoming: requests with a new connection each per latency phase (0 skips)")
    p.add_argument("--rps-conc", type=int, default=8, help="incoming: connections of the RPS phases")
    p.add_argument("--rps-seconds", type=float, default=8, help="incoming: duration of each RPS phase, s")
    p.add_argument("--no-files", action="store_true", help="skip the files section (the target's files)")
    p.add_argument("--files-mb", type=float, default=100, help="files: MB of the large file (default 100)")
    p.add_argument("--small-files", type=int, default=200, help="files: small files (default 200)")
    p.add_argument("--no-kube", action="store_true", help="skip the Kubernetes section")
    p.add_argument("--kubeconfig", type=Path,
                   default=Path(os.environ.get("KUBECONFIG") or "/var/lib/podtwin-cluster/admin.kubeconfig"),
                   help="Kubernetes section: the cluster (default $KUBECONFIG or the test cluster's)")
    p.add_argument("--kube-mb", type=float, default=100, help="Kubernetes section: MB per download/upload")
    p.add_argument("--kube-startup-runs", type=int, default=3, help="Kubernetes section: start-up runs (0 skips)")
    p.add_argument("--kube-files-mb", type=float, default=50, help="Kubernetes section: MB of the pod's large file")
    p.add_argument("--cipher-variant", default="", metavar="CIPHER",
                   help="also run podtwin with the sidecar's link patched to use only CIPHER (an "
                        "experiment in a derived image, e.g. chacha20-poly1305@openssh.com; "
                        "default: off)")
    args = p.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    if os.environ.get("PODTWIN_IMAGE"):
        command = f"PODTWIN_IMAGE={shlex.quote(PODTWIN_IMAGE)} {command}"
    if os.environ.get("MAKELEVEL"):
        command = "make bench   # = " + command

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    started = dt.datetime.now().astimezone()
    t0 = time.monotonic()
    bench = Bench(args)
    blocks: list[tuple[str, str, str]] = []   # (block, start marker, end marker)
    failed: list[str] = []

    def outgoing() -> None:
        direct = bench.run_suite("direct")
        pod = bench.run_suite("podtwin")
        variant = {}
        if args.cipher_variant:
            config = bench.build_variant(args.cipher_variant)
            if config is not None:
                variant = bench.run_suite("variant", config, env={"PODTWIN_IMAGE": bench.variant_image})
        start = bench.startup() if args.startup_runs > 0 else {"direct": [], "podtwin": []}
        soak = bench.soak() if args.soak > 0 else None
        size = docker("image", "inspect", "-f", "{{.Size}}", agent_image_name(), check=False).stdout.strip()
        blocks.append((report(bench, facts, direct, pod, variant, start, command, started,
                              time.monotonic() - t0, soak, int(size) / MB if size.isdigit() else None),
                       RESULTS_START, RESULTS_END))

    def incoming() -> None:
        from incoming import Incoming
        t1, at = time.monotonic(), dt.datetime.now().astimezone()
        inc = Incoming(bench)
        inc.run()
        blocks.append((section_head(command, at, time.monotonic() - t1) + inc.report(),
                       INCOMING_START, INCOMING_END))

    def files() -> None:
        from files import FilesSection
        t1, at = time.monotonic(), dt.datetime.now().astimezone()
        section = FilesSection(bench)
        try:
            section.run()
        finally:
            section.cleanup()
        blocks.append((section_head(command, at, time.monotonic() - t1) + section.report(), FILES_START, FILES_END))

    def kubernetes() -> None:
        from kube_session import KubeSection
        t1, at = time.monotonic(), dt.datetime.now().astimezone()
        kube = KubeSection(bench)
        try:
            table = kube.run()
        finally:
            kube.cleanup()  # before the next section; bench.cleanup() calls it again, harmlessly
        if table is None:
            log(f"kubernetes section skipped: {kube.skipped}")
        else:
            blocks.append((section_head(command, at, time.monotonic() - t1, kube.note()) + table,
                           KUBE_START, KUBE_END))

    try:
        facts = machine_facts()
        bench.build_image()
        bench.staging()
        # a section that fails is reported and left out; the others still run and are written
        for name, skip, section in (("outgoing", args.no_outgoing, outgoing),
                                    ("incoming", args.no_incoming, incoming),
                                    ("files", args.no_files, files),
                                    ("kubernetes", args.no_kube, kubernetes)):
            if skip:
                continue
            try:
                section()
            except Exception as exc:  # noqa: BLE001 - e.g. a session that failed, the kubernetes client's errors
                log(f"{name} section failed: {type(exc).__name__}: {exc}")
                failed.append(name)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, then clean up
        log(f"failed: {exc}")
        return 1
    finally:
        bench.cleanup()
    for block, start_marker, end_marker in blocks:
        print(block)
        if not args.no_write:
            write_doc(args.output, block, start_marker, end_marker)
    if blocks and not args.no_write:
        log(f"wrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")
    if failed:
        log(f"failed sections (their results in the doc were left as they were): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
