"""The control-channel framing (agent/link/wire.py): bytes in, messages out, however the bytes arrive."""
from __future__ import annotations

import struct

import pytest

from podtwin.agent.link import wire

FRAMES = [
    (wire.HELLO, b'{"version":1,"role":"runner"}'),
    (wire.INFO_REQUEST, b""),
    (wire.UDP_SEND, struct.pack("!I", 7) + b"\x00\x01datagram\xff"),
    (wire.PING, b"x" * 300),
    (wire.ERROR, b'{"message":"bye"}'),
]
STREAM = b"".join(wire.encode(t, p) for t, p in FRAMES)


def decoded(messages) -> list[tuple[int, bytes]]:
    return [(m.type, m.payload) for m in messages]


def test_encode_layout():
    assert wire.encode(wire.PING, b"abc") == b"\x00\x00\x00\x04\x07abc"   # length counts the type byte
    assert wire.encode(wire.INFO_REQUEST) == b"\x00\x00\x00\x01\x02"
    assert wire.encode_json(wire.HELLO, {"a": 1}) == b"\x00\x00\x00\x08\x01" + b'{"a":1}'


def test_whole_stream_in_one_feed():
    dec = wire.FrameDecoder()
    assert decoded(dec.feed(STREAM)) == FRAMES
    assert dec.pending == 0


def test_byte_by_byte():
    dec = wire.FrameDecoder()
    out = []
    ends = []
    for i in range(len(STREAM)):
        got = dec.feed(STREAM[i:i + 1])
        if got:
            ends.append(i + 1)
        out += got
    assert decoded(out) == FRAMES
    # each message comes out exactly when its last byte arrives, not before and not later
    boundaries, pos = [], 0
    for t, p in FRAMES:
        pos += 5 + len(p)
        boundaries.append(pos)
    assert ends == boundaries
    assert dec.pending == 0


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 6, 40, len(STREAM) - 1])
def test_split_anywhere_and_merged_with_the_next(cut):
    dec = wire.FrameDecoder()
    first = dec.feed(STREAM[:cut])
    assert dec.pending == cut - sum(5 + len(p) for _, p in decoded(first))
    assert decoded(first + dec.feed(STREAM[cut:])) == FRAMES
    assert dec.pending == 0


def test_irregular_chunks():
    dec = wire.FrameDecoder()
    out, pos, sizes = [], 0, [2, 7, 1, 64, 3, 500, 9]
    i = 0
    while pos < len(STREAM):
        step = sizes[i % len(sizes)]
        out += dec.feed(STREAM[pos:pos + step])
        pos += step
        i += 1
    assert decoded(out) == FRAMES


def test_empty_feed_and_partial_header_return_nothing():
    dec = wire.FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.feed(b"\x00\x00\x00") == []
    assert dec.pending == 3


def test_oversize_frame_is_a_protocol_error_as_soon_as_the_header_arrives():
    dec = wire.FrameDecoder()
    header = struct.pack("!IB", wire.MAX_FRAME + 1, wire.UDP_SEND)
    with pytest.raises(wire.ProtocolError, match="out of range"):
        dec.feed(header)  # no need to wait for (or buffer) a megabyte of payload


def test_largest_allowed_frame_passes():
    payload = b"\xab" * (wire.MAX_FRAME - 1)
    frame = wire.encode(wire.PING, payload)
    assert decoded(wire.FrameDecoder().feed(frame)) == [(wire.PING, payload)]


def test_zero_length_frame_is_a_protocol_error():
    with pytest.raises(wire.ProtocolError):
        wire.FrameDecoder().feed(b"\x00\x00\x00\x00\x07")


def test_encode_refuses_an_oversize_payload():
    with pytest.raises(wire.ProtocolError, match="too large"):
        wire.encode(wire.UDP_SEND, b"x" * wire.MAX_FRAME)


