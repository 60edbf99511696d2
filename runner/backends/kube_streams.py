"""Transports to a Kubernetes agent: streams through the API server.

The agent listens on a loopback port of its pod; the runner reaches it through the API server --
a port-forward stream, or the stdin/stdout of a relay exec'd next to the agent
(``agent.transport: exec``) -- and serves the session's unix socket, carrying each connection to
it (the owner link's, the sidecar's) over a stream of its own. The clients connect to that socket
exactly as they do to a Docker agent's own.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import threading
from typing import Awaitable, Callable

from podtwin.agent.streams import splice
from podtwin.runner.adapters.kube import KubeEngine
from podtwin.runner.backends.base import AgentReady, Transport
from podtwin.runner.errors import PodtwinError

log = logging.getLogger("podtwin.kube")


class StreamTransport(Transport):
    """Serve the session's socket: one API-server stream to the agent per connection to it.

    Subclasses give ``connect(ready)``: a coroutine function that opens a stream and returns it,
    something with ``splice(reader, writer)`` (a coroutine carrying the client's bytes both ways
    until either side ends) and ``close()`` (from any thread)."""

    def __init__(self, kube: KubeEngine) -> None:
        self.kube = kube
        self.streams: list = []
        self.last_error: Exception | None = None
        self.server: asyncio.base_events.Server | None = None
        self.loop = None

    def connect(self, ready: AgentReady) -> Callable[[], Awaitable]:
        raise NotImplementedError

    def setup(self, session, ready, loop) -> None:
        connect = self.connect(ready)

        async def carry(reader, writer) -> None:
            try:
                stream = await connect()
            except Exception as exc:  # noqa: BLE001 - the client sees the connection close
                self.last_error = exc
                log.info("%s to the agent failed: %s", self.what, exc)
                writer.close()
                return
            self.streams.append(stream)
            await stream.splice(reader, writer)

        async def relay(reader, writer) -> None:
            try:
                await carry(reader, writer)
            except asyncio.CancelledError:
                # The session is ending (its loop cancels what still runs). End quietly: on
                # Python 3.11, start_server's callback logs a cancelled handler as an error.
                writer.close()
                await writer.wait_closed()

        async def serve() -> None:
            self.server = await asyncio.start_unix_server(relay, str(session.files.agent_socket),
                                                          limit=256 * 1024)
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

    def __init__(self, kube: KubeEngine) -> None:
        super().__init__(kube)
        # aiohttp speaks the port-forward's WebSocket: imported meanwhile (≈0.15 s), while the
        # agent starts, rather than when the first stream opens.
        threading.Thread(target=importlib.import_module, args=("podtwin.runner.adapters.kube_portforward",),
                         name="podtwin-import", daemon=True).start()

    def connect(self, ready):
        async def open_stream():
            # Off the loop: refreshing a token may run the kubeconfig's exec plugin.
            stream = await asyncio.to_thread(self.kube.port_forward, ready.namespace, ready.pod, ready.port)
            await stream.open()
            return stream
        return open_stream


class ExecStdio(StreamTransport):
    """A relay exec'd in the agent's container: its stdin/stdout carry the stream. It reaches the
    agent at a unix socket when its loopback is not the agent's (a node agent that moved into the
    target's network namespace), else at the agent's loopback port."""

    name = "exec"
    what = "exec"
    hint = "you need get and create on pods/exec (docs/kubernetes-role.yaml); `podtwin doctor -n NS` checks"

    def connect(self, ready):
        address = f"unix:{ready.exec_socket}" if ready.exec_socket else f"127.0.0.1:{ready.port}"

        async def open_stream():
            relay, sock = await asyncio.to_thread(self.kube.exec_stdio, ready.namespace, ready.pod,
                                                  ready.container, address)
            return _SocketStream(relay, sock)
        return open_stream


class _SocketStream:
    """A stream that a thread of its own pumps into one end of a socket pair (the exec relay)."""

    def __init__(self, handle, sock: socket.socket) -> None:
        self.handle, self.sock = handle, sock

    def failure(self) -> str | None:
        return self.handle.failure()

    async def splice(self, reader, writer) -> None:
        f_reader, f_writer = await asyncio.open_connection(sock=self.sock, limit=256 * 1024)
        await splice(reader, writer, f_reader, f_writer)

    def close(self) -> None:
        self.handle.close()


async def _close(server: asyncio.base_events.Server) -> None:
    """Stop listening, on the loop's own thread. Not wait_closed(): from Python 3.12 on it waits
    for the connections still open, and the sidecar's is open until its container goes."""
    server.close()


TRANSPORTS: dict[str, type[StreamTransport]] = {t.name: t for t in (PortForward, ExecStdio)}
