"""TCP reassembly for mirror mode (agent/incoming/mirror/reassembly.py) as playbooks: packets in, flow events out.

No sockets: the packets are built here byte by byte, time is a number we choose.
``Playbook() >> packet << expected_event`` feeds a packet (or a ``Tick``) and checks the next event.
"""
from __future__ import annotations

import socket
import struct

import pytest

from podtwin.agent.incoming.mirror import reassembly
from podtwin.agent.incoming.mirror.reassembly import (ACK, FIN, PSH, RST, SYN, FlowData, FlowEnded, FlowStarted,
                                      Reassembler, parse_ethernet, parse_ip)

CLIENT = ("10.0.0.2", 40000)
SERVER = ("10.0.0.1", 80)


def tcp_packet(seq: int, data: bytes = b"", flags: int = ACK | PSH, *, src: tuple = CLIENT,
               dst: tuple = SERVER, ip_options: bytes = b"", total_length: int | None = None,
               frag: int = 0x4000) -> bytes:
    """An IPv4 (or IPv6, by address) packet with a TCP segment; checksums left zero like TSO."""
    tcp = struct.pack(">HHIIBBHHH", src[1], dst[1], seq % (1 << 32), 0, 5 << 4, flags, 65535, 0, 0)
    if ":" in src[0]:
        return (struct.pack(">IHBB", 6 << 28, len(tcp) + len(data), socket.IPPROTO_TCP, 64)
                + socket.inet_pton(socket.AF_INET6, src[0])
                + socket.inet_pton(socket.AF_INET6, dst[0]) + tcp + data)
    ihl = 5 + len(ip_options) // 4
    length = 4 * ihl + len(tcp) + len(data) if total_length is None else total_length
    ip = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, frag, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + ip_options + tcp + data


def syn(isn: int, data: bytes = b"", **kw) -> bytes:
    return tcp_packet(isn, data, SYN, **kw)


def seg(seq: int, data: bytes = b"", flags: int = ACK | PSH, **kw) -> bytes:
    return tcp_packet(seq, data, flags, **kw)


class Tick:
    def __init__(self, now: float) -> None:
        self.now = now


class Playbook:
    """``>> packet_or_tick`` feeds, ``<< event`` expects the next output; truthy when all consumed."""

    def __init__(self, reassembler: Reassembler | None = None) -> None:
        self.r = reassembler or Reassembler()
        self.now = 0.0
        self.pending: list = []

    def __rshift__(self, item) -> "Playbook":
        if isinstance(item, Tick):
            self.now = item.now
            self.pending += self.r.tick(self.now)
        else:
            self.pending += self.r.feed_packet(item, self.now)
        return self

    def __lshift__(self, expected) -> "Playbook":
        assert self.pending, f"expected {expected}, got nothing"
        got = self.pending.pop(0)
        assert got == expected, f"expected {expected}, got {got}"
        return self

    def __bool__(self) -> bool:
        assert not self.pending, f"unexpected events: {self.pending}"
        return True


START = FlowStarted(1, CLIENT, SERVER)


# -- the ordinary life of a connection ----------------------------------------------------
def test_handshake_data_in_order_then_fin():
    assert (Playbook()
            >> syn(1000) << START
            >> seg(1001, b"", ACK)  # the third handshake packet: nothing to say
            >> seg(1001, b"GET / HTTP/1.1\r\n") << FlowData(1, b"GET / HTTP/1.1\r\n")
            >> seg(1017, b"Host: x\r\n\r\n") << FlowData(1, b"Host: x\r\n\r\n")
            >> seg(1028, b"", FIN | ACK) << FlowEnded(1, "fin"))


def test_fin_carrying_data():
    assert (Playbook() >> syn(0) << START
            >> seg(1, b"bye", FIN | ACK) << FlowData(1, b"bye") << FlowEnded(1, "fin"))


