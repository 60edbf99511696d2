"""Transports to a Kubernetes agent: streams through the API server.

The agent listens on a loopback port of its pod; the runner reaches it through the API server --
a port-forward stream, or the stdin/stdout of a relay exec'd next to the agent
(``agent.transport: exec``) -- and serves the session's unix socket, carrying each connection to
it (the owner link's, the sidecar's) over a stream of its own. The clients connect to that socket
exactly as they do to a Docker agent's own.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from podtwin.agent.streams import splice
from podtwin.runner.adapters.kube import KubeEngine
from podtwin.runner.backends.base import AgentReady, Transport
from podtwin.runner.errors import PodtwinError

log = logging.getLogger("podtwin.kube")


class StreamTransport(Transport):
    """Serve the session's socket: one API-server stream to the agent per connection to it.

    Subclasses give ``open_stream(ready)``: (something with close(), a connected socket)."""

    def __init__(self, kube: KubeEngine) -> None:
        self.kube = kube
        self.streams: list = []
        self.last_error: Exception | None = None
        self.server: asyncio.base_events.Server | None = None
        self.loop = None

    def stream_opener(self, ready: AgentReady) -> Callable[[], tuple[object, socket.socket]]:
        raise NotImplementedError

    def setup(self, session, ready, loop) -> None:
        opener = self.stream_opener(ready)

        def open_socket() -> socket.socket:
            handle, sock = opener()
            self.streams.append(handle)
            return sock

        async def carry(reader, writer) -> None:
            try:
                sock = await asyncio.to_thread(open_socket)
            except Exception as exc:  # noqa: BLE001 - the client sees the connection close
                self.last_error = exc
                log.info("%s to the agent failed: %s", self.what, exc)
                writer.close()
                return
            f_reader, f_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
            await splice(reader, writer, f_reader, f_writer)

        async def relay(reader, writer) -> None:
            try:
                await carry(reader, writer)
            except asyncio.CancelledError:
                # The session is ending (its loop cancels what still runs). End quietly: on
                # Python 3.11, start_server's callback logs a cancelled handler as an error.
                writer.close()
                await writer.wait_closed()

        async def serve() -> None:
            self.server = await asyncio.start_unix_server(relay, str(session.files.agent_socket))
        self.loop = loop
        loop.run(serve())

    def failure(self) -> str | None:
        """Why a stream could not be opened or ended: the API server's refusal (e.g. forbidden),
        or what the far end said (an exec'd relay's exit status and stderr)."""
        if isinstance(self.last_error, PodtwinError):
            return self.last_error.message
        for handle in reversed(self.streams):
            why = getattr(handle, "failure", lambda: None)()
            if why:
                return why
        return None

    def restore(self) -> None:
        if self.server is not None and self.loop is not None:
            self.loop.run(_close(self.server), timeout=5)
        for handle in self.streams:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


class PortForward(StreamTransport):
    name = "port-forward"
    what = "port-forward"
    hint = ("you need get and create on pods/portforward (docs/kubernetes-role.yaml), or set "
            "agent.transport: exec; `podtwin doctor -n NS` checks")

    def stream_opener(self, ready):
        return lambda: self.kube.port_forward(ready.namespace, ready.pod, ready.port)


class ExecStdio(StreamTransport):
    """A relay exec'd in the agent's container: its stdin/stdout carry the stream. It reaches the
    agent at a unix socket when its loopback is not the agent's (a node agent that moved into the
    target's network namespace), else at the agent's loopback port."""

    name = "exec"
    what = "exec"
    hint = "you need get and create on pods/exec (docs/kubernetes-role.yaml); `podtwin doctor -n NS` checks"

    def stream_opener(self, ready):
        address = f"unix:{ready.exec_socket}" if ready.exec_socket else f"127.0.0.1:{ready.port}"
        return lambda: self.kube.exec_stdio(ready.namespace, ready.pod, ready.container, address)


async def _close(server: asyncio.base_events.Server) -> None:
    """Stop listening, on the loop's own thread. Not wait_closed(): from Python 3.12 on it waits
    for the connections still open, and the sidecar's is open until its container goes."""
    server.close()


TRANSPORTS: dict[str, type[StreamTransport]] = {t.name: t for t in (PortForward, ExecStdio)}
