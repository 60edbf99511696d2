"""Which names the app knows each address by, learnt from the DNS answers the sidecar relays and
from the hosts file it wrote. Filter entries with host names (``db.internal:5432``) are checked
against these names when the app connects to an address, since a connection carries no name.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

import dns.exception
import dns.message
import dns.rdatatype

MAX_ADDRESSES = 4096


def question_name(message: bytes) -> str | None:
    """The first question's name of a DNS message, lowercase without the trailing dot."""
    try:
        msg = dns.message.from_wire(message, question_only=True)
    except (dns.exception.DNSException, ValueError):
        return None
    if not msg.question:
        return None
    return msg.question[0].name.to_text(omit_final_dot=True).lower()


class NameCache:
    """address -> names, most recent first; bounded, oldest addresses dropped first."""

    def __init__(self) -> None:
        self._names: OrderedDict[str, list[str]] = OrderedDict()

    def add(self, address: str, name: str) -> None:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return
        name = name.rstrip(".").lower()
        names = self._names.pop(address, [])
        if name in names:
            names.remove(name)
        names.insert(0, name)
        self._names[address] = names
        while len(self._names) > MAX_ADDRESSES:
            self._names.popitem(last=False)

    def names(self, address: str) -> list[str]:
        return list(self._names.get(address, ()))

    def learn_answer(self, answer: bytes) -> None:
        """Record every A/AAAA in ``answer`` under the name asked for and the record's owner
        (so a CNAME chain maps the final address back to the name the app used)."""
        try:
            msg = dns.message.from_wire(answer)
        except (dns.exception.DNSException, ValueError):
            return
        asked = msg.question[0].name.to_text(omit_final_dot=True) if msg.question else None
        for rrset in msg.answer:
            if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                continue
            for rdata in rrset:
                self.add(rdata.address, rrset.name.to_text(omit_final_dot=True))
                if asked:
                    self.add(rdata.address, asked)

    def learn_hosts(self, text: str) -> None:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            for name in reversed(words[1:]):  # the canonical name (first) ends up most recent
                self.add(words[0], name)
