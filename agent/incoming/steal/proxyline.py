"""The PROXY protocol (v1) line one agent sends the next when it passes a stolen connection on:
the real client and the original destination, which the next session's agent would not see
otherwise (the connection reaches it from the loopback). A single text line, so ten lines of our
own rather than a dependency. Sans-IO: bytes in, addresses out."""
from __future__ import annotations

import ipaddress

PROXY_LINE_MAX = 107      # the PROXY protocol v1 limit, CRLF included
Address = tuple[str, int]


def proxy_line(client: Address, original: Address) -> bytes:
    """The PROXY protocol v1 header one agent sends another when passing a connection on."""
    family = "TCP6" if ":" in original[0] else "TCP4"
    return f"PROXY {family} {client[0]} {original[0]} {client[1]} {original[1]}\r\n".encode()


def parse_proxy_line(line: bytes) -> tuple[Address, Address]:
    """(client, original destination) from a PROXY v1 line; ValueError if it is not one."""
    parts = line.rstrip(b"\r\n").decode("ascii", "replace").split(" ")
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6") or not line.endswith(b"\r\n"):
        raise ValueError(f"not a PROXY v1 TCP4/TCP6 line: {line[:PROXY_LINE_MAX]!r}")
    kind = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    kind(parts[2]), kind(parts[3])  # ValueError if not
    client, original = (parts[2], int(parts[4])), (parts[3], int(parts[5]))
    if not (0 < client[1] < 65536 and 0 < original[1] < 65536):
        raise ValueError(f"bad port in PROXY line {line!r}")
    return client, original
