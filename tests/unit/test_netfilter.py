"""Outgoing and DNS filter decisions, and what the kernel can decide up front."""
from __future__ import annotations

import ipaddress

import pytest

from podtwin.runner.config.models import PodtwinConfig
from podtwin.runner.sidecar.outgoing.policy import (
    DnsFilter,
    NetRule,
    OutgoingFilter,
    parse_filter_entry,
)


def outgoing(value: object) -> OutgoingFilter:
    return OutgoingFilter.from_config(PodtwinConfig.model_validate({"feature": {"network": {"outgoing": value}}}))


def dns(value: object) -> DnsFilter:
    return DnsFilter.from_config(PodtwinConfig.model_validate({"feature": {"network": {"dns": value}}}))


@pytest.mark.parametrize(
    ("text", "proto", "net", "name", "port"),
    [
        ("db.internal:5432", None, None, "db.internal", 5432),
        ("DB.Internal.", None, None, "db.internal", None),
        ("10.0.0.0/8", None, "10.0.0.0/8", None, None),
        ("10.1.2.3", None, "10.1.2.3/32", None, None),
        ("10.0.0.0/8:443", None, "10.0.0.0/8", None, 443),
        (":53", None, None, None, 53),
        ("udp://1.1.1.0/24:1337", "udp", "1.1.1.0/24", None, 1337),
        ("tcp://localhost:1337", "tcp", None, "localhost", 1337),
        ("fd00::/8", None, "fd00::/8", None, None),
        ("[fd00::1]:80", None, "fd00::1/128", None, 80),
        ("*.svc.cluster.local", None, None, "*.svc.cluster.local", None),
    ],
)
def test_parses_mirrord_entries(text: str, proto: str | None, net: str | None, name: str | None, port: int | None) -> None:
    entry = parse_filter_entry(text)
    assert entry.proto == proto
    assert (str(entry.network) if entry.network else None) == net
    assert entry.name == name and entry.port == port


@pytest.mark.parametrize("text", ["", ":", "http://a:1", "a:0", "a:70000", "a:b", "bad host", "[fd00::1", "a..b"])
def test_rejects_bad_entries(text: str) -> None:
    with pytest.raises(ValueError):
        parse_filter_entry(text)


def test_no_filter_sends_everything_remote_except_loopback() -> None:
    f = outgoing(True)
    assert f.decide(None, "10.0.0.5", 80, "tcp") == "remote"
    assert f.decide("example.com", "93.184.216.34", 53, "udp") == "remote"
    for ip in ("127.0.0.1", "127.3.4.5", "::1", "0.0.0.0", "::ffff:127.0.0.1"):
        assert f.decide("localhost", ip, 80, "tcp") == "local"


def test_disabled_protocols_stay_local() -> None:
    f = outgoing({"udp": False})
    assert f.decide(None, "10.0.0.5", 53, "udp") == "local"
    assert f.decide(None, "10.0.0.5", 80, "tcp") == "remote"
    assert outgoing(False).decide(None, "10.0.0.5", 80, "tcp") == "local"


def test_remote_list_sends_only_matches_remote() -> None:
    f = outgoing({"filter": {"remote": ["10.0.0.0/8", "db.internal:5432", "udp://:53"]}})
    assert f.decide(None, "10.2.3.4", 80, "tcp") == "remote"
    assert f.decide(None, "192.168.1.1", 80, "tcp") == "local"
    assert f.decide("DB.internal.", "192.168.1.1", 5432, "tcp") == "remote"
    assert f.decide("db.internal", "192.168.1.1", 5433, "tcp") == "local"
    assert f.decide(None, "192.168.1.1", 5432, "tcp") == "local"  # name unknown: no match
    assert f.decide(None, "8.8.8.8", 53, "udp") == "remote"
    assert f.decide(None, "8.8.8.8", 53, "tcp") == "local"


