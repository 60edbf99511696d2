"""The router interface of the HTTP filter: the events a driver feeds in, the commands it gets back.

A stolen connection has up to three sides: the CLIENT that connected to the target's port, the
developer's LOCAL app (through the SSH link) and the TARGET's own process (the original
destination). A ``Router`` decides what goes where and does no I/O: the driver
(``podtwin.agent.incoming.http.relay``) turns what happens on the sockets and its clock into
events, hands each to ``Router.handle`` and executes the commands that come back, in order. So
the routing is tested by feeding events and comparing command lists (mitmproxy's sans-IO layers
and playbooks), with no sockets and no waiting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

LOCAL = "local"
TARGET = "target"
CLIENT = "client"


# ---------------------------------------------------------------------------------------------
# Events (driver -> router)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """The client connection was accepted; the first event a router gets."""


@dataclass(frozen=True)
class DataReceived:
    """Bytes read from ``source`` (CLIENT, LOCAL or TARGET); never empty (see EofReceived)."""
    source: str
    data: bytes


@dataclass(frozen=True)
class EofReceived:
    """``source`` will send nothing more (end of file, reset, or a read error)."""
    source: str


@dataclass(frozen=True)
class ConnectFailed:
    """The Connect to ``dest`` failed; what was meant for that connection was not written."""
    dest: str
    reason: str = ""


@dataclass(frozen=True)
class Woken:
    """The time a Wake asked for has passed."""


Event = Start | DataReceived | EofReceived | ConnectFailed | Woken


# ---------------------------------------------------------------------------------------------
# Commands (router -> driver)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connect:
    """Open the connection to ``dest`` (LOCAL or TARGET); later commands may write to it."""
    dest: str


@dataclass(frozen=True)
class Send:
    dest: str  # LOCAL, TARGET or CLIENT
    data: bytes


@dataclass(frozen=True)
class Shutdown:
    """Half-close: no more bytes will be written to ``dest`` (TCP FIN), reading goes on."""
    dest: str


@dataclass(frozen=True)
class Close:
    """Close ``dest``; Close(CLIENT) ends the whole relay."""
    dest: str


@dataclass(frozen=True)
class Passthrough:
    """From now on bytes are relayed unchanged between the client and ``dest`` (informational)."""
    dest: str


@dataclass(frozen=True)
class Wake:
    """Feed a Woken event back in ``after`` seconds: how a router that waits for bytes gives up."""
    after: float


Command = Connect | Send | Shutdown | Close | Passthrough | Wake


class Router(Protocol):
    """What every router is, and all the driver knows of one: each event in, its commands out."""

    def handle(self, event: Event) -> list[Command]:
        """The commands this event calls for, in the order they are to be executed."""
        ...
