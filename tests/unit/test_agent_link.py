"""The agent and the link client, for real: an agent process, SSH over a unix socket, loopback peers.

Needs no network beyond loopback, so it runs with the unit tests under `unshare --net`.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from podtwin.agent.link import wire
from podtwin.runner.link.client import Link, LinkKeys


@pytest.fixture
def target(tmp_path: Path):
    """A 'target' process with a known environment and its own resolv.conf via /proc/PID/root."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            env={"GREETING": "hello from target", "SECRET_TOKEN": "s3cr3t"})
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def agent(tmp_path: Path, target):
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "client_key").write_bytes(key.export_private_key())
    (tmp_path / "client_key").chmod(0o600)
    (tmp_path / "client_key.pub").write_bytes(key.export_public_key())
    sock = str(tmp_path / "agent.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "podtwin.agent", "--listen", f"unix:{sock}",
         "--authorized-keys", str(tmp_path / "client_key.pub"), "--target-pid", str(target.pid),
         "--startup-timeout", "20", "--log-level", "debug"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PODTWIN_AGENT_READY "), line
    ready = json.loads(line.split(" ", 1)[1])
    keys = LinkKeys(str(tmp_path / "client_key"), ready["host_key"])
    yield proc, sock, keys, tmp_path
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_info_tcp_udp_and_owner_lifetime(agent, target):
    proc, sock, keys, _ = agent

    async def scenario():
        # a loopback TCP server and UDP echo, reached *through the agent*
        async def on_tcp(reader, writer):
            data = await reader.read(100)
            writer.write(b"echo:" + data)
            await writer.drain()
            writer.close()
        tcp = await asyncio.start_server(on_tcp, "127.0.0.1", 0)
        tcp_port = tcp.sockets[0].getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        loop = asyncio.get_running_loop()

        async def udp_echo():
            data, addr = await loop.sock_recvfrom(udp, 2048)
            await loop.sock_sendto(udp, data.upper(), addr)
        echo_task = asyncio.create_task(udp_echo(), name="udp-echo")

        link = await Link.connect_unix(sock, keys, role="runner")
        info = await link.control.info()
        assert info.pid == target.pid
        assert info.env["GREETING"] == "hello from target"
        assert info.env["SECRET_TOKEN"] == "s3cr3t"

        reader, writer = await link.open_tcp("127.0.0.1", tcp_port)
        writer.write(b"ping")
        assert await reader.read(100) == b"echo:ping"
        writer.close()

        got: asyncio.Future[bytes] = loop.create_future()
        flow = link.control.udp_open("127.0.0.1", udp.getsockname()[1],
                                     lambda d: got.done() or got.set_result(d), lambda r: None)
        link.control.udp_send(flow, b"datagram")
        assert await asyncio.wait_for(got, 5) == b"DATAGRAM"
        await echo_task

        link.close()
        tcp.close()
        udp.close()

    run(scenario())
    # the runner (owner) went away: the agent must exit by itself, and remove its socket
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(sock)


def test_wrong_key_is_refused(agent):
    proc, sock, keys, tmp_path = agent
    other = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "other").write_bytes(other.export_private_key())
    bad = LinkKeys(str(tmp_path / "other"), keys.agent_host_key)

    async def scenario():
        with pytest.raises(asyncssh.PermissionDenied):
            await Link.connect_unix(sock, bad, role="runner")
        # the right key still works afterwards
        link = await Link.connect_unix(sock, keys, role="runner")
        await link.end()
    run(scenario())
    assert proc.wait(timeout=10) == 0


def _agent(tmp_path: Path, target, *args: str):
    """An agent of our own (``args``: extra options), its socket and keys; stderr to a file."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "client_key").write_bytes(key.export_private_key())
    (tmp_path / "client_key").chmod(0o600)
    (tmp_path / "client_key.pub").write_bytes(key.export_public_key())
    sock = str(tmp_path / "agent.sock")
    err = open(tmp_path / "agent.err", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "podtwin.agent", "--listen", f"unix:{sock}",
         "--authorized-keys", str(tmp_path / "client_key.pub"), "--target-pid", str(target.pid),
         "--startup-timeout", "20", *args], stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    line = proc.stdout.readline()
    assert line.startswith("PODTWIN_AGENT_READY "), line
    keys = LinkKeys(str(tmp_path / "client_key"), json.loads(line.split(" ", 1)[1])["host_key"])
    return proc, sock, keys


async def _broken_runner(sock: str, keys: LinkKeys) -> None:
    """A runner whose transport breaks under it: the agent sees EOF, no SSH disconnect."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(sock)
    link = await Link.connect(raw, keys, role="runner")
    await link.control.info()
    link.conn.abort()   # the transport goes, as a killed port-forward stream's would
    await asyncio.sleep(0.3)


