"""The router for bytes that are not filtered: not HTTP, TLS, or an upgraded HTTP/1.1 connection."""
from __future__ import annotations

from podtwin.agent.incoming.http.commands import (CLIENT, TARGET, Close, Command, Connect,
                                                  ConnectFailed, DataReceived, EofReceived, Event,
                                                  Passthrough, Send, Shutdown, Start)


class RawRouter:
    """Bytes unchanged both ways between the client and one destination, half-closes included.

    ``connect=False`` when the connection to ``dest`` is open already (an HTTP/1.1 upgrade).
    """

    def __init__(self, dest: str = TARGET, connect: bool = True) -> None:
        self.dest = dest
        self.connect = connect
        self.peer = {CLIENT: dest, dest: CLIENT}  # where what one side sends goes
        self.eof = {CLIENT: False, dest: False}

    def handle(self, event: Event) -> list[Command]:
        if isinstance(event, Start):
            return ([Connect(self.dest)] if self.connect else []) + [Passthrough(self.dest)]
        if isinstance(event, DataReceived) and event.source in self.peer and event.data:
            return [Send(self.peer[event.source], event.data)]
        if isinstance(event, EofReceived) and event.source in self.peer:
            return self._eof(event.source)
        if isinstance(event, ConnectFailed) and event.dest == self.dest:
            return [Close(CLIENT)]
        return []

    def _eof(self, side: str) -> list[Command]:
        if self.eof[side]:
            return []
        self.eof[side] = True
        other = self.peer[side]
        if all(self.eof.values()):
            return [Shutdown(other), Close(self.dest), Close(CLIENT)]
        return [Shutdown(other)]
