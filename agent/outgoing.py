"""The agent's end of outgoing traffic. TCP needs nothing here: each connection is an SSH
direct-tcpip channel, and asyncssh makes the connection from the target's network namespace
(``link.server``). UDP flows ride on the control channel: the protocol core (``link.control``)
decides which flows exist and when they end; ``UdpFlows`` holds their sockets, made here, in the
target's network namespace (the agent runs there), so datagrams leave from the target.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from podtwin.agent.tasks import TaskSet

log = logging.getLogger("podtwin.agent.outgoing")

UDP_IDLE_SECONDS = 120.0   # both ends forget a UDP flow that carried nothing for this long


class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, flows: "UdpFlows", ident: int) -> None:
        self.flows = flows
        self.ident = ident
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr) -> None:
        self.flows.received(self.ident, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the app would see ECONNREFUSED on a connected
        # socket, but a datagram flow cannot carry that; drop silently like the network would.
        log.debug("udp flow %d: %r", self.ident, exc)


class UdpFlows:
    """One connected datagram socket per flow id. What becomes of a flow is reported through
    ``opened(ident)``, ``failed(ident, reason)`` and ``received(ident, datagram)``; a flow closed
    here (``close``) reports nothing more, even if its socket was still being opened."""

    def __init__(self, tasks: TaskSet, opened: Callable[[int], None], failed: Callable[[int, str], None],
                 received: Callable[[int, bytes], None]) -> None:
        self.tasks = tasks
        self.opened, self.failed, self.received = opened, failed, received
        self.flows: dict[int, _UdpFlow] = {}

    def open(self, ident: int, host: str, port: int) -> None:
        # Registered before the socket exists, so a close() meanwhile finds it.
        flow = self.flows[ident] = _UdpFlow(self, ident)
        self.tasks.spawn(self._open(flow, host, port), f"udp-open-{ident}")

    async def _open(self, flow: _UdpFlow, host: str, port: int) -> None:
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: flow, remote_addr=(host, port))
        except (OSError, ValueError) as exc:  # refused, unresolvable, not a host name
            if self.flows.get(flow.ident) is flow:
                del self.flows[flow.ident]
                self.failed(flow.ident, str(exc))
            return
        if self.flows.get(flow.ident) is not flow:  # closed (or its id reused) while opening
            transport.close()
            return
        flow.transport = transport
        self.opened(flow.ident)

    def send(self, ident: int, data: bytes) -> None:
        flow = self.flows.get(ident)
        if flow is not None and flow.transport is not None:
            flow.transport.sendto(data)

    def close(self, ident: int) -> None:
        flow = self.flows.pop(ident, None)
        if flow is not None and flow.transport is not None:
            flow.transport.close()
