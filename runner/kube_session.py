"""A session against a Kubernetes target: the agent runs as a Job on the target pod's node.

Same shape as a Docker session (api.run): the sidecar and the app are local Docker containers;
only the agent and the link's transport differ. The agent listens on its own pod's loopback; the
runner reaches it through the API server's port-forward, holds the owner connection over one
stream, and serves the session's unix socket to the sidecar, carrying each of its connections
over a port-forward stream of its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket

from podtwin.agent.streams import splice

from .session import Session

log = logging.getLogger("podtwin.kube")


class PortForwardTransport:
    """Port-forward streams to the agent, and the session socket the sidecar connects to."""

    def __init__(self, kube, namespace: str, pod: str) -> None:
        self.kube, self.namespace, self.pod = kube, namespace, pod
        self.forwards: list = []
        self.last_error: Exception | None = None
        self.server: asyncio.base_events.Server | None = None

    def open_socket(self) -> socket.socket:
        pf, sock = self.kube.port_forward(self.namespace, self.pod)
        self.forwards.append(pf)
        return sock

    async def serve(self, path: str) -> None:
        """Serve the session's unix socket: one port-forward per connection to it."""
        async def relay(reader, writer) -> None:
            try:
                sock = await asyncio.to_thread(self.open_socket)
            except Exception as exc:  # noqa: BLE001 - the client sees the connection close
                self.last_error = exc
                log.info("port-forward to the agent failed: %s", exc)
                writer.close()
                return
            f_reader, f_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
            await splice(reader, writer, f_reader, f_writer)
        self.server = await asyncio.start_unix_server(relay, path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for pf in self.forwards:
            try:
                pf.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def write_kube_marker(session: Session, kubeconfig: str | None, context: str | None) -> None:
    """For the guard: where this session's agent Job lives, so it can delete it after a crash."""
    (session.dir / "kube.json").write_text(json.dumps({"kubeconfig": kubeconfig, "context": context}))
