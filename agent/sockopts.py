"""Linux socket options the standard library does not name, for both ends of the link."""
from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80       # SOL_IP: the destination a REDIRECT rewrote
SO_MARK = 36               # SOL_SOCKET: the packets' fwmark (the sidecar's bypass of its own rules)
IP_TRANSPARENT = 19        # SOL_IP: bind to / send from a foreign address (TPROXY)
IP_RECVORIGDSTADDR = 20    # SOL_IP: ask for a datagram's original destination
IP_ORIGDSTADDR = 20        # the control message that carries it


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a connection REDIRECTed to this socket was going (a ``struct sockaddr_in``)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
