"""Incoming traffic benchmark (a section of ``bench/run.py``; issue #6).

On the run's private staging network: a **target** serving HTTP on :80 (``ptbench serve -name
target``, network alias ``web``) and a **caller** container that calls it as another service of
the staging would (``docker exec CALLER ptbench load -url http://web/ping ...``). The local app of
every podtwin session is the same server image (``ptbench serve -addr :80 -name local``), so each
answer says who served it (``X-Served-By``) and the load fails if a request went the wrong way.

Phases, in one run, each a ``ptbench load``:

* **direct** (no session): latency over one kept-alive connection, with a new connection per
  request, and requests per second with ``--rps-conc`` kept-alive connections;
* **steal** (whole port): the same, every answer from the local app;
* **filter** (``http_filter.header_filter: ^x-podtwin-user: alice$``): latency and RPS of matching
  requests (-> local app) and of non-matching ones (-> the target, through the filter);
* **mirror**: the target's latency and RPS while a mirror session copies its traffic to the local
  app (which reports how many copies it got);
* **direct again** at the end: the baseline once more, to show the machine's drift over the run.

Sessions are started with ``podtwin container run -f CONFIG --target container/TARGET`` and
measured once stderr says ``stealing port 80`` / ``matching the HTTP filter`` / ``mirroring port
80``; each is stopped (SIGTERM, as Ctrl-C) before the next one starts.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from run import Bench

MARKERS = {"steal": "stealing port 80", "filter": "matching the HTTP filter", "mirror": "mirroring port 80"}
CONFIGS = {
    "steal": {"mode": "steal"},
    "filter": {"mode": "steal", "http_filter": {"header_filter": "^x-podtwin-user: alice$"}},
    "mirror": {"mode": "mirror"},
}
ALICE = "x-podtwin-user: alice"
BOB = "x-podtwin-user: bob"


class Incoming:
    def __init__(self, bench: "Bench") -> None:
        from run import docker, log
        self.b = bench
        self.docker, self.log = docker, log
        self.web = f"ptbench-web-{bench.tag}"
        self.caller = f"ptbench-caller-{bench.tag}"
        self.results: dict[str, dict] = {}
        self.cpu: dict[str, dict[str, float]] = {}
        self.copies: dict[str, int] = {}

    # -- staging -----------------------------------------------------------------------------
    def staging(self) -> None:
        b, docker = self.b, self.docker
        self.log(f"incoming: target {self.web} (HTTP on :80, alias web), caller {self.caller}")
        docker("run", "-d", "--name", self.web, "--label", b.label, "--network", b.network,
               "--network-alias", "web", b.image, "ptbench", "serve", "-addr", ":80", "-name", "target")
        docker("run", "-d", "--name", self.caller, "--label", b.label, "--network", b.network,
               b.image, "sleep", "86400")
        self.wait_target()

    def wait_target(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            probe = self.docker("exec", self.caller, "wget", "-qO-", "http://web/ping", check=False, timeout=10)
            if probe.stdout.strip() == "pong":
                return
            time.sleep(0.2)
        raise RuntimeError(f"incoming: the target did not answer within {within:.0f}s")

    # -- one load ----------------------------------------------------------------------------
    def load(self, name: str, expect: str, *, n: int = 0, conc: int = 1, newconn: bool = False,
             header: str = "", seconds: float = 0) -> dict:
        a = self.b.args
        cmd = ["ptbench", "load", "-url", "http://web/ping", "-phase", name, "-expect", expect,
               "-c", str(conc), "-warm", "20" if not newconn else "5"]
        if n:
            cmd += ["-n", str(n), "-duration", f"{a.max_phase}s"]
        else:
            cmd += ["-duration", f"{seconds}s"]
        if newconn:
            cmd.append("-newconn")
        if header:
            cmd += ["-H", header]
        from run import json_events
        self.log(f"incoming: {name}")
        proc = self.docker("exec", self.caller, *cmd, check=False, timeout=a.max_phase + 60)
        result = None
        for msg in json_events(proc.stdout.splitlines()):
            if msg.get("event") == "error":
                raise RuntimeError(f"incoming {name}: {msg['error']}")
            if msg.get("event") == "result":
                result = msg
        if result is None or proc.returncode != 0:
            raise RuntimeError(f"incoming {name}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        result["warm"] = 20 * conc if not newconn else 5 * conc
        self.results[name] = result
        return result

    def latency_set(self, prefix: str, expect: str, header: str = "", newconn: bool = True) -> None:
        a = self.b.args
        self.load(f"{prefix}:keepalive", expect, n=a.incoming_requests, header=header)
        if newconn and a.incoming_newconn > 0:
            self.load(f"{prefix}:newconn", expect, n=a.incoming_newconn, newconn=True, header=header)

    def rps(self, prefix: str, expect: str, header: str = "") -> dict:
        a = self.b.args
        return self.load(f"{prefix}:rps", expect, conc=a.rps_conc, seconds=a.rps_seconds, header=header)

    # -- sessions ----------------------------------------------------------------------------
    def session(self, kind: str) -> tuple[subprocess.Popen, Path, Path]:
        b = self.b
        config = b.state_dir / f"incoming-{kind}.json"
        config.write_text(json.dumps({"feature": {"network": {"incoming": CONFIGS[kind]}}}))
        cmd = [*b.podtwin, "container", "run", "-f", str(config), "--target", f"container/{self.web}",
               b.image, "ptbench", "serve", "-addr", ":80", "-name", "local"]
        out, err = b.state_dir / f"incoming-{kind}.stdout", b.state_dir / f"incoming-{kind}.stderr"
        self.log(f"incoming: {kind} session: {' '.join(cmd[1:])}")
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=b.env)
        b.children.append(proc)
        deadline = time.monotonic() + 90
        while MARKERS[kind] not in err.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                b.stop(proc)
                raise RuntimeError(f"incoming: the {kind} session did not start: {err.read_text()[-1000:]}")
            time.sleep(0.1)
        time.sleep(0.3)  # let the agent's rules settle before the first request
        return proc, out, err

    def end_session(self, proc: subprocess.Popen) -> None:
        self.b.stop(proc)
        self.wait_target()  # the target serves again (no rule left behind)

    def served(self, out: Path) -> int:
        """The local app's last reported request count (its {"served": N} lines)."""
        n = 0
        for line in out.read_text().splitlines():
            try:
                n = max(n, int(json.loads(line).get("served", 0)))
            except (ValueError, AttributeError):
                continue
        return n

    def cpu_during(self, key: str, fn) -> None:
        """Run fn, and record the CPU seconds the session's agent and sidecar used meanwhile."""
        from run import proc_cpu_seconds
        pids = self.b.session_pids(self.web)
        before = {role: proc_cpu_seconds(pid) for role, pid in pids.items()}
        t0 = time.monotonic()
        fn()
        secs = time.monotonic() - t0
        self.cpu[key] = {}
        for role, pid in pids.items():
            after = proc_cpu_seconds(pid)
            if after is not None and before[role] is not None:
                self.cpu[key][role] = 100 * (after - before[role]) / secs

    # -- the section -------------------------------------------------------------------------
    def run(self) -> None:
        self.staging()
        self.latency_set("direct", "target")
        self.rps("direct", "target")

        proc, _, _ = self.session("steal")
        self.latency_set("steal", "local")
        self.cpu_during("steal:rps", lambda: self.rps("steal", "local"))
        self.end_session(proc)

        proc, _, _ = self.session("filter")
        self.latency_set("filter-match", "local", ALICE)
        self.latency_set("filter-miss", "target", BOB)
        self.cpu_during("filter-match:rps", lambda: self.rps("filter-match", "local", ALICE))
        self.cpu_during("filter-miss:rps", lambda: self.rps("filter-miss", "target", BOB))
        self.end_session(proc)

        proc, out, _ = self.session("mirror")
        start = self.served(out)
        self.latency_set("mirror", "target", newconn=False)
        self.cpu_during("mirror:rps", lambda: self.rps("mirror", "target"))
        time.sleep(1.5)  # the app reports its count once a second
        sent = sum(self.results[k]["requests"] + self.results[k]["warm"] for k in ("mirror:keepalive", "mirror:rps"))
        self.copies = {"sent": sent, "received": self.served(out) - start}
        self.end_session(proc)

        self.latency_set("direct-again", "target", newconn=False)
        self.rps("direct-again", "target")

    # -- report ------------------------------------------------------------------------------
    def report(self) -> str:
        from run import fmt, ratio
        r = self.results
        a = self.b.args

        def ms(key: str, p: str) -> float:
            x = r.get(key, {}).get(f"p{p}_us", -1)
            return x / 1000 if x is not None and x >= 0 else math.nan

        rows = []
        lat_rows = [
            ("steal:keepalive", "direct:keepalive", "Stolen request (whole port -> local app), kept-alive connection"),
            ("steal:newconn", "direct:newconn", "Stolen request, new TCP connection each"),
            ("filter-match:keepalive", "direct:keepalive", "Filtered steal, matching request (-> local app), kept-alive"),
            ("filter-match:newconn", "direct:newconn", "Filtered steal, matching request, new connection each"),
            ("filter-miss:keepalive", "direct:keepalive", "Filtered steal, non-matching request (-> target through the filter), kept-alive"),
            ("filter-miss:newconn", "direct:newconn", "Filtered steal, non-matching request, new connection each"),
            ("mirror:keepalive", "direct:keepalive", "Target while mirrored (the target answers), kept-alive"),
        ]
        for key, base, what in lat_rows:
            if key not in r:
                continue
            n = r[key]["requests"]
            for p in ("50", "99"):
                rows.append([f"{what}: p{p}, ms" + (f" (n={n})" if p == "50" else ""),
                             fmt(ms(base, p), 3), fmt(ms(key, p), 3), ratio(ms(key, p), ms(base, p), "ms", 3)])
        for key, what in (("steal:rps", "Whole-port steal (-> local app)"),
                          ("filter-match:rps", "Filtered steal, matching (-> local app)"),
                          ("filter-miss:rps", "Filtered steal, non-matching (-> target)"),
                          ("mirror:rps", "Target while mirrored")):
            if key not in r:
                continue
            d, x = r["direct:rps"]["rps"], r[key]["rps"]
            rows.append([f"{what}: requests/s, {a.rps_conc} kept-alive connections, {a.rps_seconds:g} s "
                         "(higher is better)", fmt(d, 0), fmt(x, 0), ratio(x, d)])
            rows.append([f"{what}: p99 under that load, ms", fmt(ms("direct:rps", "99"), 2),
                         fmt(ms(key, "99"), 2), ratio(ms(key, "99"), ms("direct:rps", "99"))])
        out = ["| Incoming measurement | direct (no session) | with the session | session / direct |",
               "|---|---:|---:|---:|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        if self.cpu:
            out += ["", "CPU of the session's containers during the RPS phases (host `/proc`; % of one core):", "",
                    "| Phase | agent | sidecar |", "|---|---:|---:|"]
            for key, roles in self.cpu.items():
                out.append(f"| {key.replace(':rps', '')} | {fmt(roles.get('agent'), 0)} | {fmt(roles.get('sidecar'), 0)} |")
        extra = []
        if self.copies:
            extra.append(f"mirror: the local app got {self.copies['received']} copies of the "
                         f"{self.copies['sent']} requests sent while mirrored (warm-ups included)")
        if "direct-again:keepalive" in r:
            extra.append("direct baseline at the end of the section (drift check): kept-alive p50/p99 "
                         f"{fmt(ms('direct-again:keepalive', '50'), 3)}/{fmt(ms('direct-again:keepalive', '99'), 3)} ms, "
                         f"{fmt(r['direct-again:rps']['rps'], 0)} requests/s (at the start: "
                         f"{fmt(ms('direct:keepalive', '50'), 3)}/{fmt(ms('direct:keepalive', '99'), 3)} ms, "
                         f"{fmt(r['direct:rps']['rps'], 0)} requests/s)")
        if extra:
            text = "; ".join(extra)
            out += ["", text[0].upper() + text[1:] + "."]
        return "\n".join(out) + "\n"