def test_local_list_keeps_matches_local() -> None:
    f = outgoing({"filter": {"local": ["*.amazonaws.com", ":6379", "fd00::/8"]}})
    assert f.decide("s3.eu-west-1.amazonaws.com", "52.1.2.3", 443, "tcp") == "local"
    assert f.decide("amazonaws.com", "52.1.2.3", 443, "tcp") == "remote"
    assert f.decide(None, "10.0.0.9", 6379, "tcp") == "local"
    assert f.decide(None, "fd00::5", 80, "tcp") == "local"
    assert f.decide(None, "10.0.0.9", 80, "tcp") == "remote"
    assert f.decide(None, "fe80::1%eth0", 80, "tcp") == "remote"


def test_kernel_rules_for_an_ip_only_local_list() -> None:
    rules = outgoing({"filter": {"local": ["10.0.0.0/8", "tcp://1.1.1.0/24:1337", ":6379"]}}).kernel_rules()
    assert not rules.proxy_decides and rules.redirect_only is None
    assert NetRule("127.0.0.0/8") in rules.keep_local and NetRule("::1/128") in rules.keep_local
    assert NetRule("10.0.0.0/8", None, None) in rules.keep_local
    assert NetRule("1.1.1.0/24", 1337, "tcp") in rules.keep_local
    assert NetRule("0.0.0.0/0", 6379, None) in rules.keep_local and NetRule("::/0", 6379, None) in rules.keep_local


def test_kernel_rules_with_names_hand_over_to_the_proxy() -> None:
    rules = outgoing({"filter": {"local": ["10.0.0.0/8", "redis.local:6379"]}}).kernel_rules()
    assert rules.proxy_decides and "redis.local:6379" in rules.reason
    assert NetRule("10.0.0.0/8") in rules.keep_local  # the IP entries are still safe to apply
    remote_named = outgoing({"filter": {"remote": ["db.internal"]}}).kernel_rules()
    assert remote_named.proxy_decides and remote_named.redirect_only is None


def test_kernel_rules_for_a_remote_list_and_disabled_udp() -> None:
    rules = outgoing({"udp": False, "filter": {"remote": ["10.0.0.0/8", "udp://1.1.1.1:53"]}}).kernel_rules()
    assert rules.redirect_only == (NetRule("10.0.0.0/8", None, "tcp"),)  # udp entry dropped: udp is local
    assert NetRule("0.0.0.0/0", None, "udp") in rules.keep_local
    assert outgoing(False).kernel_rules().redirect_only == ()


def test_kernel_rules_agree_with_decide() -> None:
    f = outgoing({"filter": {"local": ["10.0.0.0/8", "tcp://1.1.1.0/24:1337"]}})
    local = f.local_cidrs()
    for ip, port, proto in [("10.1.1.1", 80, "tcp"), ("1.1.1.9", 1337, "tcp"), ("1.1.1.9", 1337, "udp"), ("8.8.8.8", 53, "udp")]:
        in_rules = any(
            ipaddress.ip_address(ip) in ipaddress.ip_network(r.cidr)
            and r.port in (None, port) and r.proto in (None, proto)
            for r in local
        )
        assert (f.decide(None, ip, port, proto) == "local") == in_rules  # type: ignore[arg-type]


def test_dns_filter() -> None:
    assert dns(True).decide("db.prod.svc.cluster.local") == "remote"
    assert dns(False).decide("db.prod.svc.cluster.local") == "local"
    assert dns(True).decide("LOCALHOST.") == "local"
    remote = dns({"filter": {"remote": ["*.svc.cluster.local", "my-service", "api.example.com:443"]}})
    assert remote.decide("DB.prod.svc.cluster.local.") == "remote"
    assert remote.decide("my-service") == "remote"
    assert remote.decide("google.com") == "local"
    assert remote.decide("api.example.com") == "local"  # a packet has no service port
    assert remote.decide("api.example.com", 443) == "remote"
    local = dns({"filter": {"local": ["google.com", "10.0.0.0/8"]}})
    assert local.decide("google.com") == "local"
    assert local.decide("10.1.2.3") == "local"
    assert local.decide("db") == "remote"
