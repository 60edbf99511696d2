"""Kubernetes benchmark (a section of ``bench/run.py``; issue #5): a ``deploy/`` target.

In a namespace of its own (``bench-<tag>``, labelled ``podtwin-bench=<tag>``, deleted at the end,
also on an error or Ctrl-C) on the test cluster: a **backend** Deployment serving ``ptbench
serve`` behind a Service ``backend:8080``, and a **target** Deployment ``api`` (the same image,
sleeping). The run's ptbench image is copied into the cluster's containerd (and removed from it
at the end); the podtwin image is loaded too, so the start-up measures an agent whose image is
already on the node. Then, in one run, the same client and command (``bench/run.py``'s):

* **in-pod** (the baseline): ``kubectl exec deploy/api -- ptbench client ...`` -- in the target
  pod itself, with its resolver;
* **podtwin**: ``podtwin container run -n NS --target deploy/api IMAGE ptbench client ...`` -- a
  local container, its traffic through the sidecar, the port-forward, the agent Job's pod.

Measured: bulk download/upload (``--kube-mb``), small-request latency (kept-alive and new
connection), DNS, session start-up (``echo ready``: command to the first output line, against
``kubectl exec deploy/api -- echo ready``), and the resident memory of the agent -- read on the
node from ``/proc/PID/status`` of the agent container's main process, found from its container ID
as the agent itself finds the target's (``podtwin.agent.target.nsenter.main_pid``). The cluster must be
on this machine for that; otherwise the memory is "n/a".

Skipped, with the reason in the log, when no cluster answers at ``--kubeconfig``.
"""
from __future__ import annotations

import glob
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from run import Bench

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "integration" / "cluster"


def kubectl_binary() -> str | None:
    """The test cluster's kubectl (``/usr/bin/kubectl`` may be a wrapper that does not work here)."""
    found = sorted(glob.glob(str(Path.home() / ".cache/podtwin/cluster/*/bin/kubectl")))
    return found[-1] if found else shutil.which("kubectl")


