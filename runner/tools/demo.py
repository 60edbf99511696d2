"""`make demo`: podtwin in two minutes, on this machine only.

It builds a tiny "staging" (an internal Docker network with an orders backend and a target
container, demo-api, that has staging's environment), then runs an unchanged busybox app image
twice: with plain `docker run`, and with `podtwin container run --target container/...`. Every
object it creates is labelled ``podtwin-demo`` and removed at the end, even on Ctrl-C.

``python -m podtwin.runner.tools.demo``
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time

from podtwin.runner.tools.images import BUSYBOX_IMAGE, PODTWIN_IMAGE

LABEL = "podtwin-demo"
NETWORK, BACKEND, TARGET = "podtwin-demo-net", "podtwin-demo-orders", "podtwin-demo-api"
TARGET_ENV = {"APP_ENV": "staging", "DATABASE_URL": "postgres://orders:s3cret@db.staging:5432/orders",
              "FEATURE_FLAGS": "new-checkout,fast-search"}
ANSWER = "orders service: 3 open orders"

BACKEND_CODE = f"""
import http.server, socket, threading
def echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9000))
    while True:
        data, addr = s.recvfrom(2048); s.sendto(b"orders udp echo: " + data, addr)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{ANSWER}\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
threading.Thread(target=echo, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"""

SHOW_ENV = "; ".join(f'echo "  {k}=${{{k}:-<not set>}}"' for k in TARGET_ENV)
# --network none: nothing leaves this machine; on your laptop's default network the outcome is the
# same, `orders` is a name only staging's network knows. (busybox `wget -T` crashes in Debian's
# static build: `timeout` bounds each step instead.)
PLAIN_SCRIPT = (f'exec 2>&1; echo "env:"; {SHOW_ENV}; echo "nslookup orders:"; '
                'timeout 5 nslookup orders || echo "  -> cannot resolve orders"')
PODTWIN_SCRIPT = (f'exec 2>&1; echo "env:"; {SHOW_ENV}; echo; '
                  'echo "nslookup orders:"; timeout 10 nslookup orders; echo; '
                  'echo "wget -qO- http://orders/ (TCP):"; timeout 15 wget -qO- http://orders/; echo; '
                  'echo "udpsend orders:9000 hello (UDP):"; udpsend orders:9000 hello')


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def header(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)), flush=True)


def remove_demo_objects() -> None:
    """Everything labelled podtwin-demo (this run's or a previous one's): containers, then the network."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    for net in docker("network", "ls", "-q", "--filter", f"label={LABEL}").stdout.split():
        docker("network", "rm", net, check=False)


def start_staging() -> str:
    """The network, the backend (alias `orders`) and the target; returns the backend's IP."""
    docker("network", "create", "--internal", "--label", LABEL, NETWORK)
    docker("run", "-d", "--name", BACKEND, "--label", LABEL, "--network", NETWORK, "--network-alias", "orders",
           PODTWIN_IMAGE, "python3", "-c", BACKEND_CODE)
    env_args = [a for k, v in TARGET_ENV.items() for a in ("-e", f"{k}={v}")]
    docker("run", "-d", "--name", TARGET, "--label", LABEL, "--network", NETWORK, "--hostname", "demo-api",
           *env_args, PODTWIN_IMAGE, "sleep", "infinity")
    probe = ("python3", "-c", "import urllib.request; urllib.request.urlopen('http://orders/', timeout=1)")
    deadline = time.monotonic() + 20
    while docker("exec", TARGET, *probe, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the orders backend did not answer the target within 20 s")
        time.sleep(0.3)
    ip_format = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return docker("inspect", "-f", ip_format, BACKEND).stdout.strip()


def run_podtwin(timeout: float = 60) -> tuple[int, str]:
    """The real CLI; its progress (stderr) shows live, the app's output is returned."""
    cmd = [sys.executable, "-m", "podtwin.runner", "container", "run", "--target", f"container/{TARGET}",
           BUSYBOX_IMAGE, "sh", "-c", PODTWIN_SCRIPT]
    print("$ podtwin container run --target container/" + TARGET + f" {BUSYBOX_IMAGE} sh -c '...'", flush=True)
    # An empty working directory: a podtwin.json/yaml/toml where the user happens to be is not read.
    with tempfile.TemporaryDirectory(prefix="podtwin-demo-") as cwd:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=cwd)
        return _finish(proc, timeout)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        # Timed out or interrupted: let podtwin tear its session down. A Ctrl-C in a terminal reached
        # it too, so give it a moment before a SIGTERM (which would interrupt its own clean-up).
        for sig, grace in ((None, 5), (signal.SIGTERM, 15), (signal.SIGKILL, None)):
            if proc.poll() is not None:
                break
            if sig is not None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        print("podtwin demo: no Docker engine answers: run `make setup` first", file=sys.stderr)
        return 2
    missing = [i for i in (PODTWIN_IMAGE, BUSYBOX_IMAGE) if docker("image", "inspect", i, check=False).returncode]
    if missing:
        print(f"podtwin demo: missing image(s) {', '.join(missing)}: run `make setup` first", file=sys.stderr)
        return 2
    remove_demo_objects()
    try:
        header("1. A small staging: an internal network, an `orders` backend, a target")
        backend_ip = start_staging()
        print(f"network {NETWORK} (internal: no route in or out)\n"
              f"backend {BACKEND}: alias `orders` = {backend_ip}, HTTP :80, UDP echo :9000\n"
              f"target  {TARGET}: " + " ".join(f"{k}={v}" for k, v in TARGET_ENV.items()))

        header(f"2. Plain `docker run {BUSYBOX_IMAGE}` (no podtwin)")
        plain = docker("run", "--rm", "--label", LABEL, "--name", "podtwin-demo-plain", "--network", "none",
                       BUSYBOX_IMAGE, "sh", "-c", PLAIN_SCRIPT, check=False, timeout=20)
        print((plain.stdout + plain.stderr).rstrip())

        header(f"3. The same image through podtwin, as if inside {TARGET}")
        code, out = run_podtwin()
        print(out.rstrip())

        header("Summary")
        checks = [("saw the target's env", f"APP_ENV={TARGET_ENV['APP_ENV']}" in out),
                  ("resolved `orders`, a name only the target's network knows", backend_ip in out),
                  ("fetched from it over TCP (HTTP)", ANSWER in out),
                  ("fetched from it over UDP (echo)", "orders udp echo: hello" in out)]
        for what, ok in checks:
            print(f"  [{'ok' if ok else 'FAILED'}] the app {what}")
        if code == 0 and all(ok for _, ok in checks):
            print("\nThe unchanged app saw the target's env, resolved a name only the target's network knows,\n"
                  "and fetched from it over TCP and UDP, while running on this machine.")
            return 0
        print(f"\npodtwin demo FAILED (podtwin exit code {code})", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("\npodtwin demo: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or ""
        print(f"podtwin demo FAILED: {exc} {detail}".rstrip(), file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        header("Clean-up")
        remove_demo_objects()
        print(f"removed every container and network labelled {LABEL}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
