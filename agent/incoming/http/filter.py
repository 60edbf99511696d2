"""The HTTP filter's matcher: which requests on a stolen connection go to the developer's app.

A connection stolen from the target's port reaches the agent; each HTTP *request* on it goes
either to the developer's LOCAL app (through the SSH link), when ``HttpFilter.matches`` says so,
or to the TARGET's own process (the original destination). The routers that read the requests
and carry them across are in ``http1`` and ``http2`` (``router`` picks one per connection);
``commands`` is their interface.

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
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_PORTS = (80, 8080)  # mirrord's default for http_filter.ports


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
