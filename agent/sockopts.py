"""Linux socket options the standard library does not name, for both ends of the link."""
from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80       # SOL_IP (IP6T_SO_ORIGINAL_DST: SOL_IPV6): the destination a REDIRECT rewrote
SO_MARK = 36               # SOL_SOCKET: the packets' fwmark (the sidecar's bypass of its own rules)
IP_TRANSPARENT = 19        # SOL_IP: bind to / send from a foreign address (TPROXY)
IP_RECVORIGDSTADDR = 20    # SOL_IP: ask for a datagram's original destination
IP_ORIGDSTADDR = 20        # the control message that carries it
IPV6_TRANSPARENT = 75      # SOL_IPV6: the same three for IPv6
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = 74


def no_delay(sock: socket.socket) -> socket.socket:
    """TCP_NODELAY: small writes go out at once instead of waiting for the peer's delayed ACK
    (40 ms; a protocol that sends two messages before the answer -- SFTP, SSH -- pays it on each
    exchange). asyncio sets it only on sockets made with ``proto=IPPROTO_TCP`` (getaddrinfo's),
    not on ``socket.socket(family, SOCK_STREAM)`` nor on ``create_server``'s listeners and the
    connections they accept, which on Linux inherit it from their listener."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sockaddr(raw: bytes) -> tuple[str, int]:
    """The address and port of a ``struct sockaddr_in`` or ``sockaddr_in6``; an IPv4-mapped IPv6
    address comes back as the plain IPv4 address."""
    port = struct.unpack_from("!H", raw, 2)[0]
    if struct.unpack_from("=H", raw, 0)[0] == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host, port
    return socket.inet_ntoa(raw[4:8]), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a connection REDIRECTed to this socket was going."""
    if sock.family == socket.AF_INET6:
        return sockaddr(sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28))
    return sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
