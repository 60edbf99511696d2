"""Small helpers shared by the Kubernetes fixtures and tests."""
from __future__ import annotations

import time

from kubernetes.stream import stream


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def exec_in(cluster, ns: str, pod: str, command: list[str], container: str | None = None) -> str:
    """Run `command` in the pod through the API server's exec (websocket); stdout + stderr.
    Not the client's preloading mode: that never closes its websocket (a ResourceWarning)."""
    kw = {"container": container} if container else {}
    ws = stream(cluster.core.connect_get_namespaced_pod_exec, pod, ns, command=command,
                stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False, **kw)
    try:
        ws.run_forever(timeout=60)
        return ws.read_all()
    finally:
        ws.close()
        # close() returns early when the server already ended the connection, leaving the
        # TLS socket open: shut it down for good.
        if ws.sock is not None:
            ws.sock.shutdown()