def test_encode_id_split_id_round_trip():
    for ident in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF):
        for payload in (b"", b"\x00", b"dns message bytes"):
            (msg,) = wire.FrameDecoder().feed(wire.encode_id(wire.DNS_QUERY, ident, payload))
            assert msg.type == wire.DNS_QUERY
            assert msg.split_id() == (ident, payload)


def test_split_id_too_short():
    with pytest.raises(wire.ProtocolError, match="UDP_CLOSE: too short"):
        wire.Message(wire.UDP_CLOSE, b"\x00\x01").split_id()


def test_json_payload_errors_are_protocol_errors():
    with pytest.raises(wire.ProtocolError, match="INFO: payload is not JSON"):
        wire.Message(wire.INFO, b"{nope").json()
    with pytest.raises(wire.ProtocolError, match="not a JSON object"):
        wire.Message(wire.INFO, b"[1, 2]").json()


def test_check_hello_accepts_the_same_version():
    hello = wire.encode_json(wire.HELLO, {"version": wire.PROTOCOL_VERSION, "role": "sidecar"})
    body = wire.check_hello(wire.FrameDecoder().feed(hello)[0], expected=wire.Hello)
    assert body == wire.Hello(wire.PROTOCOL_VERSION, "sidecar")


def test_check_hello_version_mismatch_names_both_versions_and_the_fix():
    msg = wire.Message(wire.HELLO_OK, b'{"version": 99, "agent": "podtwin-agent"}')
    with pytest.raises(wire.ProtocolError) as info:
        wire.check_hello(msg)
    text = str(info.value)
    assert "protocol version mismatch" in text
    assert "peer speaks 99" in text and f"we speak {wire.PROTOCOL_VERSION}" in text
    assert "podtwin images build" in text


def test_check_hello_missing_version_and_wrong_type():
    with pytest.raises(wire.ProtocolError, match="peer speaks None"):
        wire.check_hello(wire.Message(wire.HELLO, b"{}"), expected=wire.Hello)
    with pytest.raises(wire.ProtocolError, match="expected HELLO, got PING"):
        wire.check_hello(wire.Message(wire.PING, b""), expected=wire.Hello)
    # each side accepts only the other side's greeting: a client's HELLO is no agent's HELLO_OK
    with pytest.raises(wire.ProtocolError, match="expected HELLO_OK, got HELLO"):
        wire.check_hello(wire.Message(wire.HELLO, b'{"version": 1}'))
    with pytest.raises(wire.ProtocolError, match="expected HELLO, got HELLO_OK"):
        wire.check_hello(wire.Message(wire.HELLO_OK, b'{"version": 1}'), expected=wire.Hello)


def test_names_cover_every_message_constant():
    constants = {name: value for name, value in vars(wire).items()
                 if name.isupper() and not name.startswith("_") and isinstance(value, int)
                 and name not in ("PROTOCOL_VERSION", "MAX_FRAME")}
    assert constants, "no message constants found"
    assert wire.NAMES == {value: name for name, value in constants.items()}
    assert len(set(constants.values())) == len(constants), "two message types share a value"
    assert all(0 <= v <= 0xFF for v in constants.values())  # the type is one byte on the wire
    assert wire.Message(wire.UDP_RECV).name == "UDP_RECV"
    assert wire.Message(0x42).name == "0x42"


