"""The rules guard: removes a session's incoming rules when its agent dies, however it dies.

It runs in the target's network namespace, outside the agent's process (so a SIGKILLed or
deleted agent does not take it along), holds a connection to the agent's abstract liveness
socket, and when that connection ends removes the session's chain and exits. If the agent is
never reachable it sweeps the session's rules (if any) and exits too.

Docker targets: a container of its own in the target's namespace. Kubernetes: a second container
of the agent's pod, entering the target's namespace as the agent does (``--target-container-id``).
It ignores SIGTERM: when the pod is deleted the agent removes its own rules on SIGTERM, and the
guard, still holding on, removes whatever is left the moment the agent is gone.

``python -m podtwin.agent.incoming.steal.rules_guard --session ID [--target-container-id ID]``
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time

from podtwin.agent.target.nsenter import NamespaceError, enter_netns, main_pid
from podtwin.agent.incoming.steal.nat import liveness_name, remove_session_chain

log = logging.getLogger("podtwin.agent.incoming.steal.rules_guard")


def wait_for_agent(session_id: str, timeout: float) -> socket.socket | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(liveness_name(session_id))
            return sock
        except OSError:
            sock.close()
            time.sleep(0.1)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podtwin-rules-guard")
    p.add_argument("--session", required=True)
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--target-container-id", help="enter this container's network namespace first "
                   "(needs hostPID, SYS_ADMIN and SYS_PTRACE)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s rules-guard %(levelname)s %(message)s")
    if args.target_container_id:
        try:
            enter_netns(main_pid(args.target_container_id))
        except (NamespaceError, OSError) as exc:
            print(f"podtwin-rules-guard: {exc}", file=sys.stderr)
            return 3
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = wait_for_agent(args.session, args.startup_timeout)
    if sock is not None:
        print("PODTWIN_GUARD_READY", flush=True)
        while sock.recv(4096):  # the agent never writes: this returns b"" when it is gone
            pass
        sock.close()
        log.info("agent of session %s is gone", args.session)
    if remove_session_chain(args.session):
        log.info("removed the incoming rules of session %s", args.session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