def test_data_on_syn_fast_open_is_delivered():
    assert Playbook() >> syn(500, b"early") << START << FlowData(1, b"early")


def test_two_connections_are_separate_flows():
    other = ("10.0.0.3", 40001)
    assert (Playbook()
            >> syn(100) << START
            >> syn(900, src=other) << FlowStarted(2, other, SERVER)
            >> seg(901, b"second", src=other) << FlowData(2, b"second")
            >> seg(101, b"first") << FlowData(1, b"first"))


# -- out of order, duplicates, overlaps ----------------------------------------------------
def test_out_of_order_segments_wait_for_the_hole():
    assert (Playbook() >> syn(0) << START
            >> seg(7, b"three")
            >> seg(4, b"two")
            >> seg(1, b"one") << FlowData(1, b"onetwothree")
            >> seg(12, b"four") << FlowData(1, b"four"))


def test_fin_out_of_order_waits_for_the_data_before_it():
    assert (Playbook() >> syn(0) << START
            >> seg(4, b"", FIN | ACK)
            >> seg(1, b"abc") << FlowData(1, b"abc") << FlowEnded(1, "fin"))


def test_duplicates_and_retransmissions_are_dropped():
    book = (Playbook() >> syn(0) << START
            >> syn(0)                      # retransmitted SYN
            >> seg(1, b"hello") << FlowData(1, b"hello")
            >> seg(1, b"hello")            # retransmission
            >> seg(6, b"!") << FlowData(1, b"!")
            >> seg(9, b"later") >> seg(9, b"later")   # duplicated while out of order
            >> seg(7, b"xy") << FlowData(1, b"xylater"))
    assert book
    assert book.r.stats["duplicate_bytes"] == 5


def test_overlapping_segments_deliver_each_byte_once():
    assert (Playbook() >> syn(0) << START
            >> seg(1, b"0123456789") << FlowData(1, b"0123456789")
            >> seg(6, b"56789abcde") << FlowData(1, b"abcde")        # head already delivered
            >> seg(20, b"jklmn") >> seg(18, b"hijk")                   # overlapping, both pending
            >> seg(16, b"fg") << FlowData(1, b"fghijklmn"))


def test_overlap_conflicts_first_delivered_copy_wins():
    assert (Playbook() >> syn(0) << START
            >> seg(1, b"aaaa") << FlowData(1, b"aaaa")
            >> seg(3, b"XXXXbb") << FlowData(1, b"XXbb"))


# -- ends ---------------------------------------------------------------------------------
def test_rst_ends_at_once_and_discards_pending():
    assert (Playbook() >> syn(0) << START
            >> seg(1, b"ok") << FlowData(1, b"ok")
            >> seg(10, b"never")
            >> seg(3, b"", RST) << FlowEnded(1, "rst"))


def test_late_retransmit_after_fin_is_not_a_new_flow_but_a_new_syn_is():
    assert (Playbook() >> syn(0) << START
            >> seg(1, b"abc", FIN | ACK) << FlowData(1, b"abc") << FlowEnded(1, "fin")
            >> seg(1, b"abc", FIN | ACK)   # retransmitted: ignored, not a mid-stream pickup
            >> seg(5, b"", ACK)
            >> syn(7777) << FlowStarted(2, CLIENT, SERVER)
            >> seg(7778, b"new") << FlowData(2, b"new"))


def test_new_syn_with_another_isn_replaces_a_live_flow():
    assert (Playbook() >> syn(0) << START
            >> syn(5000) << FlowEnded(1, "reused") << FlowStarted(2, CLIENT, SERVER))


def test_syn_ack_towards_the_port_is_not_a_connection():
    assert Playbook() >> seg(0, b"", SYN | ACK)


