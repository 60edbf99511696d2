"""The control-channel protocol between the sidecar/runner (clients) and the agent.

The link is one SSH connection. TCP rides on SSH direct-tcpip channels; everything else (the
handshake, the target's environment and resolver files, DNS queries, UDP datagrams, heartbeats)
rides on one session channel opened as the subsystem ``CONTROL_SUBSYSTEM``, framed as::

    u32 length (of what follows) | u8 message type | payload

This module is sans-IO: it only turns messages into bytes and bytes into messages. The agent
owns these definitions; the runner is the agent's client and imports them from here.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 2
CONTROL_SUBSYSTEM = "podtwin-control"
MAX_FRAME = 1 << 20  # a UDP datagram or DNS message is far smaller; anything larger is a bug

# client -> agent
HELLO = 0x01          # JSON {"version", "role"}
INFO_REQUEST = 0x02   # empty
DNS_QUERY = 0x03      # u32 request id + raw DNS message
UDP_OPEN = 0x04       # u32 flow id + JSON {"host", "port"}
UDP_SEND = 0x05       # u32 flow id + datagram
UDP_CLOSE = 0x06      # u32 flow id
PING = 0x07           # opaque bytes, echoed
INCOMING_SUBSCRIBE = 0x08  # JSON {"port", "mode", "http_filter"}: then ask to forward (INCOMING_HOST, port)
# agent -> client
HELLO_OK = 0x81       # JSON {"version", "agent"}
INFO = 0x82           # JSON {"env", "resolv_conf", "hosts", "hostname", "pid"}
DNS_ANSWER = 0x83     # u32 request id + raw DNS message (empty: no nameserver answered)
UDP_RECV = 0x85       # u32 flow id + datagram
UDP_CLOSED = 0x86     # u32 flow id + utf-8 reason
PONG = 0x87           # the PING's bytes
INCOMING_REPLY = 0x88  # JSON {"port", "error"}: error is null when the subscription is accepted
NOTICE = 0x89         # JSON {"level", "message"}: for the runner to show the user
ERROR = 0xFF          # JSON {"message"}: fatal, the agent closes the channel after it

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
        try:
            value = json.loads(self.payload)
        except ValueError as exc:
            raise ProtocolError(f"{self.name}: payload is not JSON") from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.name}: payload is not a JSON object")
        return value

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
    return encode(msg_type, json.dumps(value, separators=(",", ":")).encode())


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


def check_hello(msg: Message, expected: int = HELLO_OK) -> dict:
    """Validate the peer's greeting (the agent expects HELLO, a client HELLO_OK): the message
    type and the protocol version must match exactly."""
    if msg.type != expected:
        raise ProtocolError(f"expected {NAMES[expected]}, got {msg.name}")
    body = msg.json()
    if body.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {body.get('version')!r}, we speak {PROTOCOL_VERSION}"
            " — use the podtwin image built from the same podtwin version (`podtwin images build`)")
    return body