class KubeSection:
    def __init__(self, bench: "Bench") -> None:
        from run import PODTWIN_IMAGE, log
        from podtwin.runner.config.image import agent_image_name
        self.b, self.log, self.podtwin_image, self.agent_image = bench, log, PODTWIN_IMAGE, agent_image_name()
        self.kubeconfig: Path = bench.args.kubeconfig
        self.ns = f"bench-{bench.tag}"
        self.skipped = ""
        self.api = None
        self.ns_created = False
        self.image_loaded = False
        self.kubectl = kubectl_binary()
        self.load_avg = ""

    # -- cluster -----------------------------------------------------------------------------
    def connect(self) -> bool:
        if not self.kubeconfig.exists():
            self.skipped = f"no kubeconfig at {self.kubeconfig} (give --kubeconfig, or --no-kube)"
            return False
        if self.kubectl is None:
            self.skipped = "no kubectl binary for the in-pod arm"
            return False
        try:
            from kubernetes import client, config
            self.api = config.new_client_from_config(config_file=str(self.kubeconfig))
            self.core = client.CoreV1Api(self.api)
            self.apps = client.AppsV1Api(self.api)
            nodes = self.core.list_node(_request_timeout=10).items
        except Exception as exc:  # noqa: BLE001 - any failure means: no cluster to measure
            self.skipped = f"no cluster answers at {self.kubeconfig}: {str(exc).splitlines()[0][:200]}"
            return False
        if not any(c.type == "Ready" and c.status == "True" for n in nodes for c in n.status.conditions or []):
            self.skipped = "the cluster has no Ready node"
            return False
        return True

    def load_images(self) -> None:
        """Copy the ptbench image (and the podtwin and agent images) into the test cluster's containerd."""
        for image in (self.b.image, self.podtwin_image, self.agent_image):
            self.log(f"kubernetes: loading {image} into the cluster")
            if image == self.b.image:
                self.image_loaded = True  # from here on, remove it at the end
            proc = subprocess.run([str(CLUSTER / "load.sh"), image], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"loading {image} into the cluster failed: {proc.stderr.strip()[-300:]}")

    def staging(self) -> None:
        from kubernetes import client, utils
        b = self.b
        self.log(f"kubernetes: namespace {self.ns}: backend Deployment + Service backend:8080, target deploy/api")
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.ns, labels={"podtwin-bench": b.tag})))
        self.ns_created = True
        deadline = time.monotonic() + 60
        while True:  # pods need the namespace's default ServiceAccount
            try:
                self.core.read_namespaced_service_account("default", self.ns, _request_timeout=10)
                break
            except client.exceptions.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

        def deployment(name: str, command: list[str], data: bool = False) -> dict:
            labels = {"app": name, "podtwin-bench": b.tag}
            container = {"name": name, "image": b.image, "imagePullPolicy": "IfNotPresent", "command": command}
            volumes = {}
            if data:   # the files section's: an emptyDir the pod fills at start
                container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
                volumes = {"volumes": [{"name": "data", "emptyDir": {}}]}
            return {"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "labels": {"podtwin-bench": b.tag}},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                             "template": {"metadata": {"labels": labels}, "spec": {
                                 "terminationGracePeriodSeconds": 1, "containers": [container], **volumes}}}}
        size, n = int(b.args.kube_files_mb * 1_000_000), b.args.small_files
        fill = (f"head -c {size} /dev/urandom > /data/big && mkdir -p /data/small && "
                f"for i in $(seq 1 {n}); do head -c 1024 /dev/urandom > /data/small/f$i; done && "
                "touch /data/ready; exec sleep 86400")
        for manifest in (
            deployment("backend", ["ptbench", "serve", "-addr", ":8080"]),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "labels": {"podtwin-bench": b.tag}},
             "spec": {"selector": {"app": "backend"}, "ports": [{"port": 8080, "protocol": "TCP"}]}},
            deployment("api", ["sh", "-c", fill], data=True),
        ):
            utils.create_from_dict(self.api, manifest, namespace=self.ns)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            pods = self.core.list_namespaced_pod(self.ns, _request_timeout=10).items
            if len(pods) == 2 and all(p.status.phase == "Running" and all(
                    c.ready for c in p.status.container_statuses or []) for p in pods):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("kubernetes: the backend and target pods did not run within 180 s")
        deadline = time.monotonic() + 120
        while self.exec(["ls", "/data/ready"], timeout=15).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("kubernetes: the target pod did not fill its emptyDir within 120 s")
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while self.exec(["wget", "-qO-", "http://backend:8080/ping"], timeout=15).stdout.strip() != "pong":
            if time.monotonic() > deadline:
                raise RuntimeError("kubernetes: the backend Service did not answer the target pod within 60 s")
            time.sleep(0.5)

    def kubectl_cmd(self, command: list[str]) -> list[str]:
        return [self.kubectl, "--kubeconfig", str(self.kubeconfig), "-n", self.ns, "exec", "deploy/api",
                "-c", "api", "--", *command]

    def exec(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.kubectl_cmd(command), capture_output=True, text=True, timeout=timeout)

    def podtwin_cmd(self, command: list[str], quiet: bool = True) -> list[str]:
        return [*self.b.podtwin, "container", "run", *(["-q"] if quiet else []), "-n", self.ns,
                "--target", "deploy/api", self.b.image, *command]

    # -- the session's processes ---------------------------------------------------------------
    def session_pids(self) -> dict[str, int]:
        """Host PIDs of the session's agent (its pod's main process, found by container ID on
        this node) and sidecar (a local Docker container)."""
        from podtwin.agent.target.nsenter import NamespaceError, main_pid
        from run import docker
        out: dict[str, int] = {}
        try:
            pods = self.core.list_namespaced_pod(self.ns, label_selector="podtwin.session", _request_timeout=5).items
        except Exception:  # noqa: BLE001 - try again at the next poll
            return out
        for pod in pods:
            session = pod.metadata.labels.get("podtwin.session", "")
            if session and session not in self.b.kube_sessions:
                self.b.kube_sessions.append(session)
            for status in pod.status.container_statuses or []:
                if status.name == "agent" and status.container_id and status.state and status.state.running:
                    try:
                        out["agent"] = main_pid(status.container_id)
                    except (NamespaceError, OSError):
                        pass
            ids = docker("ps", "-q", "--filter", f"label=podtwin.session={session}", "--filter",
                         "label=podtwin.role=sidecar", check=False, timeout=20).stdout.split()
            if ids:
                pid = docker("inspect", "-f", "{{.State.Pid}}", ids[0], check=False, timeout=20).stdout.strip()
                if pid.isdigit() and pid != "0":
                    out["sidecar"] = int(pid)
        return out

    # -- the section -------------------------------------------------------------------------
    def run(self) -> str | None:
        self.b.kube_cleanup = self.cleanup
        if not self.connect():
            return None
        self.load_images()
        self.staging()
        self.b.env["KUBECONFIG"] = str(self.kubeconfig)
        self.b.env["PODTWIN_AGENT_IMAGE"] = self.agent_image   # the image loaded above, not the release's name
        client = self.b.client_args(self.b.args.kube_mb)
        self.in_pod = self.b.run_suite("in-pod", cmd=self.kubectl_cmd(client))
        self.forward = self.port_forward()
        self.pod = self.b.run_suite("podtwin", cmd=self.podtwin_cmd(client), find_pids=self.session_pids)
        self.start = self.startup()
        self.files = self.files_run()
        self.load_avg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        return self.report()

    def files_run(self) -> dict[str, dict]:
        """The target's files (the pod's emptyDir at /data): the same reader in the pod and through
        podtwin, and `kubectl exec cat` of the same files."""
        import statistics
        reader = ["ptbench", "files", "-big", "/data/big", "-small", "/data/small"]
        out: dict[str, dict] = {}
        for arm, cmd in (("in the pod", self.kubectl_cmd(reader)), ("podtwin", self.podtwin_cmd(reader))):
            self.log(f"kubernetes: files, {arm}")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=self.b.env)
            found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            result = next((e for e in found if e.get("event") == "result"), None)
            if result is None:
                raise RuntimeError(f"kubernetes: files, {arm}: no result: {proc.stderr.strip()[-300:]}")
            out[arm] = result
        self.log("kubernetes: files, kubectl exec cat")
        t = time.monotonic()
        with open("/dev/null", "wb") as sink:
            subprocess.run(self.kubectl_cmd(["cat", "/data/big"]), stdout=sink, check=True, timeout=600)
        mb_s = self.b.args.kube_files_mb / (time.monotonic() - t)
        times = []
        for i in range(1, 11):
            t = time.monotonic()
            subprocess.run(self.kubectl_cmd(["cat", f"/data/small/f{i}"]), stdout=subprocess.DEVNULL, check=True,
                           timeout=60)
            times.append((time.monotonic() - t) * 1e6)
        out["kubectl exec cat"] = {"mb_s": mb_s, "p50_us": statistics.median(times)}
        return out

    def port_forward(self) -> dict:
        """The transport's ceiling: the same client on this machine through `kubectl port-forward`
        to the backend Service (one API-server stream per connection, no podtwin at all); names
        are not resolved through it, so no DNS phase."""
        import re
        pf = subprocess.Popen([self.kubectl, "--kubeconfig", str(self.kubeconfig), "-n", self.ns, "port-forward",
                               "svc/backend", ":8080"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.b.children.append(pf)
        try:
            assert pf.stdout is not None
            line = pf.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not found:
                raise RuntimeError(f"kubectl port-forward said {line!r}")
            client = self.b.client_args(self.b.args.kube_mb)
            client[client.index("-name") + 1] = "127.0.0.1"
            client[client.index("-port") + 1] = found.group(1)
            client[client.index("-dns") + 1] = "0"
            from run import LABEL
            cmd = ["docker", "run", "--rm", "--label", f"{LABEL}={self.b.tag}", "--network", "host", self.b.image,
                   *client]
            return self.b.run_suite("port-forward", cmd=cmd)
        finally:
            pf.terminate()
            pf.wait(timeout=10)

    def startup(self) -> dict[str, list[dict[str, float]]]:
        """To the first line of `echo ready`: in the pod (`kubectl exec`), and through podtwin with
        each kind of agent: a Job on the node (the default) and an ephemeral container."""
        runs: dict[str, list[dict[str, float]]] = {"in-pod": [], "podtwin": [], "ephemeral": []}
        n = self.b.args.kube_startup_runs
        if n <= 0:
            return runs
        ephemeral = self.b.state_dir / "ephemeral.json"
        ephemeral.write_text(json.dumps({"agent": {"ephemeral": True}}))
        self.log(f"kubernetes: start-up: {n} runs per arm, alternating (plus one warm-up each)")
        for i in range(n + 1):
            d = self.b.first_line(self.kubectl_cmd(["echo", "ready"]))
            p = self.b.first_line(self.podtwin_cmd(["echo", "ready"], quiet=False), timeout=180)
            e = self.b.first_line(self.ephemeral_cmd(ephemeral), timeout=180)
            if i > 0:
                runs["in-pod"].append(d)
                runs["podtwin"].append(p)
                runs["ephemeral"].append(e)
        return runs

    def ephemeral_cmd(self, config: Path) -> list[str]:
        return [*self.b.podtwin, "container", "run", "-f", str(config), "-n", self.ns, "--target", "deploy/api",
                self.b.image, "echo", "ready"]

    def note(self) -> str:
        return (f"Target `deploy/api` in namespace `bench-<tag>` on the test cluster (the same machine); "
                f"{self.b.args.repeat} × {self.b.args.kube_mb:g} MB per direction, "
                f"{self.b.args.keepalive} kept-alive and {self.b.args.newconn} new-connection requests, "
                f"{self.b.args.dns} DNS lookups. The in-pod arm is `kubectl exec deploy/api -- ptbench client ...` "
                "(the client times itself inside the pod; the exec stream only carries its JSON lines).\n\n")

    # -- report ------------------------------------------------------------------------------
    def report(self) -> str:
        import statistics

        from run import _cpu_pct, _mib, fmt, lat, ratio, throughput
        a, d, p = self.b.args, self.in_pod, self.pod
        rows = []
        for phase, what in (("download", "Download"), ("upload", "Upload")):
            x, _ = throughput(d, phase)
            y, rates = throughput(p, phase)
            if x is None and y is None:
                continue
            f, _ = throughput(self.forward, phase)
            rows.append([f"{what} throughput, MB/s (median of {len(rates)} × {a.kube_mb:g} MB; higher is better)",
                         fmt(x, 0), fmt(f, 1), fmt(y, 1), ratio(y, x), ratio(y, f)])
        for phase, what in (("keepalive", "HTTP request to `backend`, one kept-alive connection"),
                            ("newconn", "HTTP request, new TCP connection each"),
                            ("dns", "DNS lookup of `backend` (A, uncached)")):
            d50, d99, _ = lat(d, phase)
            p50, p99, n = lat(p, phase)
            if not n:
                continue
            f50, f99, fn = lat(self.forward, phase)
            rows.append([f"{what}: p50, ms (n={n})", fmt(d50, 3), fmt(f50, 3) if fn else "—", fmt(p50, 3),
                         ratio(p50, d50, "ms"), ratio(p50, f50, "ms") if fn else "—"])
            rows.append([f"{what}: p99, ms", fmt(d99, 3), fmt(f99, 3) if fn else "—", fmt(p99, 3),
                         ratio(p99, d99, "ms"), ratio(p99, f99, "ms") if fn else "—"])
        s = self.start
        if s["podtwin"]:
            med = lambda arm, key: statistics.median(x[key] for x in s[arm])  # noqa: E731
            n = len(s["podtwin"])
            rows.append([f"Start-up: command to the first output line of `echo ready`, s (median of {n}; in-pod: "
                         "`kubectl exec`), Job agent", fmt(med("in-pod", "first")), "—", fmt(med("podtwin", "first")),
                         ratio(med("podtwin", "first"), med("in-pod", "first"), "s"), "—"])
            if s.get("ephemeral"):
                rows.append([f"Start-up, the same with an ephemeral agent (`agent.ephemeral: true`), s (median of {n})",
                             fmt(med("in-pod", "first")), "—", fmt(med("ephemeral", "first")),
                             ratio(med("ephemeral", "first"), med("in-pod", "first"), "s"), "—"])
            rows.append([f"Whole run incl. teardown (agent Job deleted), s (median of {n})",
                         fmt(med("in-pod", "exit")), "—", fmt(med("podtwin", "exit")),
                         ratio(med("podtwin", "exit"), med("in-pod", "exit"), "s"), "—"])
        out = ["| Kubernetes measurement (`deploy/` target) | in the target pod | `kubectl port-forward` "
               "| podtwin | podtwin / in-pod | podtwin / port-forward |",
               "|---|---:|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        if s["podtwin"] and all(k in x for x in s["podtwin"] for k in ("agent", "agent_ready", "bridged")):
            med1 = lambda f: statistics.median(f(x) for x in s["podtwin"])  # noqa: E731
            steps = [
                ("runner start-up and target resolution (API server: Deployment -> pod)", med1(lambda x: x["agent"])),
                ("agent Job created, its pod scheduled and started, port-forward + SSH link up",
                 med1(lambda x: x["agent_ready"] - x["agent"])),
                ("sidecar container started, its link connected, iptables applied",
                 med1(lambda x: x["bridged"] - x["agent_ready"])),
                ("app container created and started, to its first output line", med1(lambda x: x["first"] - x["bridged"])),
                ("after the app's output: exit, teardown of app, sidecar, agent Job", med1(lambda x: x["exit"] - x["first"])),
            ]
            out += ["", "Where the start-up goes (medians, from podtwin's progress lines):", "",
                    "| Step | s |", "|---|---:|"] + [f"| {name} | {fmt(v)} |" for name, v in steps]
        watched = p.get("_watched", [])
        if watched:
            out += ["", "Memory and CPU of the session's processes (host `/proc/PID`; the agent is the main process "
                    "of the agent pod's container on the node, found by its container ID):", "",
                    "| Process | RSS idle, MiB | RSS peak during download, MiB | RSS peak during upload, MiB "
                    "| VmHWM at the end, MiB | CPU during download, % of one core | CPU during upload, % of one core |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            for w in watched:
                out.append(f"| {w.name} | {_mib(w.rss_max.get('idle', 0))} | {_mib(w.rss_max.get('download', 0))} | "
                           f"{_mib(w.rss_max.get('upload', 0))} | {_mib(w.hwm)} | {_cpu_pct(w, 'download', p)} | "
                           f"{_cpu_pct(w, 'upload', p)} |")
            if "agent" not in {w.name for w in watched}:
                out += ["", "The agent's process was not found on this machine's /proc (is the cluster elsewhere?)."]
        if getattr(self, "files", None):
            f, base = self.files, self.files["in the pod"]
            out += ["", f"The pod's files (an emptyDir: one {a.kube_files_mb:g} MB file, {a.small_files} files of "
                    "1 KiB; the same `ptbench files` reader in the pod and through podtwin):", "",
                    "| Reader | Sequential read, MB/s | vs in the pod | small file open+read+close p50 / p99, cold, µs "
                    "| warm, µs |", "|---|---:|---:|---:|---:|"]
            for arm in ("in the pod", "podtwin"):
                r = f[arm]
                out.append(f"| {arm} | {r['mb_s']:.0f} | {r['mb_s'] / base['mb_s']:.2f}x | {r['cold_p50_us']} / "
                           f"{r['cold_p99_us']} | {r['warm_p50_us']} / {r['warm_p99_us']} |")
            k = f["kubectl exec cat"]
            out.append(f"| `kubectl exec cat` (one exec per file) | {k['mb_s']:.0f} | {k['mb_s'] / base['mb_s']:.2f}x "
                       f"| {k['p50_us']:.0f} (p50) | — |")
        detail = []
        for arm, res in (("in-pod", d), ("podtwin", p)):
            for phase in ("download", "upload"):
                _, rates = throughput(res, phase)
                if rates:
                    detail.append(f"{arm} {phase} MB/s: " + ", ".join(f"{r:.1f}" for r in rates))
        for arm in ("in-pod", "podtwin"):
            if s[arm]:
                detail.append(f"{arm} start-up to first line, s: " + ", ".join(f"{x['first']:.2f}" for x in s[arm]))
        if detail:
            out += ["", "Raw figures: " + "; ".join(detail) + "."]
        return "\n".join(out) + "\n"

    # -- clean-up ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.ns_created:
            self.log(f"kubernetes: deleting namespace {self.ns}")
            from kubernetes.client.exceptions import ApiException
            try:
                self.core.delete_namespace(self.ns, _request_timeout=30)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    self.core.read_namespace(self.ns, _request_timeout=10)
                except ApiException as exc:
                    if exc.status == 404:
                        break
                time.sleep(1)
            else:
                self.log(f"kubernetes: namespace {self.ns} still terminating after 90 s")
            self.ns_created = False
        if self.image_loaded:
            # the run's ptbench image only; the podtwin image stays loaded
            subprocess.run(["bash", "-c", f'source "{CLUSTER}/lib.sh"; ctr_k8s images rm "docker.io/{self.b.image}"'],
                           capture_output=True, text=True, timeout=60)
            self.image_loaded = False
        if self.api is not None:
            self.api.close()
            self.api = None