# -- sequence numbers ---------------------------------------------------------------------
def test_sequence_wraparound():
    isn = (1 << 32) - 4
    assert (Playbook() >> syn(isn) << START
            >> seg(isn + 1, b"abc") << FlowData(1, b"abc")            # ends exactly at 2**32
            >> seg(3, b"ghi")                                           # after the wrap, early
            >> seg(0, b"def") << FlowData(1, b"defghi")
            >> seg(isn + 1, b"abc")                                     # old, from before the wrap
            >> seg(6, b"", FIN | ACK) << FlowEnded(1, "fin"))


def test_sequence_wraparound_inside_one_segment():
    isn = (1 << 32) - 3
    assert (Playbook() >> syn(isn) << START
            >> seg(isn + 1, b"across") << FlowData(1, b"across")
            >> seg(4, b"!") << FlowData(1, b"!"))


# -- mid-stream pickup --------------------------------------------------------------------
def test_midstream_pickup_starts_at_first_data_segment():
    assert (Playbook()
            >> seg(123456, b"", ACK)          # pure ACK of an unknown connection: nothing
            >> seg(123456, b"", FIN | ACK)    # and no FIN either
            >> seg(123456, b"middle") << FlowStarted(1, CLIENT, SERVER, midstream=True)
            << FlowData(1, b"middle")
            >> seg(123462, b" end") << FlowData(1, b" end"))


def test_midstream_pickup_can_be_disabled():
    assert Playbook(Reassembler(midstream=False)) >> seg(5, b"middle")


# -- bounds and time ----------------------------------------------------------------------
def test_max_flows_refuses_new_connections_and_never_picks_them_up_later():
    other = ("10.0.0.3", 40001)
    book = (Playbook(Reassembler(max_flows=1)) >> syn(0) << START
            >> syn(100, src=other)                      # refused
            >> seg(101, b"x", src=other)                # ... and not picked up mid-stream
            >> seg(1, b"", FIN | ACK) << FlowEnded(1, "fin")
            >> seg(102, b"y", src=other))
    assert book
    assert book.r.stats["flows_refused"] == 1


def test_buffer_overflow_ends_the_flow():
    book = Playbook(Reassembler(max_buffered=10)) >> syn(0) << START
    assert book >> seg(100, b"123456") >> seg(200, b"123456") << FlowEnded(1, "overflow")
    assert book >> seg(1, b"late")  # tombstoned: ignored


def test_idle_flows_expire_and_may_be_picked_up_again():
    book = Playbook(Reassembler(idle_timeout=10)) >> syn(0) << START
    assert book >> Tick(5) >> seg(1, b"a") << FlowData(1, b"a") >> Tick(14.9)
    assert (book >> Tick(15) << FlowEnded(1, "idle")
            >> seg(2, b"b") << FlowStarted(2, CLIENT, SERVER, midstream=True) << FlowData(2, b"b"))


def test_a_hole_nothing_fills_ends_the_flow():
    book = Playbook(Reassembler(gap_timeout=2)) >> syn(0) << START >> seg(50, b"after a loss")
    assert book >> Tick(1.9) >> Tick(2.0) << FlowEnded(1, "gap")


def test_tombstones_expire():
    book = Playbook(Reassembler(tombstone_ttl=30)) >> syn(0) << START >> seg(1, b"", RST)
    assert book << FlowEnded(1, "rst") >> seg(1, b"x")
    assert book >> Tick(31) >> seg(1, b"x") << FlowStarted(2, CLIENT, SERVER, True) << FlowData(2, b"x")


def test_driver_can_end_a_flow():
    book = Playbook() >> syn(0) << START
    assert book.r.end(1, "slow sink", 0.0) == [FlowEnded(1, "slow sink")]
    assert book.r.end(1, "slow sink", 0.0) == []
    assert book >> seg(1, b"ignored")


def test_ports_filter_and_set_ports_ends_flows_of_removed_ports():
    other = ("10.0.0.1", 8080)
    book = Playbook(Reassembler({80})) >> syn(0) << START >> syn(0, dst=other)
    assert book.r.set_ports({8080}, 0.0) == [FlowEnded(1, "port removed")]
    assert book >> syn(0, dst=other) << FlowStarted(2, CLIENT, other)
    assert book.r.close() == [FlowEnded(2, "closed")]


