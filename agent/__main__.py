"""podtwin agent: ``python -m podtwin.agent --listen unix:/podtwin/agent.sock ...``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys

import asyncssh

from podtwin.agent.incoming.steal.nat import sweep_dead_sessions
from podtwin.agent.target.nsenter import NamespaceError, enter_netns, main_pid, pod_main_pid
from podtwin.agent.link.handoff import HANDOFF_BACKLOG, HandoffServer, IncomingPush
from podtwin.agent.link.server import Agent, make_listener, serve
from podtwin.agent.target.process import TargetProcess

EXEC_SOCKET = "/tmp/podtwin-agent.sock"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="podtwin-agent", description=__doc__)
    p.add_argument("--listen", required=True,
                   help="unix:/path/to/socket or tcp:127.0.0.1:PORT (loopback only)")
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument("--authorized-keys",
                      help="file with the session's public key; no other key is accepted")
    keys.add_argument("--authorized-key", help="the session's public key itself (ssh-ed25519 ...)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-pid", type=int, default=1,
                        help="PID of the target's main process, as this agent sees it")
    target.add_argument("--target-container-id",
                        help="the target container's ID (containerd://...): the agent finds its main "
                             "process (needs hostPID) and enters its network namespace (setns)")
    target.add_argument("--targetless", action="store_true",
                        help="no target: serve from this agent's own pod (its network and DNS; no "
                             "environment, no files)")
    target.add_argument("--target-in-pod",
                        help="the target container's ID, for an agent that is an ephemeral container "
                             "in the target's pod (targetContainerName): it shares the target's PID "
                             "and network namespaces already, so it only finds the main process")
    p.add_argument("--exec-socket",
                   help="also listen on this unix socket, for relays exec'd in the agent's container "
                        "(the exec transport); default with --target-container-id: " + EXEC_SOCKET +
                        " (exec'd processes join the network namespace the agent moved to, where its "
                        "loopback listener is not; a unix socket's path does not depend on it)")
    p.add_argument("--handoff", metavar="unix:PATH",
                   help="also hand connected sockets to a client on the same kernel (a Docker target's "
                        "sidecar): see podtwin.agent.link.handoff")
    p.add_argument("--startup-timeout", type=float, default=60.0,
                   help="exit if the runner has not connected within this many seconds")
    p.add_argument("--communication-timeout", type=float, default=10.0,
                   help="drop a link that has been silent this long (keepalives are sent)")
    p.add_argument("--reconnect-grace", type=float, default=60.0,
                   help="when the runner's link breaks (rather than closes), keep the session this many "
                        "seconds for it to reconnect (0: end at once)")
    p.add_argument("--runner-lock", metavar="PATH",
                   help="a file the runner keeps locked (flock) while it lives, on this kernel: a broken "
                        "link whose runner no longer holds it ends the session at once")
    p.add_argument("--host-key", help="the agent's private host key (made by the runner, so clients "
                   "can start before the agent announces it); default: a new key, announced on stdout")
    p.add_argument("--session", default="", help="the session id (names this agent's rules)")
    p.add_argument("--incoming", choices=["steal", "mirror"],
                   help="offer incoming traffic: steal (needs NET_ADMIN; sweeps dead sessions' rules "
                        "first) or mirror (needs NET_RAW; a passive copy)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace):
    """Before any thread or event loop exists: the listener (in our own namespace), then, for a
    node agent, find the target container's process and enter its network namespace; for an
    ephemeral container in the target's pod, only find the process (the namespaces are shared)."""
    listener, cleanup = make_listener(args.listen)
    # one connection per app connection being opened: as deep a queue as the sidecar's own listener
    handoff = make_listener(args.handoff, backlog=HANDOFF_BACKLOG) if args.handoff else None
    exec_path = args.exec_socket or (EXEC_SOCKET if args.target_container_id else None)
    exec_socket = (exec_path, *make_listener(f"unix:{exec_path}")) if exec_path else None
    pid = args.target_pid
    if args.targetless:
        return listener, cleanup, exec_socket, handoff, TargetProcess(os.getpid(), targetless=True)
    if args.target_container_id:
        pid = main_pid(args.target_container_id)
        enter_netns(pid)
    elif args.target_in_pod:
        pid = pod_main_pid(args.target_in_pod)
    return listener, cleanup, exec_socket, handoff, TargetProcess(pid)


async def amain(args: argparse.Namespace, listener, cleanup, exec_socket, handoff,
                target: TargetProcess) -> int:
    if not target.exists():
        print(f"podtwin-agent: target process {target.pid} not found", file=sys.stderr)
        return 3
    agent = Agent(
        target=target,
        authorized_keys=(asyncssh.read_authorized_keys(args.authorized_keys) if args.authorized_keys
                         else asyncssh.import_authorized_keys(args.authorized_key + "\n")),
        host_key=(asyncssh.read_private_key(args.host_key) if args.host_key
                  else asyncssh.generate_private_key("ssh-ed25519")),
        startup_timeout=args.startup_timeout,
        reconnect_grace=args.reconnect_grace,
        runner_lock=args.runner_lock,
        keepalive_interval=max(args.communication_timeout / 2, 1.0),
        keepalive_count_max=2,
    )
    if args.incoming:
        if not re.fullmatch(r"[0-9a-f]{4,16}", args.session):
            print("podtwin-agent: --incoming needs --session ID (hex)", file=sys.stderr)
            return 2
        if args.incoming == "steal":
            swept = await asyncio.to_thread(sweep_dead_sessions)
            if swept:
                logging.getLogger("podtwin.agent").info("removed rules of dead sessions: %s", ", ".join(swept))
        from podtwin.agent.incoming.service import IncomingServer   # only a session with incoming needs it

        agent.incoming = IncomingServer(args.session, notify=agent.notify)
        await agent.incoming.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop, f"signal {sig.name}")
    server = None
    if handoff is not None:
        push = IncomingPush()
        if agent.incoming is not None and args.incoming == "steal":
            agent.incoming.push = push
        server = HandoffServer(handoff[0], push)
        server.start()
    try:
        await serve(agent, listener, cleanup, exec_socket)
    finally:
        if server is not None:
            server.close()
            handoff[0].close()
            handoff[1]()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s agent %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        listener, cleanup, exec_socket, handoff, target = prepare(args)
    except (NamespaceError, ValueError, OSError) as exc:
        print(f"podtwin-agent: {exc}", file=sys.stderr)
        return 3
    return asyncio.run(amain(args, listener, cleanup, exec_socket, handoff, target))


if __name__ == "__main__":
    sys.exit(main())
