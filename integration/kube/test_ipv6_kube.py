"""IPv6 on the test cluster (issue 14): its pods are dual-stack (an IPv6 address from the CNI
beside the IPv4 one; Services stay IPv4), so a session on the web target bridges the app's IPv6:
a new IPv6 connection leaves from the target's namespace, and an IPv6 client's connection to
the target is stolen for the local app; the target's ip6tables are clean afterwards.
"""
from __future__ import annotations

import subprocess

import pytest

from kubeutil import exec_in, wait_until
from podtwin.agent.target.nsenter import main_pid
from test_incoming_kube import APP, HTTPD, Session, sessions, staging, web_pod  # noqa: F401
from test_reconnect_kube import app_container, fetch


def ipv6_of(pod) -> str | None:
    return next((p.ip for p in pod.status.pod_ips or [] if ":" in p.ip), None)


def ip6_rules(container_id: str) -> list[str]:
    save = subprocess.run(["nsenter", "-t", str(main_pid(container_id)), "-n", "ip6tables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout
    return [line for line in save.splitlines() if "PODTWIN" in line]


def test_ipv6_out_of_and_into_a_dual_stack_pod(cluster, staging, sessions, tmp_path):
    web = web_pod(cluster, staging)
    web6, caller6 = ipv6_of(web), ipv6_of(cluster.core.read_namespaced_pod("caller", staging))
    if not (web6 and caller6):
        pytest.skip("this cluster gives pods no IPv6 address")
    # an IPv6-only server beside the caller, for the app to reach through the target
    exec_in(cluster, staging, "caller", ["sh", "-c", "nohup python3 -c 'import http.server, socket\n"
                                         "class S(http.server.HTTPServer): address_family = socket.AF_INET6\n"
                                         "S((\"::\", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()'"
                                         " >/dev/null 2>&1 </dev/null &"])
    session = Session(cluster, staging, tmp_path, "v6", "steal", APP, "sh", "-c", HTTPD.format(body="from-local-v6"))
    sessions.append(session)
    session.wait_for("stealing port 80")
    app = app_container(session)
    wait_until(lambda: "Directory listing" in fetch(app, f"http://[{caller6}]:8080/"), 15,
               "an IPv6 connection from the app through the target")
    stolen = exec_in(cluster, staging, "caller", [
        "python3", "-c", f"import urllib.request;print(urllib.request.urlopen('http://[{web6}]/',timeout=5).read().decode())"])
    assert "from-local-v6" in stolen, stolen + session.err()
    container = web.status.container_statuses[0].container_id
    assert ip6_rules(container), "no IPv6 rule in the target while stealing"
    assert session.stop() == 130
    assert ip6_rules(container) == []