# -- parsing ------------------------------------------------------------------------------
def test_ipv6():
    client, server = ("fd00::2", 40000), ("fd00::1", 443)
    assert (Playbook() >> syn(0, src=client, dst=server) << FlowStarted(1, client, server)
            >> seg(1, b"v6", src=client, dst=server) << FlowData(1, b"v6"))


def test_ipv4_options_and_link_padding():
    packet = seg(1, b"data", ip_options=b"\x01\x01\x01\x00")
    parsed = parse_ip(packet + b"\0" * 6)  # Ethernet pads short frames; the IP length says where to stop
    assert parsed is not None and parsed.payload == b"data" and parsed.missing == 0


def test_ethernet_frames_with_and_without_vlan_tag():
    packet = seg(1, b"data")
    plain = b"\0" * 12 + b"\x08\x00" + packet
    tagged = b"\0" * 12 + b"\x81\x00\x00\x05\x08\x00" + packet
    assert parse_ethernet(plain) == parse_ethernet(tagged) == parse_ip(packet)
    assert parse_ethernet(b"\0" * 12 + b"\x08\x06" + packet) is None  # ARP


def test_not_tcp_fragments_and_garbage_are_ignored():
    udp = bytearray(seg(1, b"x"))
    udp[9] = socket.IPPROTO_UDP
    book = Playbook()
    assert (book >> bytes(udp) >> seg(1, b"x", frag=0x2000) >> seg(1, b"x", frag=0x0010)
            >> b"\x45garbage" >> b"")
    assert book.r.stats["ignored"] == 5


def test_gro_super_packet_with_zero_ip_length():
    big = b"z" * 70000
    assert (Playbook() >> syn(0) << START
            >> seg(1, big, total_length=0) << FlowData(1, big))


def test_truncated_capture_delivers_what_it_has_then_ends():
    packet = seg(1, b"0123456789")
    r = Reassembler()
    assert r.feed_packet(syn(0), 0.0) == [START]
    assert r.feed_packet(packet[:-4], 0.0, wire_len=len(packet)) == [
        FlowData(1, b"012345"), FlowEnded(1, reassembly.END_TRUNCATED)]


@pytest.mark.parametrize("isn", [0, (1 << 32) - 1, 0x7FFFFFFF, 0x80000000])
def test_large_stream_in_shuffled_segments(isn):
    import random
    rng = random.Random(isn)
    stream = bytes(rng.randrange(256) for _ in range(50000))
    pieces = []
    pos = 0
    while pos < len(stream):
        size = rng.randrange(1, 1500)
        pieces.append((pos, stream[pos:pos + size]))
        pos += size
    order = pieces[:]
    for i in range(0, len(order) - 3, 4):  # local reordering, like a network does
        window = order[i:i + 4]
        rng.shuffle(window)
        order[i:i + 4] = window
    order += rng.sample(pieces, 10)  # and some retransmissions
    r = Reassembler()
    events = r.feed_packet(syn(isn), 0.0)
    for off, data in order:
        events += r.feed_packet(seg(isn + 1 + off, data), 0.0)
    assert events[0] == START
    assert b"".join(e.data for e in events if isinstance(e, FlowData)) == stream


def test_total_buffer_bound_across_flows():
    other = ("10.0.0.3", 40001)
    book = (Playbook(Reassembler(max_buffered=100, max_total_buffered=10)) >> syn(0) << START
            >> syn(0, src=other) << FlowStarted(2, other, SERVER)
            >> seg(50, b"123456")
            >> seg(50, b"123456", src=other) << FlowEnded(2, "overflow")
            >> seg(1, b"x" * 49) << FlowData(1, b"x" * 49 + b"123456"))
    assert book and book.r.total_buffered == 0