# -- typed payloads ---------------------------------------------------------------------------
PAYLOADS = [
    wire.Hello(wire.PROTOCOL_VERSION, "runner"),
    wire.HelloOk(wire.PROTOCOL_VERSION, "podtwin-agent"),
    wire.Info(pid=7, env={"A": "1", "EMPTY": ""}, resolv_conf="nameserver 10.0.0.10\n",
              hosts="127.0.0.1\tlocalhost\n", hostname="demo"),
    wire.UdpOpen(0xFFFFFFFF, "10.0.0.10", 53),
    wire.IncomingSubscribe(8080, "steal", {"header_filter": "x-user: me"}),
    wire.IncomingSubscribe(80, "mirror", None),
    wire.IncomingReply(80, None),
    wire.IncomingReply(80, "port 80 is already stolen"),
    wire.Notice("info", "stealing port 80"),
    wire.Error("unexpected message PING"),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_payload_survives_the_wire(payload):
    (msg,) = wire.FrameDecoder().feed(payload.encode())
    assert msg.type == payload.TYPE
    assert type(payload).decode(msg) == payload


def test_payload_bytes_are_the_documented_json():
    assert wire.Hello(2, "runner").encode() == wire.encode(wire.HELLO, b'{"version":2,"role":"runner"}')
    assert wire.UdpOpen(5, "10.0.0.1", 53).encode() == wire.encode_id(
        wire.UDP_OPEN, 5, b'{"host":"10.0.0.1","port":53}')
    assert wire.IncomingReply(80, None).encode() == wire.encode(wire.INCOMING_REPLY, b'{"port":80,"error":null}')


def test_every_json_message_has_its_payload_class():
    classes = {cls.TYPE for cls in vars(wire).values()
               if isinstance(cls, type) and issubclass(cls, wire.Payload) and cls is not wire.Payload}
    assert classes == {wire.HELLO, wire.HELLO_OK, wire.INFO, wire.UDP_OPEN, wire.INCOMING_SUBSCRIBE,
                       wire.INCOMING_REPLY, wire.NOTICE, wire.ERROR}


@pytest.mark.parametrize("cls, payload, complaint", [
    (wire.Hello, b'{"version":2}', r"fields \['version'\], expected \['role', 'version'\]"),
    (wire.Hello, b'{"version":2,"role":"runner","extra":1}', "fields"),
    (wire.Hello, b'{"version":"2","role":"runner"}', "version must be int, not '2'"),
    (wire.Hello, b'{"version":true,"role":"runner"}', "version must be int, not True"),
    (wire.Notice, b'{"level":"info","message":null}', "message must be str, not None"),
    (wire.IncomingReply, b'{"port":80,"error":5}', "error must be str | None, not 5"),
    (wire.IncomingSubscribe, b'{"port":80,"mode":"steal","http_filter":[]}', "http_filter must be dict | None"),
    (wire.Info, b'{"pid":1,"env":{"A":1},"resolv_conf":"","hosts":"","hostname":"","ipv6":false}',
     r"env must be dict\[str, str\]"),
    (wire.Error, b'["not", "an", "object"]', "not a JSON object"),
])
def test_a_payload_that_is_not_what_its_type_says_is_a_protocol_error(cls, payload, complaint):
    with pytest.raises(wire.ProtocolError, match=complaint):
        cls.decode(wire.Message(cls.TYPE, payload))


def test_udp_open_carries_the_flow_as_its_id():
    with pytest.raises(wire.ProtocolError, match="UDP_OPEN: too short for an id"):
        wire.UdpOpen.decode(wire.Message(wire.UDP_OPEN, b"\x00"))
    with pytest.raises(wire.ProtocolError, match=r"fields \['flow', 'host', 'port'\]"):
        wire.UdpOpen.decode(wire.Message(wire.UDP_OPEN, b"\x00\x00\x00\x01" + b'{"flow":1,"host":"h","port":1}'))
    # an impossible port is the flow's failure (UDP_CLOSED), not the channel's
    assert wire.UdpOpen.decode(wire.Message(wire.UDP_OPEN, b"\x00\x00\x00\x01" + b'{"host":"h","port":70000}')).port == 70000


def test_a_payload_of_another_message_is_refused():
    with pytest.raises(wire.ProtocolError, match="expected NOTICE, got ERROR"):
        wire.Notice.decode(wire.Message(wire.ERROR, b'{"message":"x"}'))


def test_a_bad_payload_fails_on_the_sending_end_too():
    with pytest.raises(wire.ProtocolError, match="INCOMING_SUBSCRIBE: port must be int"):
        wire.IncomingSubscribe("80", "steal", None)