def test_a_broken_runner_link_keeps_the_session_until_the_runner_is_back(tmp_path, target):
    proc, sock, keys = _agent(tmp_path, target, "--reconnect-grace", "30")
    try:
        async def scenario():
            await _broken_runner(sock, keys)
            assert proc.poll() is None                          # the agent waits for its runner
            link = await Link.connect_unix(sock, keys, role="runner")
            assert (await link.control.info()).env["GREETING"] == "hello from target"
            await link.end()                                    # and ends when the runner says so
        run(scenario())
        assert proc.wait(timeout=10) == 0
        err = (tmp_path / "agent.err").read_text()
        assert "keeping the session for 30s" in err and "the runner reconnected after" in err, err
        assert "the runner ended the session" in err, err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_runner_that_does_not_come_back_ends_the_session(tmp_path, target):
    proc, sock, keys = _agent(tmp_path, target, "--reconnect-grace", "1")
    try:
        started = time.monotonic()
        run(_broken_runner(sock, keys))
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "the runner did not reconnect within 1s" in (tmp_path / "agent.err").read_text()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_dead_runner_is_told_from_a_broken_link_by_its_lock(tmp_path, target):
    """On one kernel the runner holds a lock while it lives: a broken link whose runner still
    holds it is waited for; once the runner dies (the kernel frees the lock) the session ends."""
    lock = tmp_path / "owner.json"
    lock.write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    proc, sock, keys = _agent(tmp_path, target, "--reconnect-grace", "60", "--runner-lock", str(lock))
    try:
        run(_broken_runner(sock, keys))
        time.sleep(1.5)
        assert proc.poll() is None                 # the runner lives: a blip, wait for it
        holder.kill()
        holder.wait()
        assert proc.wait(timeout=5) == 0           # it died: no point waiting out the grace
        assert "the runner is gone" in (tmp_path / "agent.err").read_text()
    finally:
        for p in (proc, holder):
            p.kill()
            p.wait()
            p.stdout.close()


def test_a_newer_runner_connection_supersedes_the_older(tmp_path, target):
    """A runner that reconnected before the agent saw its old connection break owns the agent;
    the old connection is closed (and its end does not end the session)."""
    proc, sock, keys = _agent(tmp_path, target, "--reconnect-grace", "30")
    try:
        async def scenario():
            old = await Link.connect_unix(sock, keys, role="runner")
            new = await Link.connect_unix(sock, keys, role="runner")
            await asyncio.wait_for(old.wait_closed(), 5)
            assert proc.poll() is None
            assert (await new.control.info()).pid == target.pid
            await new.end()
        run(scenario())
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_agent_exits_when_nobody_connects(tmp_path, target):
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "k.pub").write_bytes(key.export_public_key())
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "podtwin.agent", "--listen", f"unix:{tmp_path}/a.sock",
         "--authorized-keys", str(tmp_path / "k.pub"), "--target-pid", str(target.pid),
         "--startup-timeout", "1"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0
    assert "no client connected" in proc.stderr
    assert not (tmp_path / "a.sock").exists()


def test_dns_is_forwarded_to_the_targets_nameserver(agent):
    """The agent sends the raw query to the nameserver in the target's resolv.conf.

    The target here is a host process, so its resolv.conf is the host's: we can only check that a
    query to an unreachable/unknown server comes back empty rather than hanging, unless a loopback
    nameserver is configured. The full DNS path is proven in integration/ against a real target.
    """
    proc, sock, keys, _ = agent

    async def scenario():
        link = await Link.connect_unix(sock, keys, role="runner")
        query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07example\x04test\x00\x00\x01\x00\x01"
        answer = await link.control.dns(query, timeout=30)
        assert answer == b"" or answer[:2] == b"\x12\x34"
        link.close()
    run(scenario())


