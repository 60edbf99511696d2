"""A session against a Kubernetes target: the agent runs as a Job on the target pod's node, or as
an ephemeral container in the target pod.

Same shape as a Docker session (api.run): the sidecar and the app are local Docker containers;
only the agent and the link's transport differ. The agent listens on a loopback port; the runner
reaches it through the API server -- a port-forward stream, or the stdin/stdout of a relay exec'd
next to the agent (agent.transport: exec) -- holds the owner connection over one stream, and
serves the session's unix socket to the sidecar, carrying each of its connections over a stream
of its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Callable

from podtwin.agent.streams import splice

from .session import Session

log = logging.getLogger("podtwin.kube")


class StreamTransport:
    """Streams to the agent through the API server, and the session socket the sidecar connects to.

    ``open_stream()`` returns (something with close(), a connected socket); ``what`` names the
    transport in errors ("port-forward", "exec").
    """

    def __init__(self, open_stream: Callable[[], tuple[object, socket.socket]], what: str) -> None:
        self.open_stream, self.what = open_stream, what
        self.streams: list = []
        self.last_error: Exception | None = None
        self.server: asyncio.base_events.Server | None = None

    def open_socket(self) -> socket.socket:
        handle, sock = self.open_stream()
        self.streams.append(handle)
        return sock

    async def serve(self, path: str) -> None:
        """Serve the session's unix socket: one stream to the agent per connection to it."""
        async def relay(reader, writer) -> None:
            try:
                sock = await asyncio.to_thread(self.open_socket)
            except Exception as exc:  # noqa: BLE001 - the client sees the connection close
                self.last_error = exc
                log.info("%s to the agent failed: %s", self.what, exc)
                writer.close()
                return
            f_reader, f_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
            await splice(reader, writer, f_reader, f_writer)
        self.server = await asyncio.start_unix_server(relay, path)

    def failure(self) -> str | None:
        """Why a stream ended, when its far end says (an exec'd relay's exit status and stderr)."""
        for handle in reversed(self.streams):
            why = getattr(handle, "failure", lambda: None)()
            if why:
                return why
        return None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for handle in self.streams:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def transport_for(kube, how: str, namespace: str, pod: str, container: str, ready: dict,
                  default_port: int) -> StreamTransport:
    """agent.transport: port-forward (default) or exec. ``ready`` is the agent's READY line: its
    loopback port, and a unix socket for exec'd relays when its loopback is not theirs (a node
    agent in the target's network namespace)."""
    port = ready.get("port", default_port)
    if how == "exec":
        address = f"unix:{ready['exec_socket']}" if ready.get("exec_socket") else f"127.0.0.1:{port}"
        return StreamTransport(lambda: kube.exec_stdio(namespace, pod, container, address), "exec")
    return StreamTransport(lambda: kube.port_forward(namespace, pod, port), "port-forward")


TRANSPORT_HINTS = {
    "port-forward": "you need get and create on pods/portforward (docs/kubernetes-role.yaml), or set "
                    "agent.transport: exec; `podtwin doctor -n NS` checks",
    "exec": "you need get and create on pods/exec (docs/kubernetes-role.yaml); `podtwin doctor -n NS` checks",
}


def write_kube_marker(session: Session, kubeconfig: str | None, context: str | None) -> None:
    """For the guard: where this session's agent Job lives, so it can delete it after a crash."""
    (session.dir / "kube.json").write_text(json.dumps({"kubeconfig": kubeconfig, "context": context}))
