"""A port-forward stream to a pod, on the caller's event loop.

The API server's WebSocket port-forward (subprotocol ``v4.channel.k8s.io``): one port, two
channels -- 0 carries the bytes both ways, 1 the kubelet's error text -- and the first frame the
server sends on each channel starts with the port number (2 bytes, little-endian). Every frame we
send starts with its channel byte.

aiohttp speaks the WebSocket (its frame reader and masking are compiled; the kubernetes client
already depends on it). The kubernetes client's own ``portforward`` runs a thread per stream that
select()s between the WebSocket and one end of a socket pair; here the bytes go straight from the
WebSocket to the session socket's client on the same loop: no thread, no socket pair.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

import aiohttp

from podtwin.runner.errors import ClusterUnavailable, Forbidden, SessionError

log = logging.getLogger("podtwin.kube")
PROTOCOL = "v4.channel.k8s.io"
CHUNK = 256 * 1024
DATA, ERROR = 0, 1


@dataclass(frozen=True)
class WebSocketSettings:
    """How to reach the API server, from the kubeconfig: what a request needs besides its path."""

    host: str                       # https://host:port[/prefix]
    ssl: ssl.SSLContext | bool
    headers: dict = field(default_factory=dict)    # Authorization, read when the stream opens
    server_hostname: str | None = None
    proxy: str | None = None
    proxy_headers: dict | None = None


class PortForwardStream:
    """One port-forward to ``port`` on a pod's loopback, joined to a local stream by ``splice``."""

    def __init__(self, settings: WebSocketSettings, ns: str, pod: str, port: int) -> None:
        self.settings = settings
        self.ns, self.pod, self.port = ns, pod, port
        self.error = b""
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def failure(self) -> str | None:
        """What the kubelet said on the error channel (e.g. nothing listens on the port)."""
        return self.error.decode(errors="replace").strip() or None

    async def open(self) -> None:
        s = self.settings
        url = f"{s.host}/api/v1/namespaces/{self.ns}/pods/{self.pod}/portforward?ports={self.port}"
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=15))
        try:
            self._ws = await self._session.ws_connect(
                url, protocols=(PROTOCOL,), ssl=s.ssl, headers=s.headers, server_hostname=s.server_hostname,
                proxy=s.proxy, proxy_headers=s.proxy_headers, autoping=True, heartbeat=None,
                max_msg_size=0, compress=0, timeout=aiohttp.ClientWSTimeout(ws_close=2))
        except aiohttp.WSServerHandshakeError as exc:
            await self._session.close()
            doing = f"port-forward to pod {self.pod} in {self.ns}"
            if exc.status == 401:
                raise ClusterUnavailable.credentials_refused(doing) from exc
            if exc.status == 403:
                raise Forbidden(f"not allowed to {doing} (the API server answered 403 {exc.message})") from exc
            raise SessionError(f"could not {doing}: the API server answered {exc.status} {exc.message}") from exc
        except BaseException:
            await self._session.close()
            raise

    async def splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry bytes both ways until either side ends, then close both."""
        assert self._ws is not None and self._session is not None
        self._task = asyncio.current_task()
        ws = self._ws
        upstream = asyncio.ensure_future(self._up(reader, ws))
        try:
            await self._down(ws, writer)
        except (ConnectionError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("port-forward to %s ended: %s", self.pod, exc)
        finally:
            # Each step runs even if the session's end cancels this task again meanwhile.
            upstream.cancel()
            writer.close()
            try:
                await asyncio.gather(upstream, return_exceptions=True)
            finally:
                try:
                    await ws.close()
                finally:
                    await self._session.close()

    @staticmethod
    async def _up(reader: asyncio.StreamReader, ws) -> None:
        try:
            while data := await reader.read(CHUNK):
                await ws.send_bytes(b"\x00" + data)
        except (ConnectionError, OSError, aiohttp.ClientError):
            pass
        # The protocol has no half-close: the end of the client's bytes ends the stream.
        await ws.close()

    async def _down(self, ws, writer: asyncio.StreamWriter) -> None:
        """The server's frames to the client. Frames already received (one TLS read holds
        several) are joined and written once the loop turns: one write per read from the API
        server instead of one per frame (each write is a system call)."""
        prefix = {DATA: 2, ERROR: 2}     # the port number that starts each channel's first frame
        loop = asyncio.get_running_loop()
        pending = bytearray()
        flushing = False

        def flush() -> None:
            nonlocal flushing
            flushing = False
            if pending:
                writer.write(bytes(pending))
                pending.clear()

        try:
            while True:
                if writer.transport.get_write_buffer_size() > 0 or len(pending) >= CHUNK:
                    flush()
                    await writer.drain()
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                    aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return
                    continue
                data = msg.data
                if not data:
                    continue
                channel, start = data[0], 1
                skip = prefix.get(channel, 0)
                if skip:
                    taken = min(skip, len(data) - 1)
                    prefix[channel] = skip - taken
                    start += taken
                if start >= len(data):
                    continue
                if channel == DATA:
                    pending += memoryview(data)[start:]
                    if not flushing:
                        flushing = True
                        loop.call_soon(flush)
                elif channel == ERROR:
                    self.error += data[start:]
                    log.info("port-forward to %s: %s", self.pod, self.failure())
        finally:
            flush()

    def close(self) -> None:
        """From any thread: end the stream (its splice closes everything)."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:   # the loop stopped meanwhile: its tasks went with it
                pass
