"""The asyncio driver of one control channel (the ``podtwin-control`` subsystem).

``ControlSession`` is the asyncssh session of the channel. It feeds the channel's bytes to the
protocol core (``control.ControlHandler``) and carries out the commands the core returns, in
order: it writes replies, reads the target, forwards DNS queries (``dns.Forwarder``), holds the
UDP flows' sockets (``outgoing.UdpFlows``), asks the incoming service for ports (through its
connection) and closes the channel on a protocol error. What those come to, and the clock for
UDP idle expiry, goes back to the core as events. Its tasks are named, in one ``TaskSet``,
cancelled when the channel closes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncssh

from podtwin.agent.dns import Forwarder
from podtwin.agent.link import wire
from podtwin.agent.link.control import ControlHandler
from podtwin.agent.link.control_events import (
    ChannelClosed, CloseUdp, Command, DnsAnswered, EndSession, Event, Fatal, ForwardDns, Greeted, NoticeFromAgent,
    OpenUdp, ReadTargetInfo, Reply, SendUdp, Subscribe, SubscribeDone, TargetInfoRead, Tick, UdpOpened,
    UdpOpenFailed, UdpReceived)
from podtwin.agent.outgoing import UDP_IDLE_SECONDS, UdpFlows
from podtwin.agent.tasks import TaskSet

if TYPE_CHECKING:
    from podtwin.agent.link.server import AgentConnection

log = logging.getLogger("podtwin.agent.link.control_session")


class ControlSession(asyncssh.SSHServerSession):
    def __init__(self, connection: "AgentConnection") -> None:
        self.connection = connection   # the SSH connection this channel belongs to
        self.chan: asyncssh.SSHServerChannel | None = None
        self.tasks = TaskSet("control")
        self.core: ControlHandler | None = None
        self.udp: UdpFlows | None = None
        self.dns: Forwarder | None = None

    # -- asyncssh callbacks -------------------------------------------------------------------
    def connection_made(self, chan) -> None:
        self.chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == wire.CONTROL_SUBSYSTEM

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def session_started(self) -> None:
        self.connection.control = self
        target = self.connection.agent.target
        self.core = ControlHandler(now=asyncio.get_running_loop().time(), udp_idle=UDP_IDLE_SECONDS)
        self.dns = Forwarder(lambda: target.read_text("/etc/resolv.conf"))
        self.udp = UdpFlows(self.tasks, opened=lambda flow: self._event(UdpOpened(flow)),
                            failed=lambda flow, reason: self._event(UdpOpenFailed(flow, reason)),
                            received=lambda flow, data: self._event(UdpReceived(flow, data)))
        self.tasks.spawn(self._tick(), "udp-expiry")

    def data_received(self, data: bytes, datatype) -> None:
        assert self.core is not None
        self._run(self.core.feed(data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.core is not None:
            self._event(ChannelClosed())
        self.tasks.cancel_all()

    # -- for the agent ------------------------------------------------------------------------
    def notify(self, level: str, message: str) -> None:
        """A notice for the client to show the user."""
        self._event(NoticeFromAgent(level, message))

    # -- carrying out commands ----------------------------------------------------------------
    def _event(self, event: Event) -> None:
        assert self.core is not None
        self._run(self.core.handle(event))

    def _run(self, commands: list[Command]) -> None:
        assert self.udp is not None
        for command in commands:
            match command:
                case Reply(data):
                    if self.chan is not None and not self.chan.is_closing():
                        self.chan.write(data)
                case Greeted(hello):
                    self.connection.greeted(hello)
                case ReadTargetInfo():
                    # Inline, not a task: the INFO reply keeps its place among the replies.
                    self._event(TargetInfoRead(self.connection.agent.target.info()))
                case ForwardDns(ident, query):
                    self.tasks.spawn(self._dns(ident, query), f"dns-{ident}")
                case OpenUdp(flow, host, port):
                    self.udp.open(flow, host, port)
                case SendUdp(flow, data):
                    self.udp.send(flow, data)
                case CloseUdp(flow):
                    self.udp.close(flow)
                case Subscribe(port, mode, http_filter):
                    self.tasks.spawn(self._subscribe(port, mode, http_filter), f"subscribe-{port}")
                case EndSession():
                    self.connection.agent.stop(f"the {self.connection.role} ended the session")
                case Fatal(message):
                    log.error("control channel: %s", message)
                    if self.chan is not None:
                        self.chan.close()
                case _:
                    raise TypeError(f"not a control command: {command!r}")

    async def _dns(self, ident: int, query: bytes) -> None:
        assert self.dns is not None
        self._event(DnsAnswered(ident, await self.dns.forward(query)))

    async def _subscribe(self, port: int, mode: str, http_filter: dict | None) -> None:
        self._event(SubscribeDone(port, await self.connection.subscribe(port, mode, http_filter)))

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(UDP_IDLE_SECONDS / 4)
            self._event(Tick(loop.time()))
