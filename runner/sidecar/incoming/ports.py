"""Incoming traffic, sidecar side: follow the app's listening ports and take the target's.

The app and the sidecar share a network namespace, so the app's listening sockets are in this
namespace's /proc/net/tcp{,6}: a port the app listens on is a port a pod's container would serve.
For each (mapped by ``port_mapping``, less ``ignore_ports``, limited to ``ports`` if given) the
sidecar subscribes the target's port with the agent, and delivers every connection the agent
forwards to the app's port on loopback. When the app stops listening, the port is released.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import asyncssh

from podtwin.agent.link.wire import INCOMING_HOST
from podtwin.agent.link.handoff import readable
from podtwin.agent.streams import splice
from podtwin.agent.tasks import TaskSet
from podtwin.runner.sidecar.settings import IncomingSettings

log = logging.getLogger("podtwin.sidecar.incoming")
POLL_SECONDS = 0.5
LISTEN = "0A"


def listening_ports(proc_net: Path = Path("/proc/net")) -> set[int]:
    """TCP ports with a socket in LISTEN state in this network namespace (IPv4 and IPv6)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                address, port = fields[1].rsplit(":", 1)
                if _unreachable(address):
                    continue
                ports.add(int(port, 16))
    return ports


def _unreachable(address: str) -> bool:
    """A listener the agent's connections (delivered to 127.0.0.1) cannot reach: on another
    loopback address, such as Docker's embedded DNS server on 127.0.0.11 in a container on a
    user-defined network. /proc/net/tcp writes an IPv4 address as 8 hex digits, low byte first."""
    return len(address) == 8 and address[6:] == "7F" and address != "0100007F"


class IncomingPorts:
    def __init__(self, links, settings: IncomingSettings, own_ports: set[int], handoff=None) -> None:
        self.links = links   # the LinkKeeper: its forwardings are taken again when the link is back
        self.handoff = handoff   # a Docker agent on our kernel: stolen connections arrive as sockets
        self.settings = settings
        self.own_ports = own_ports
        self.listeners: dict[int, object] = {}   # app port -> asyncssh listener
        self.refused: set[int] = set()            # app ports refused while they keep listening
        self.task: asyncio.Task | None = None
        self.push: asyncio.Task | None = None
        # Handed-over connections' tasks: held here, as the loop holds tasks only weakly (a
        # connection whose both sides wait was collected mid-request: its client saw EOF).
        self.conns = TaskSet("incoming")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.links.on_back.append(self._relink)
        self.task = loop.create_task(self._follow(), name="incoming:follow")
        if self.handoff is not None and self.settings.mode == "steal":
            self.push = loop.create_task(self._receive(await self.handoff.incoming()), name="incoming:push")

    async def _receive(self, channel: socket.socket) -> None:
        """Whole-port steals' connections handed over by the agent: each to the app's port that
        takes its target port (the agent sends only ports this session subscribed)."""
        loop = asyncio.get_running_loop()
        buffered = b""
        try:
            while True:
                await readable(loop, channel)
                msg, fds, _, _ = socket.recv_fds(channel, 4096, 16)
                if not msg and not fds:
                    return   # the agent is gone
                conns = [socket.socket(fileno=fd) for fd in fds]
                buffered += msg
                lines = buffered.split(b"\n")
                buffered = lines.pop()
                for line, conn in zip(lines, conns):
                    remote = json.loads(line)["port"]
                    local = next((lo for lo, re in self.settings.wanted(set(self.listeners)).items() if re == remote),
                                 None)
                    if local is None:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    self.conns.spawn(self._deliver_socket(conn, local), "conn")
                for extra in conns[len(lines):]:
                    extra.close()
        except (OSError, ValueError, KeyError) as exc:
            log.info("incoming push channel: %r", exc)
        finally:
            channel.close()

    async def _deliver_socket(self, conn: socket.socket, local: int) -> None:
        reader, writer = await asyncio.open_connection(sock=conn, limit=256 * 1024)
        await self._deliver_to(local)(reader, writer)

    async def _follow(self) -> None:
        while True:
            try:
                await self.sync(listening_ports() - self.own_ports)
            except (ConnectionError, asyncssh.Error):
                try:
                    await self.links.wait()   # the link broke: take the ports again once it is back
                except ConnectionError:
                    return  # it did not come back; the sidecar is exiting
            await asyncio.sleep(POLL_SECONDS)

    def _relink(self, link) -> None:
        """The link is back: the broken one's forwardings went with it; the agent kept the
        rules, and ``sync`` asks for the ports again on the new link (the agent hands them over)."""
        self.listeners.clear()
        self.refused.clear()

    async def sync(self, app_ports: set[int]) -> None:
        wanted = self.settings.wanted(app_ports)
        for local in list(self.listeners):
            if local not in wanted:
                self.listeners.pop(local).close()  # cancels the forwarding: the agent releases the port
        self.refused &= set(wanted)
        for local, remote in wanted.items():
            if local not in self.listeners and local not in self.refused:
                await self._take(local, remote)

    async def _take(self, local: int, remote: int) -> None:
        link = self.links.link
        error = await link.control.subscribe(remote, self.settings.mode, self.settings.http_filter)
        if error:
            log.warning("port %d: %s", remote, error)
            self.refused.add(local)
            return
        self.listeners[local] = await link.conn.start_server(
            lambda orig_host, orig_port: self._deliver_to(local), INCOMING_HOST, remote, encoding=None)
        log.info("target port %d -> app port %d", remote, local)

    def _deliver_to(self, local: int):
        async def deliver(reader, writer) -> None:
            try:
                app_reader, app_writer = await _connect_loopback(local)
            except OSError as exc:
                log.info("app port %d: %s", local, exc)
                writer.close()
                return
            await splice(reader, writer, app_reader, app_writer)
        return deliver

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.push is not None:
            self.push.cancel()
        self.conns.cancel_all()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()


async def _connect_loopback(port: int):
    try:
        return await asyncio.open_connection("127.0.0.1", port, limit=256 * 1024)
    except OSError:
        return await asyncio.open_connection("::1", port, limit=256 * 1024)
