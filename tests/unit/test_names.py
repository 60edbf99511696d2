"""Host-name filters: the names learnt from DNS answers and hosts files, and the per-connection
decision the sidecar makes with them."""
from __future__ import annotations

import dns.message
import dns.rrset

from podtwin.runner.config.models import DnsConfig, OutgoingConfig
from podtwin.runner.sidecar.outgoing.policy import DnsFilter, OutgoingFilter
from podtwin.runner.sidecar.__main__ import Decider
from podtwin.runner.sidecar.dns.names import NameCache, question_name


def answer(name: str, *records: tuple[str, str, str]) -> bytes:
    """A response to an A query for ``name`` with (owner, type, value) records."""
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    for owner, rdtype, value in records:
        response.answer.append(dns.rrset.from_text(owner, 30, "IN", rdtype, value))
    return response.to_wire()


def test_question_name():
    assert question_name(dns.message.make_query("Backend.Svc.", "A").to_wire()) == "backend.svc"
    assert question_name(b"\x00\x01garbage") is None


def test_answers_map_addresses_to_the_name_asked_and_the_cname_chain():
    cache = NameCache()
    cache.learn_answer(answer("api.example.", ("api.example.", "CNAME", "lb.example."),
                              ("lb.example.", "A", "10.1.2.3"), ("lb.example.", "A", "10.1.2.4")))
    assert set(cache.names("10.1.2.3")) == {"api.example", "lb.example"}
    assert cache.names("10.1.2.3")[0] == "api.example"   # the name the app used comes first
    assert cache.names("10.1.2.4")
    assert cache.names("10.9.9.9") == []
    cache.learn_answer(b"not dns")                        # ignored, no exception


def test_hosts_file_names():
    cache = NameCache()
    cache.learn_hosts("127.0.0.1 localhost\n# c\n172.19.0.2\tdb db.internal  # primary\n")
    assert cache.names("172.19.0.2") == ["db", "db.internal"]


def test_cache_is_bounded():
    cache = NameCache()
    for i in range(5000):
        cache.add(f"10.0.{i // 256}.{i % 256}", f"h{i}")
    assert cache.names("10.0.0.0") == []                  # the oldest went first
    assert cache.names("10.0.19.135") == ["h4999"]


def decider(outgoing: dict, names: NameCache) -> Decider:
    return Decider(OutgoingFilter.from_config(OutgoingConfig.model_validate(outgoing)),
                   DnsFilter.from_config(DnsConfig.model_validate({})), names)


def test_local_list_by_name():
    names = NameCache()
    names.add("10.0.0.5", "localdb")
    d = decider({"filter": {"local": ["localdb:5432"]}}, names)
    assert d.connection("tcp", "10.0.0.5", 5432) == "local"
    assert d.connection("tcp", "10.0.0.5", 80) == "remote"    # the port does not match
    assert d.connection("tcp", "10.0.0.6", 5432) == "remote"  # an address nobody named
    assert d.connection("tcp", "127.0.0.1", 5432) == "local"  # loopback always stays


def test_remote_list_by_name_matches_any_of_the_names():
    names = NameCache()
    names.add("10.0.0.7", "backend")
    names.add("10.0.0.7", "backend.ns.svc.cluster.local")     # now the most recent name
    d = decider({"filter": {"remote": ["backend"]}}, names)
    assert d.connection("tcp", "10.0.0.7", 80) == "remote"
    assert d.connection("udp", "10.0.0.8", 53) == "local"
    d = decider({"filter": {"remote": ["*.svc.cluster.local:443"]}}, names)
    assert d.connection("tcp", "10.0.0.7", 443) == "remote"
    assert d.connection("tcp", "10.0.0.7", 80) == "local"


def test_protocol_switches_apply_before_names():
    names = NameCache()
    names.add("10.0.0.5", "svc")
    d = decider({"udp": False, "filter": {"remote": ["svc"]}}, names)
    assert d.connection("udp", "10.0.0.5", 53) == "local"
    assert d.connection("tcp", "10.0.0.5", 53) == "remote"
