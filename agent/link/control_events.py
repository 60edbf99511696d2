"""What the control channel's protocol core (``control.ControlHandler``) is told and what it asks
for: events in, commands out, as frozen dataclasses.

The core is fed the channel's bytes directly (``feed``); everything else it learns is an event
(``handle``): a UDP socket opened, a DNS answer came, the clock moved on. It never does I/O itself;
it returns commands, which the asyncio driver (``control_session.ControlSession``) carries out,
turning their outcomes into further events. The playbook tests script the core with these same
classes (tests/unit/test_control_playbook.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from podtwin.agent.link import wire


class Event:
    """Something the core hears about besides the channel's bytes."""


@dataclass(frozen=True)
class TargetInfoRead(Event):
    """The answer to ``ReadTargetInfo``."""
    info: wire.Info


@dataclass(frozen=True)
class DnsAnswered(Event):
    ident: int
    answer: bytes        # empty: no nameserver answered


@dataclass(frozen=True)
class UdpOpened(Event):
    flow: int


@dataclass(frozen=True)
class UdpOpenFailed(Event):
    flow: int
    reason: str


@dataclass(frozen=True)
class UdpReceived(Event):
    flow: int
    data: bytes


@dataclass(frozen=True)
class SubscribeDone(Event):
    port: int
    error: str | None    # None: the subscription is accepted


@dataclass(frozen=True)
class NoticeFromAgent(Event):
    """Something the agent wants this channel's client to show the user."""
    level: str
    message: str


@dataclass(frozen=True)
class Tick(Event):
    """The time now (the event loop's clock): UDP flows idle for too long are forgotten."""
    now: float


@dataclass(frozen=True)
class ChannelClosed(Event):
    pass


class Command:
    """Something the core asks the driver to do."""


@dataclass(frozen=True)
class Reply(Command):
    data: bytes          # whole frames, to write to the channel as they are


@dataclass(frozen=True)
class Greeted(Command):
    """The client said a valid HELLO (and has been answered): its role is known now."""
    hello: wire.Hello


@dataclass(frozen=True)
class ReadTargetInfo(Command):
    """Read the target's environment and files; answer with ``TargetInfoRead``."""


@dataclass(frozen=True)
class ForwardDns(Command):
    """Send the query to the target's nameservers; answer with ``DnsAnswered``."""
    ident: int
    query: bytes


@dataclass(frozen=True)
class OpenUdp(Command):
    """A connected datagram socket to (host, port); answer with ``UdpOpened`` or ``UdpOpenFailed``,
    and ``UdpReceived`` for each datagram it receives. Replaces nothing: the core closes a flow
    (``CloseUdp``) before it opens another under the same id."""
    flow: int
    host: str
    port: int


@dataclass(frozen=True)
class SendUdp(Command):
    """Only for a flow that is open (``UdpOpened``)."""
    flow: int
    data: bytes


@dataclass(frozen=True)
class CloseUdp(Command):
    """Close the flow's socket, opened or still opening; no event follows for it."""
    flow: int


@dataclass(frozen=True)
class Subscribe(Command):
    """Ask the incoming service for a target port; answer with ``SubscribeDone``."""
    port: int
    mode: str
    http_filter: dict | None


@dataclass(frozen=True)
class EndSession(Command):
    """The client ended the session (END): the agent removes what it set up and exits. Only a
    client holding the session's key gets this far, so it is the runner, or the guard of a
    runner that died."""


@dataclass(frozen=True)
class Fatal(Command):
    """The client broke the protocol: it has been sent ERROR; close the channel. The core takes
    no more input from it."""
    message: str
