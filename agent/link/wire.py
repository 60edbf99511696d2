"""The control-channel protocol between the sidecar/runner (clients) and the agent.

The link is one SSH connection. TCP rides on SSH direct-tcpip channels; everything else (the
handshake, the target's environment and resolver files, DNS queries, UDP datagrams, heartbeats)
rides on one session channel opened as the subsystem ``CONTROL_SUBSYSTEM``, framed as::

    u32 length (of what follows) | u8 message type | payload

Each JSON payload has a typed, frozen payload class beside its constant (``Hello`` for ``HELLO``
...), checked field by field on both ends: a missing field, an extra one or a wrong type is a
``ProtocolError``, never a ``KeyError`` deep inside a handler.

This module is sans-IO: it only turns messages into bytes and bytes into messages. The agent
owns these definitions; the runner is the agent's client and imports them from here.
"""
from __future__ import annotations

import functools
import json
import posixpath
import struct
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, get_args, get_origin, get_type_hints

PROTOCOL_VERSION = 3   # 3: END
CONTROL_SUBSYSTEM = "podtwin-control"
MAX_FRAME = 1 << 20  # a UDP datagram or DNS message is far smaller; anything larger is a bug
SFTP_SUBSYSTEM = "sftp"   # the target's files (agent/files): the name sshfs and every SFTP client ask for
FS_EXPORTS_ENV = "PODTWIN_FS_EXPORTS"   # an sftp channel's environment: its FsExports, as JSON

# client -> agent
HELLO = 0x01          # Hello
INFO_REQUEST = 0x02   # empty
DNS_QUERY = 0x03      # u32 request id + raw DNS message
UDP_OPEN = 0x04       # UdpOpen: u32 flow id + JSON
UDP_SEND = 0x05       # u32 flow id + datagram
UDP_CLOSE = 0x06      # u32 flow id
PING = 0x07           # opaque bytes, echoed
INCOMING_SUBSCRIBE = 0x08  # IncomingSubscribe; then ask to forward (INCOMING_HOST, port)
END = 0x09            # empty: the session is over; the agent removes what it set up and exits
# agent -> client
HELLO_OK = 0x81       # HelloOk
INFO = 0x82           # Info
DNS_ANSWER = 0x83     # u32 request id + raw DNS message (empty: no nameserver answered)
UDP_RECV = 0x85       # u32 flow id + datagram
UDP_CLOSED = 0x86     # u32 flow id + utf-8 reason
PONG = 0x87           # the PING's bytes
INCOMING_REPLY = 0x88  # IncomingReply
NOTICE = 0x89         # Notice: for the runner to show the user
ERROR = 0xFF          # Error: fatal, the agent closes the channel after it

NAMES = {value: name for name, value in globals().items()
         if name.isupper() and isinstance(value, int) and name not in ("PROTOCOL_VERSION", "MAX_FRAME")}

_HEADER = struct.Struct("!IB")
_ID = struct.Struct("!I")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


@dataclass(frozen=True)
class Message:
    type: int
    payload: bytes = b""

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"0x{self.type:02x}")

    def json(self) -> dict:
        return _json_object(self.name, self.payload)

    def split_id(self) -> tuple[int, bytes]:
        """For messages that start with a u32 request/flow id: (id, rest)."""
        if len(self.payload) < _ID.size:
            raise ProtocolError(f"{self.name}: too short for an id")
        return _ID.unpack_from(self.payload)[0], self.payload[_ID.size:]


def encode(msg_type: int, payload: bytes = b"") -> bytes:
    if len(payload) + 1 > MAX_FRAME:
        raise ProtocolError(f"{NAMES.get(msg_type, msg_type)}: frame of {len(payload)} bytes is too large")
    return _HEADER.pack(len(payload) + 1, msg_type) + payload


def encode_json(msg_type: int, value: dict) -> bytes:
    return encode(msg_type, _json_bytes(value))


def encode_id(msg_type: int, ident: int, payload: bytes = b"") -> bytes:
    return encode(msg_type, _ID.pack(ident) + payload)


