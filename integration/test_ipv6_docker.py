"""IPv6 on a Docker target (issue 14): the target sits on an internal dual-stack network whose
backend answers over IPv6 only (its sockets are IPV6_V6ONLY), so nothing here works unless the
app's IPv6 really crosses to the target's network. The app runs on Docker's default bridge,
which has no IPv6 at all: the sidecar gives its namespace IPv6 and bridges it like IPv4.
"""
from __future__ import annotations

import ipaddress
import secrets
import signal
import textwrap

import pytest

from conftest import APP_IMAGE, PODTWIN_IMAGE, TEST_LABEL, docker, remove_created, wait_until, write_config

SUBNET6 = "fd00:70:{tag}::/64"
BACKEND6 = """
import socket, threading
def http():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", 80)); s.listen(16)
    while True:
        c, peer = s.accept()
        req = c.recv(4096).decode(errors="replace").split(" ")
        body = f"v6 backend: {req[1] if len(req) > 1 else '?'} from {peer[0]}".encode()
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body); c.close()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u.bind(("::", 9000))
    while True:
        data, peer = u.recvfrom(2048); u.sendto(b"echo6:" + data, peer)
threading.Thread(target=udp, daemon=True).start()
http()
"""


@pytest.fixture(scope="module")
def staging6():
    tag = secrets.token_hex(2)
    network, backend, target = f"pt-net6-{tag}", f"pt-backend6-{tag}", f"pt-target6-{tag}"
    net6 = ipaddress.ip_network(SUBNET6.format(tag=tag))
    backend_ip6, target_ip6 = str(net6[0x10]), str(net6[0x20])   # as tools print them
    created: list[tuple[str, str]] = []
    try:
        docker("network", "create", "--internal", "--ipv6", "--subnet", SUBNET6.format(tag=tag),
               "--label", TEST_LABEL, network)
        created.append(("network", network))
        docker("run", "-d", "--name", backend, "--label", TEST_LABEL, "--network", network,
               "--network-alias", "backend6", "--ip6", backend_ip6, PODTWIN_IMAGE,
               "python3", "-c", textwrap.dedent(BACKEND6))
        created.append(("container", backend))
        docker("run", "-d", "--name", target, "--label", TEST_LABEL, "--network", network, "--ip6", target_ip6,
               "--add-host", f"v6-only.example:{backend_ip6}", PODTWIN_IMAGE,
               "python3", "-m", "http.server", "--bind", "::", "80")   # both families
        created.append(("container", target))
        wait_until(lambda: "v6 backend" in docker(
            "exec", target, "python3", "-c",
            f"import urllib.request;print(urllib.request.urlopen('http://[{backend_ip6}]/',timeout=1).read())",
            check=False).stdout, 20, "the IPv6 backend to answer")
        yield target, backend_ip6, backend, target_ip6
    finally:
        remove_created(created)


def test_ipv6_by_literal_by_name_over_udp_and_aaaa(podtwin, staging6):
    target, ip6, _, _ = staging6
    script = (f"wget -qO- http://[{ip6}]/literal; echo; "
              "wget -qO- http://v6-only.example/by-name; echo; "
              f"udpsend [{ip6}]:9000 over-udp6; echo ---; "
              "nslookup -type=AAAA backend6")
    result = podtwin.run("container", "run", "-q", "--target", f"container/{target}", APP_IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    out, _, dns = result.stdout.partition("---")
    assert "v6 backend: /literal from" in out, result.stdout + result.stderr   # a literal IPv6 address
    assert "v6 backend: /by-name from" in out        # a name the target's /etc/hosts maps to IPv6
    assert "echo6:over-udp6" in out                  # UDP over IPv6, answered
    assert ip6 in dns                                # the AAAA answer of the target's resolver


def test_an_ipv4_only_target_keeps_ipv6_off(podtwin, staging):
    """Nothing changes for an IPv4-only target: the app's namespace gets no IPv6 address or route."""
    result = podtwin.run("container", "run", "-q", "--target", f"container/{staging.target}", APP_IMAGE,
                         "sh", "-c", "ip -6 route; ip -6 addr | grep -c fd70 || true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "default" not in result.stdout and result.stdout.strip().endswith("0"), result.stdout


def test_steal_takes_an_ipv6_clients_connection(podtwin, staging6, tmp_path):
    """A client on the target's network calls the target over IPv6 (and over IPv4): the local
    app answers both; once the session ends the target's own namespace has no rule left."""
    target, _, client, target_ip6 = staging6
    cfg = write_config(tmp_path / "steal.json", {"feature": {"network": {"incoming": "steal"}}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{target}", APP_IMAGE,
                         "sh", "-c", "mkdir -p /w && echo from-local-app > /w/index.html && httpd -f -p 80 -h /w")
    wait_until(lambda: "stealing port 80" in proc.err_path.read_text() or proc.poll() is not None, 60,
               "the steal to start")
    assert proc.poll() is None, proc.err_path.read_text()
    target_ip4 = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                        target).stdout.strip()
    for url in (f"http://[{target_ip6}]/", f"http://{target_ip4}/"):
        got = docker("exec", client, "python3", "-c",
                     f"import urllib.request;print(urllib.request.urlopen('{url}',timeout=5).read().decode())",
                     check=False)
        assert "from-local-app" in got.stdout, (url, got.stdout, got.stderr, proc.err_path.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    for save in ("iptables-save", "ip6tables-save"):
        rules = docker("run", "--rm", "--network", f"container:{target}", "--cap-add", "NET_ADMIN",
                       PODTWIN_IMAGE, save, "-t", "nat").stdout
        assert "PODTWIN" not in rules, (save, rules)


def test_mirror_copies_an_ipv6_clients_requests(podtwin, staging6, tmp_path):
    target, _, client, target_ip6 = staging6
    cfg = write_config(tmp_path / "mirror.json", {"feature": {"network": {"incoming": "mirror"}}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{target}", APP_IMAGE,
                         "nc", "-ll", "-p", "80", "-e", "sh", "-c", 'while read -r line; do echo "$line" >&2; done')
    wait_until(lambda: "mirroring port 80" in proc.err_path.read_text() or proc.poll() is not None, 60,
               "the mirror to start")
    assert proc.poll() is None, proc.err_path.read_text()
    got = docker("exec", client, "python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                 f"'http://[{target_ip6}]/?copy6',timeout=5).status)", check=False)
    assert got.stdout.strip() == "200", got.stdout + got.stderr       # the target itself answered
    wait_until(lambda: "GET /?copy6 HTTP/1.1" in proc.err_path.read_text(), 15, "the app to get a copy")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
