"""HTTP request filtering for stolen incoming connections: the matcher, and what routers share.

A connection stolen from the target's port reaches the agent; each HTTP *request* on it goes
either to the developer's LOCAL app (through the SSH link) or to the TARGET's own process (the
original destination). Nothing here does I/O: routers are fed events (bytes from the client or
from an upstream, an end of file, a failed connect) and return commands for
``podtwin.agent.incoming.http.relay`` to execute. Destinations are the strings ``LOCAL``, ``TARGET`` and
``CLIENT``.

Matching semantics (mirrord's ``feature.network.incoming.http_filter``):

* ``header_filter``: a regex searched (``re.search``) in each header rendered as ``name: value``
  with the name LOWERCASED (HTTP header names are case-insensitive and HTTP/2 sends them
  lowercase anyway, so ``^x-podtwin-user: alice$`` works for ``X-Podtwin-User: alice`` too). The
  value keeps its case. For HTTP/2 the ``:authority`` pseudo-header is also offered as
  ``host: ...`` when there is no ``host`` header, so host filters work on both protocols.
* ``path_filter``: a regex searched in the request target's path INCLUDING the query string
  (``/api/items?id=3``), as sent on the request line or in ``:path``; an absolute-form target
  (``http://host/p``) is reduced to its path. ``^/api/`` and ``/api/items$``-style filters behave
  as expected; to ignore the query use ``^/api/items(\\?|$)``.
* ``method_filter``: case-insensitive equality with the request method.
* ``any_of`` / ``all_of``: lists of ``{"header"|"path"|"method": pattern}`` with the same meaning.
Regexes are Python ``re`` (mirrord uses the fancy-regex crate; common syntax is the same).

The routers: ``RawRouter`` (here: bytes unchanged), ``http1.Http1Router`` (h11),
``http2.Http2Router`` (h2), and ``httprouter.ConnectionRouter``, which detects the protocol of a
connection and hands it to one of them. Common interface: start(), client_data(), client_eof(),
upstream_data(), upstream_eof(), connect_failed(); each returns a list of commands.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

LOCAL = "local"
TARGET = "target"
CLIENT = "client"

DEFAULT_PORTS = (80, 8080)  # mirrord's default for http_filter.ports


# ---------------------------------------------------------------------------------------------
# The matcher
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    kind: str  # "header" | "path" | "method"
    pattern: str
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, kind: str, pattern: object) -> "Condition":
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"http_filter {kind}: expected a non-empty string, got {pattern!r}")
        if kind == "method":
            return cls(kind, pattern)
        try:
            return cls(kind, pattern, re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"http_filter {kind}: invalid regex {pattern!r}: {exc}") from exc

    def holds(self, method: str, path: str, header_lines: list[str]) -> bool:
        if self.kind == "method":
            return method.upper() == self.pattern.upper()
        assert self.regex is not None
        if self.kind == "path":
            return self.regex.search(path) is not None
        return any(self.regex.search(line) for line in header_lines)


@dataclass(frozen=True)
class HttpFilter:
    """A parsed ``http_filter``: ``mode`` "all" needs every condition, "any" needs one."""
    conditions: tuple[Condition, ...]
    mode: str = "all"
    ports: tuple[int, ...] = DEFAULT_PORTS

    _SINGLE = {"header_filter": "header", "path_filter": "path", "method_filter": "method"}

    @classmethod
    def from_dict(cls, d: dict) -> "HttpFilter":
        kinds = [k for k in (*cls._SINGLE, "any_of", "all_of") if d.get(k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"http_filter needs exactly one of header_filter, path_filter, "
                             f"method_filter, any_of, all_of; got {kinds or 'none'}")
        ports = tuple(int(p) for p in d.get("ports") or DEFAULT_PORTS)
        kind = kinds[0]
        if kind in cls._SINGLE:
            return cls((Condition.make(cls._SINGLE[kind], d[kind]),), "all", ports)
        items = d[kind]
        if not isinstance(items, list) or not items:
            raise ValueError(f"http_filter {kind}: expected a non-empty list")
        conditions = []
        for item in items:
            if not isinstance(item, dict) or len(item) != 1 or \
                    next(iter(item)) not in ("header", "path", "method"):
                raise ValueError(f"http_filter {kind}: each entry is one of "
                                 f"{{header|path|method: pattern}}, got {item!r}")
            (ckind, pattern), = item.items()
            conditions.append(Condition.make(ckind, pattern))
        return cls(tuple(conditions), "all" if kind == "all_of" else "any", ports)

    def matches(self, method: str, path: str, headers: list[tuple[str, str]]) -> bool:
        """True when the request goes to the LOCAL app."""
        lines = [f"{name.lower()}: {value}" for name, value in headers]
        results = (c.holds(method, path, lines) for c in self.conditions)
        return all(results) if self.mode == "all" else any(results)

    def filters_port(self, port: int) -> bool:
        return port in self.ports


def request_path(target: str) -> str:
    """Origin-form stays as is (path + query); absolute-form loses scheme and authority."""
    m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", target)
    if m:
        return target[m.end():] or "/"
    return target


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


Command = Connect | Send | Shutdown | Close | Passthrough


class RawRouter:
    """Bytes unchanged both ways between the client and one destination, half-closes included."""

    def __init__(self, dest: str = TARGET, connect: bool = True) -> None:
        self.dest = dest
        self.connect = connect
        self.eof = {CLIENT: False, dest: False}

    def start(self) -> list[Command]:
        return ([Connect(self.dest)] if self.connect else []) + [Passthrough(self.dest)]

    def client_data(self, data: bytes) -> list[Command]:
        return [Send(self.dest, data)] if data else []

    def upstream_data(self, dest: str, data: bytes) -> list[Command]:
        return [Send(CLIENT, data)] if dest == self.dest and data else []

    def client_eof(self) -> list[Command]:
        return self._eof(CLIENT, self.dest)

    def upstream_eof(self, dest: str) -> list[Command]:
        return self._eof(self.dest, CLIENT) if dest == self.dest else []

    def _eof(self, side: str, other: str) -> list[Command]:
        if self.eof[side]:
            return []
        self.eof[side] = True
        if all(self.eof.values()):
            return [Shutdown(other), Close(self.dest), Close(CLIENT)]
        return [Shutdown(other)]

    def connect_failed(self, dest: str, reason: str = "") -> list[Command]:
        return [Close(CLIENT)] if dest == self.dest else []




def coalesce(commands: list[Command]) -> list[Command]:
    """Join consecutive Sends to the same destination: fewer writes, readable playbooks."""
    out: list[Command] = []
    for command in commands:
        if isinstance(command, Send) and out and isinstance(out[-1], Send) \
                and out[-1].dest == command.dest:
            out[-1] = Send(command.dest, out[-1].data + command.data)
        else:
            out.append(command)
    return out


