"""Incoming HTTP/2 and gRPC through a filtered steal, Docker target: routed per stream.

The target runs ``h2probe serve --name target`` (images/h2probe: HTTP/1.1, h2c with prior
knowledge and gRPC on one port, every answer naming its server); the app of the session runs the
same binary as ``--name local`` on the same port. A client container on the staging network
calls the target with real Go clients (golang.org/x/net/http2, google.golang.org/grpc) that put
every request of a run on ONE connection and report how many they dialed, so each run proves
that streams of one connection go to different places by their own headers.
"""
from __future__ import annotations

import secrets
import signal

import pytest

from conftest import APP_IMAGE, docker, podtwin_rules, wait_until, write_config

ALICE = "x-podtwin-user: alice"


@pytest.fixture(scope="module")
def h2_target(staging) -> str:
    """A container of the staging serving HTTP/1.1, h2c and gRPC on port 80 as "target"."""
    if docker("run", "--rm", APP_IMAGE, "h2probe", check=False).returncode != 2:  # its usage
        pytest.fail(f"{APP_IMAGE} has no /bin/h2probe: rebuild the images "
                    "(`python -m podtwin.runner.tools.images`)", pytrace=False)
    name = f"pt-h2target-{secrets.token_hex(3)}"
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "--network", staging.network,
           "--network-alias", "h2target", APP_IMAGE, "h2probe", "serve", "--port", "80", "--name", "target")
    yield name
    docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def client(staging, h2_target) -> str:
    name = h2_target + "-client"
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "--network", staging.network,
           APP_IMAGE, "sleep", "3600")
    wait_until(lambda: served_by(probe(name, "get", "--h2c", "http://h2target/", check=False)) == ["target"],
               20, "the target to answer h2c")
    yield name
    docker("rm", "-f", name, check=False)


def probe(client: str, *args: str, check: bool = True) -> list[str]:
    """``h2probe ARGS`` run by another service of the staging: its output lines."""
    out = docker("exec", client, "timeout", "30", "h2probe", *args, check=False)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


def served_by(lines: list[str]) -> list[str]:
    """``200 served-by=local bytes=65`` -> ``local``, per request, in request order."""
    return [word.split("=", 1)[1] for line in lines if not line.startswith("connections=")
            for word in line.split() if word.startswith("served-by=")]


def filtered_steal(podtwin, tmp_path, target: str):
    cfg = write_config(tmp_path / "h2filter.json", {"feature": {"network": {"incoming": {
        "mode": "steal", "http_filter": {"header_filter": ALICE}}}}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{target}",
                         APP_IMAGE, "h2probe", "serve", "--port", "80", "--name", "local")
    wait_until(lambda: "matching the HTTP filter" in proc.err_path.read_text() or proc.poll() is not None,
               60, "the filtered steal")
    assert proc.poll() is None, proc.err_path.read_text()
    return proc


def end(proc, target: str) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert podtwin_rules(target) == []


ALTERNATE = ["local", "target"] * 3  # requests 1, 3, 5 carry the header


def test_h2c_streams_of_one_connection_routed_by_header(podtwin, h2_target, client, tmp_path):
    h2c = ["get", "--h2c", "http://h2target/", "-H", ALICE, "--count", "6", "--alternate-header"]
    proc = filtered_steal(podtwin, tmp_path, h2_target)

    one_by_one = probe(client, *h2c)
    assert served_by(one_by_one) == ALTERNATE, (one_by_one, proc.err_path.read_text())
    assert one_by_one[-1] == "connections=1"

    at_once = probe(client, *h2c, "--parallel")                     # interleaved streams
    assert served_by(at_once) == ALTERNATE, at_once
    assert at_once[-1] == "connections=1"

    # Bodies larger than HTTP/2's initial 64 KiB windows, both ways, on both routes at once.
    big = probe(client, "get", "--h2c", "http://h2target/?size=300000", "-H", ALICE, "--count", "4",
                "--alternate-header", "--parallel", "--body-size", "200000")
    assert big == [f"200 served-by={who} bytes=300000 received=200000" for who in ALTERNATE[:4]] + \
        ["connections=1"]

    # The same port still filters HTTP/1.1, keep-alive, per request.
    http1 = probe(client, "get", "http://h2target/", "-H", ALICE, "--count", "4", "--alternate-header")
    assert served_by(http1) == ALTERNATE[:4] and http1[-1] == "connections=1", http1

    log = proc.err_path.read_text()
    assert 'local: HTTP/2.0 GET / user="alice"' in log
    assert 'user=""' not in log                                      # the app saw only alice
    end(proc, h2_target)
    after = probe(client, *h2c)
    assert served_by(after) == ["target"] * 6, after                # the target serves all again


def test_grpc_calls_of_one_connection_routed_by_metadata(podtwin, h2_target, client, tmp_path):
    grpc = ["grpc", "h2target:80", "--md", "x-podtwin-user=alice", "--count", "6", "--alternate-header"]
    proc = filtered_steal(podtwin, tmp_path, h2_target)

    for mode in ([], ["--parallel"]):
        calls = probe(client, *grpc, *mode)
        assert calls == [f"SERVING served-by={who}" for who in ALTERNATE] + ["connections=1"], \
            (calls, proc.err_path.read_text())

    log = proc.err_path.read_text()
    assert log.count('local: grpc Check user="alice"') == 6
    assert 'user=""' not in log
    end(proc, h2_target)
    after = probe(client, *grpc)
    assert after == ["SERVING served-by=target"] * 6 + ["connections=1"], after
