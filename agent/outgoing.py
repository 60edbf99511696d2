"""The agent's end of outgoing traffic. TCP needs nothing here: each connection is an SSH
direct-tcpip channel, and asyncssh makes the connection from the target's network namespace
(``link.server``). UDP flows ride on the control channel (``link.control``)."""
from __future__ import annotations

UDP_IDLE_SECONDS = 120.0   # both ends forget a UDP flow that carried nothing for this long
