"""``python -m podtwin.agent.link.stdio_relay 127.0.0.1:PORT|unix:/PATH``: stdin/stdout <-> one connection.

The exec transport's far end. The runner execs this in the agent's container (Kubernetes exec,
no TTY) and carries the session's SSH link over the exec stream's stdin and stdout; this pumps
them to the agent's loopback listener, or to its unix socket (a node agent has moved to the
target's network namespace, and so have processes exec'd in its container). It exits when either side is done: the runner closing the
exec stream closes our stdin; the agent closing the connection ends our stdout.
"""
from __future__ import annotations

import os
import socket
import sys
import threading

from podtwin.agent.sockopts import no_delay

CHUNK = 256 * 1024


def _to_socket(sock: socket.socket) -> None:
    try:
        while data := os.read(0, CHUNK):
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(address: tuple[str, int] | str) -> int:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(address)
        else:
            sock = no_delay(socket.create_connection(address, timeout=10))
    except OSError as exc:
        print(f"podtwin-stdio-relay: cannot connect to {address}: {exc}", file=sys.stderr, flush=True)
        return 1
    sock.settimeout(None)
    threading.Thread(target=_to_socket, args=(sock,), daemon=True).start()
    try:
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" not in args[0]:
        print("usage: python -m podtwin.agent.link.stdio_relay HOST:PORT|unix:/PATH", file=sys.stderr)
        return 2
    if args[0].startswith("unix:"):
        return relay(args[0][len("unix:"):])
    host, _, port = args[0].rpartition(":")
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("podtwin-stdio-relay: loopback addresses only", file=sys.stderr)
        return 2
    return relay((host, int(port)))


if __name__ == "__main__":
    sys.exit(main())