@pytest.mark.parametrize("door", ["tcp", "unix"])
def test_exec_stdio_relay_carries_the_link_to_the_agent(tmp_path, target, door):
    """The exec transport without Kubernetes: an agent on tcp:127.0.0.1:0 (it announces the port
    the kernel chose) and on an exec socket, and the SSH link over the stdin/stdout of
    `podtwin.agent.link.stdio_relay` connected to either."""
    import threading

    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "client_key").write_bytes(key.export_private_key())
    (tmp_path / "client_key").chmod(0o600)
    agent = subprocess.Popen(
        [sys.executable, "-m", "podtwin.agent", "--listen", "tcp:127.0.0.1:0",
         "--authorized-key", key.export_public_key().decode().strip(), "--target-pid", str(target.pid),
         "--exec-socket", str(tmp_path / "exec.sock"), "--startup-timeout", "20"], stdout=subprocess.PIPE, text=True)
    relay = None
    try:
        line = agent.stdout.readline()
        ready = json.loads(line.split(" ", 1)[1])
        assert ready["port"] > 0
        assert ready["exec_socket"] == str(tmp_path / "exec.sock")
        address = f"127.0.0.1:{ready['port']}" if door == "tcp" else f"unix:{ready['exec_socket']}"
        relay = subprocess.Popen([sys.executable, "-m", "podtwin.agent.link.stdio_relay", address],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        listener = socket.create_server(("127.0.0.1", 0))   # a connected pair asyncssh can name
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()

        def up():
            try:
                while data := theirs.recv(65536):
                    relay.stdin.write(data)
            except OSError:
                pass
            relay.stdin.close()

        def down():
            try:
                while data := os.read(relay.stdout.fileno(), 65536):
                    theirs.sendall(data)
                theirs.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        for pump in (up, down):
            threading.Thread(target=pump, daemon=True).start()

        async def scenario():
            server = await asyncio.start_server(
                lambda r, w: (w.write(b"x" * 1_000_000), w.close()), "127.0.0.1", 0)
            link = await Link.connect(ours, LinkKeys(str(tmp_path / "client_key"), ready["host_key"]), role="runner")
            info = await link.control.info()
            assert info.env["GREETING"] == "hello from target"
            reader, writer = await link.open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
            assert len(await reader.read()) == 1_000_000   # bulk data, binary-clean, through the relay
            writer.close()
            link.close()
            server.close()
        run(scenario())
        assert agent.wait(timeout=10) == 0     # the owner link went: the agent exits
        assert relay.wait(timeout=10) == 0     # and so does the relay
        ours.close()
        theirs.close()
        relay.stdout.close()
    finally:
        for proc in (agent, relay):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        agent.stdout.close()


def test_sftp_serves_the_exports_on_the_link(agent, tmp_path):
    """An sftp channel beside the control channel on the same link: the target here is a host
    process (its root is /), so the export is a tmp directory. A symlink in it to an absolute
    path outside it is resolved beneath the export: the in-export file is served, not the other."""
    proc, sock, keys, _ = agent
    export, outside = tmp_path / "export", tmp_path / "outside"
    (export / "sub").mkdir(parents=True)
    (export / "app.conf").write_text("exported")
    outside.mkdir()
    (outside / "secret").write_text("agent secret")
    (export / "link").symlink_to(outside / "secret")
    in_export = export / str(outside / "secret").lstrip("/")
    in_export.parent.mkdir(parents=True)
    in_export.write_text("the in-export file")
    exports = wire.FsExports((wire.FsExport(str(export), False),))

    async def scenario():
        link = await Link.connect_unix(sock, keys, role="runner")
        assert (await link.control.info()).pid > 0     # the control channel still works beside it
        async with link.conn.start_sftp_client(env={wire.FS_EXPORTS_ENV: exports.encode()}) as sftp:
            async with sftp.open(f"{export}/app.conf", "rb") as f:
                assert await f.read() == b"exported"
            assert sorted(await sftp.listdir(str(export))) == [".", "..", "app.conf", "link", "sub", "tmp"]
            assert await sftp.readlink(f"{export}/link") == str(outside / "secret")
            async with sftp.open(f"{export}/link", "rb") as f:
                assert await f.read() == b"the in-export file"
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.open(str(outside / "secret"), "rb")
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat("/etc/passwd")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.open(f"{export}/app.conf", "wb")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.mkdir(f"{export}/new")
        with pytest.raises(asyncssh.ChannelOpenError):
            await link.conn.start_sftp_client()        # no exports asked for: refused
        link.close()

    run(scenario())
    assert (export / "app.conf").read_text() == "exported"
    assert proc.wait(timeout=10) == 0