class FrameDecoder:
    """Feed it bytes as they arrive; it returns the whole messages they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _HEADER.size:
            length, msg_type = _HEADER.unpack_from(self._buf)
            if length < 1 or length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} out of range")
            end = 4 + length
            if len(self._buf) < end:
                break
            out.append(Message(msg_type, bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_object(name: str, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{name}: payload is not JSON") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{name}: payload is not a JSON object")
    return value


# -- typed payloads ---------------------------------------------------------------------------
class Payload:
    """A JSON payload as a frozen dataclass: its fields are the JSON object's keys, checked
    against their annotations when made (so a bad value fails on the sending end too)."""

    TYPE: ClassVar[int]
    ID: ClassVar[str | None] = None   # a field sent as the u32 id before the JSON, not inside it

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value, hint = getattr(self, f.name), hints[f.name]
            if not _conforms(value, hint):
                raise ProtocolError(f"{NAMES[self.TYPE]}: {f.name} must be {_describe(hint)}, not {value!r}")

    def encode(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != self.ID}  # type: ignore[arg-type]
        if self.ID is None:
            return encode_json(self.TYPE, body)
        return encode_id(self.TYPE, getattr(self, self.ID), _json_bytes(body))

    @classmethod
    def decode(cls, msg: Message) -> Self:
        """The payload of ``msg``, which must be a ``TYPE`` message with exactly these fields."""
        if msg.type != cls.TYPE:
            raise ProtocolError(f"expected {NAMES[cls.TYPE]}, got {msg.name}")
        ident: dict[str, int] = {}
        data = msg.payload
        if cls.ID is not None:
            ident[cls.ID], data = msg.split_id()
        body = _json_object(msg.name, data)
        expected = {f.name for f in fields(cls)} - set(ident)  # type: ignore[arg-type]
        if set(body) != expected:
            raise ProtocolError(f"{msg.name}: fields {sorted(body)}, expected {sorted(expected)}")
        return cls(**body, **ident)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is types.UnionType:
        return any(_conforms(value, arm) for arm in get_args(hint))
    if origin is dict:
        key, item = get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item)
                                               for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is int:
        return type(value) is int  # JSON true is no port number, though Python calls bool an int
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint) if get_origin(hint) else hint.__name__


@dataclass(frozen=True)
class Hello(Payload):
    TYPE = HELLO
    version: int
    role: str          # "runner" (owns the agent) or "sidecar"


@dataclass(frozen=True)
class HelloOk(Payload):
    TYPE = HELLO_OK
    version: int
    agent: str


@dataclass(frozen=True)
class Info(Payload):
    """The target as the app should see it."""
    TYPE = INFO
    pid: int
    env: dict[str, str]
    resolv_conf: str
    hosts: str
    hostname: str
    ipv6: bool = False   # the target's network has a global IPv6 address: the app's gets IPv6 too


@dataclass(frozen=True)
class UdpOpen(Payload):
    TYPE = UDP_OPEN
    ID = "flow"
    flow: int          # chosen by the client; names the flow in UDP_SEND/RECV/CLOSE/CLOSED
    host: str
    port: int          # not range-checked here: an impossible port is the flow's failure, not a protocol error


@dataclass(frozen=True)
class IncomingSubscribe(Payload):
    TYPE = INCOMING_SUBSCRIBE
    port: int
    mode: str                  # "steal" or "mirror"
    http_filter: dict | None   # steal only the HTTP requests it matches (agent/incoming/http/filter.py)


@dataclass(frozen=True)
class IncomingReply(Payload):
    TYPE = INCOMING_REPLY
    port: int
    error: str | None   # None: accepted


@dataclass(frozen=True)
class Notice(Payload):
    TYPE = NOTICE
    level: str          # "info", "warning", "error", or "fatal": the session cannot do what it was asked
    message: str


@dataclass(frozen=True)
class Error(Payload):
    TYPE = ERROR
    message: str


@dataclass(frozen=True)
class FsExport:
    """One path an sftp channel may serve: a directory (and all below it) or a file.

    ``path`` is where the client sees it; ``source`` where it is in the target (``feature.fs.mapping``),
    the same path when None. ``write`` is the default for the paths in it (``feature.fs.mode``),
    ``writable`` whether any of them may be written at all (the target's mount is): a
    ``read_write`` rule lifts a path to writable only within an export that is."""
    path: str      # absolute and normalised; never "/" (the whole root)
    write: bool = False
    writable: bool = False
    source: str | None = None

    def __post_init__(self) -> None:
        if (not isinstance(self.path, str) or not isinstance(self.write, bool) or not isinstance(self.writable, bool)
                or not isinstance(self.source, (str, type(None)))):
            raise ProtocolError(f"{FS_EXPORTS_ENV}: an export is a path and a source (strings), "
                                "write and writable (booleans)")
        for path in (self.path, self.source or self.path):
            if (not path.startswith("/") or path.startswith("//") or "\0" in path
                    or posixpath.normpath(path) != path):
                raise ProtocolError(f"{FS_EXPORTS_ENV}: {path!r} is not an absolute, normalised path")
            if path == "/":
                raise ProtocolError(f"{FS_EXPORTS_ENV}: the whole root cannot be exported, only paths in it")
        if self.write and not self.writable:
            raise ProtocolError(f"{FS_EXPORTS_ENV}: {self.path} is written by default but not writable")

    @property
    def target_path(self) -> str:
        return self.source or self.path


FS_RULE_KINDS = ("not_found", "read_write", "read_only")   # mirrord's order of decision


@dataclass(frozen=True)
class FsExports:
    """What one sftp channel serves, sent by the client in the channel's environment
    (``FS_EXPORTS_ENV``) as ``{"exports": [{"path", "write", "writable", "source"}, ...],
    "not_found": [regex, ...], "read_write": [...], "read_only": [...]}``: per channel, so each
    mount can ask for its own set, and checked like every payload here. The regex lists are
    mirrord's ``feature.fs`` lists, searched case-insensitively in each path as the target names
    it, per file, in that order."""
    exports: tuple[FsExport, ...]
    not_found: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.exports:
            raise ProtocolError(f"{FS_EXPORTS_ENV}: no exports")
        paths = [export.path for export in self.exports]
        if len(set(paths)) != len(paths):
            raise ProtocolError(f"{FS_EXPORTS_ENV}: a path is exported twice")
        for kind in FS_RULE_KINDS:
            patterns = getattr(self, kind)
            if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
                raise ProtocolError(f"{FS_EXPORTS_ENV}: {kind} is a list of regexes")

    def encode(self) -> str:
        return json.dumps({"exports": [{"path": e.path, "write": e.write, "writable": e.writable, "source": e.source}
                                       for e in self.exports],
                           **{kind: list(getattr(self, kind)) for kind in FS_RULE_KINDS}}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes | None) -> Self:
        if text is None:
            raise ProtocolError(f"{FS_EXPORTS_ENV} is not set on the channel: nothing to serve")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"{FS_EXPORTS_ENV}: not JSON") from exc
        fields = {"path", "write", "writable", "source"}
        if (not isinstance(value, dict) or set(value) != {"exports", *FS_RULE_KINDS}
                or not isinstance(value["exports"], list)
                or not all(isinstance(item, dict) and set(item) == fields for item in value["exports"])
                or not all(isinstance(value[kind], list) for kind in FS_RULE_KINDS)):
            raise ProtocolError(f'{FS_EXPORTS_ENV}: expected {{"exports": [{{"path", "write", "writable", '
                                f'"source"}}, ...], "not_found": [...], "read_write": [...], "read_only": [...]}}')
        return cls(tuple(FsExport(**item) for item in value["exports"]),
                   **{kind: tuple(value[kind]) for kind in FS_RULE_KINDS})


def check_hello(msg: Message, expected: type[Hello] | type[HelloOk] = HelloOk) -> Hello | HelloOk:
    """Validate the peer's greeting (the agent expects ``Hello``, a client ``HelloOk``): the
    message type and the protocol version must match exactly, then the payload's fields."""
    if msg.type != expected.TYPE:
        raise ProtocolError(f"expected {NAMES[expected.TYPE]}, got {msg.name}")
    version = msg.json().get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {version!r}, we speak {PROTOCOL_VERSION}"
            " — use the podtwin image built from the same podtwin version (`podtwin images build`)")
    return expected.decode(msg)


# The host name of the remote forwards that carry incoming connections (agent -> client): the
# client asks to forward (INCOMING_HOST, port) for each port it subscribed.
INCOMING_HOST = "podtwin-incoming"
