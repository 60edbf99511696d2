"""The agent's SSH server: one authenticated, multiplexed link per client.

* direct-tcpip channels: the agent makes the TCP connection itself, inside the target's network
  namespace (it runs there), so the connection leaves from the target.
* the ``podtwin-control`` subsystem: handshake, target info, DNS, UDP, incoming subscriptions
  (``control_session``; the messages are in ``wire``).
* the ``sftp`` subsystem: the target's exported files (``agent/files``), rooted at
  ``/proc/<target pid>/root``; the exports come in the channel's environment.

Lifetime: a client that says HELLO with role ``runner`` owns the agent (``Agent.runner``). The
agent shuts down when its runner ends the session (END, or a clean SSH disconnect), when no runner
arrived within the startup timeout, or when the target process is gone. When the runner's
connection *breaks* instead (the transport under it dropped, or it went silent past the
keepalive), the agent keeps the session for ``reconnect_grace`` seconds: its incoming rules stay
(connections arriving meanwhile pass on to the target's own process), and a runner that comes
back -- it proves it holds the session's key by authenticating at all -- owns it again. A runner
that really died is told from a blip by its guard, which removes the agent (or, for an agent it
cannot remove, connects and sends END); past the grace the agent ends by itself.

A newer connection of the same role (a runner or sidecar that reconnected before the agent saw
the old connection break) supersedes the older one, which is closed.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from podtwin.agent.files.root import TargetRoot
from podtwin.agent.files.sftp import TargetSFTPServer
from podtwin.agent.link import wire
from podtwin.agent.link.control_session import ControlSession
from podtwin.agent.sockopts import no_delay
from podtwin.agent.target.process import TargetProcess
from podtwin.agent.tasks import TaskSet

if TYPE_CHECKING:
    from podtwin.agent.incoming.service import IncomingServer

log = logging.getLogger("podtwin.agent")


@dataclass
class Agent:
    target: TargetProcess
    authorized_keys: asyncssh.SSHAuthorizedKeys
    host_key: asyncssh.SSHKey
    startup_timeout: float = 60.0
    reconnect_grace: float = 60.0   # how long a session outlives its runner's broken connection
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 2
    incoming: "IncomingServer | None" = None
    runner: "AgentConnection | None" = None   # the runner's connection: the agent lives as long as it
    connections: set = field(default_factory=set)
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    runner_lock: str | None = None   # a file the runner holds locked while it lives (same kernel)
    owned: bool = False              # a runner has connected at least once
    lost_at: float | None = None     # when the runner's connection broke (None: not waiting)

    def notify(self, level: str, message: str) -> None:
        """Tell the runner something the user should see."""
        if self.runner is not None and self.runner.control is not None:
            self.runner.control.notify(level, message)

    def stop(self, reason: str) -> None:
        if not self.shutdown.is_set():
            log.info("shutting down: %s", reason)
            self.reason = reason
            self.shutdown.set()

    async def handle(self, sock: socket.socket) -> None:
        try:
            await asyncssh.run_server(
                sock,
                server_factory=lambda: AgentConnection(self),
                server_host_keys=[self.host_key],
                authorized_client_keys=self.authorized_keys,
                encoding=None,
                login_timeout=15,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max,
                allow_scp=False,
            )
        except (asyncssh.Error, OSError) as exc:
            log.warning("rejected a connection: %s", exc)
            sock.close()

    def runner_dead(self) -> bool:
        """Whether the runner is known to be dead: its lock file is gone or nobody holds it."""
        if self.runner_lock is None:
            return False
        try:
            fd = os.open(self.runner_lock, os.O_RDONLY)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # BlockingIOError: the runner holds it
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def runner_lost(self, connection: "AgentConnection", why: str, clean: bool) -> None:
        """The owner's connection ended: a clean end ends the session; a break starts the grace."""
        if self.runner is not connection:
            return
        self.runner = None
        if clean or self.reconnect_grace <= 0:
            self.stop("the runner's connection closed")
        elif self.runner_dead():
            self.stop(f"the runner's connection broke ({why}) and the runner is gone")
        else:
            log.warning("the runner's connection broke (%s): keeping the session for %.0fs", why,
                        self.reconnect_grace)
            self.lost_at = asyncio.get_running_loop().time()

    def greeted(self, connection: "AgentConnection") -> None:
        """A client said who it is. A runner owns the agent; a newer connection of a role
        supersedes the older one (which broke without the agent noticing yet)."""
        for other in list(self.connections):
            if other is not connection and other.role == connection.role and connection.role in ("runner", "sidecar"):
                log.info("a new %s connection supersedes the old one", connection.role)
                other.superseded = True
                if self.incoming is not None:
                    self.incoming.park_subscriber(other)   # for this connection to take over
                if self.runner is other:
                    self.runner = None
                if other.conn is not None:
                    other.conn.close()
        if connection.role == "sidecar" and self.incoming is not None:
            self.incoming.client_back()   # ports it does not take again are released
        if connection.role == "runner":
            if self.lost_at is not None:
                log.info("the runner reconnected after %.1fs", asyncio.get_running_loop().time() - self.lost_at)
            self.runner, self.owned, self.lost_at = connection, True, None

    async def watch(self) -> None:
        """Stop when no runner came in time, the runner did not come back within the grace, or
        the target process exited."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while not self.shutdown.is_set():
            if not self.owned and loop.time() > deadline:
                self.stop(f"no client connected within {self.startup_timeout:.0f}s")
            if self.runner is None and self.lost_at is not None:
                if loop.time() - self.lost_at > self.reconnect_grace:
                    self.stop(f"the runner did not reconnect within {self.reconnect_grace:.0f}s")
                elif self.runner_dead():
                    self.stop("the runner is gone (its lock is free)")
            if not self.target.exists():
                self.stop(f"target process {self.target.pid} exited")
            try:
                await asyncio.wait_for(self.shutdown.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


class AgentConnection(asyncssh.SSHServer):
    """One client's SSH connection (the runner's or the sidecar's); to the incoming service, the
    ``Subscriber`` its subscribed ports' connections are forwarded to."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.conn: asyncssh.SSHServerConnection | None = None
        self.role = "?"
        self.control: ControlSession | None = None   # its control channel, once started
        self.superseded = False   # a newer connection of the same role replaced this one

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.agent.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """A clean disconnect (``exc`` None) is the client leaving: its ports are released. A
        break keeps them for a client that reconnects (``IncomingServer.park_subscriber``)."""
        self.agent.connections.discard(self)
        log.info("%s disconnected%s", self.role, f": {exc}" if exc else "")
        clean = exc is None and not self.superseded
        if self.agent.incoming is not None:
            if clean or self.agent.shutdown.is_set():
                self.agent.incoming.drop_subscriber(self)
            else:
                self.agent.incoming.park_subscriber(self)
        self.agent.runner_lost(self, str(exc) if exc else "superseded", clean)

    def begin_auth(self, username: str) -> bool:
        return True  # always require auth: the session key is the only way in

    def password_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        log.debug("connect %s:%d for %s:%d", dest_host, dest_port, orig_host, orig_port)
        return True  # asyncssh opens the TCP connection from here: the target's netns

    def server_requested(self, listen_host: str, listen_port: int):
        """Remote forwarding of a port this client subscribed: the steal rule goes in now."""
        if self.agent.incoming is None or listen_host != wire.INCOMING_HOST:
            return False
        return self.agent.incoming.activate(self, listen_port) or False

    async def subscribe(self, port: int, mode: str, http_filter: dict | None) -> str | None:
        if self.agent.incoming is None:
            return "this agent was started without incoming traffic"
        error = await self.agent.incoming.subscribe(self, port, mode, http_filter)
        if error:
            self.agent.notify("fatal", error)  # the session cannot do what it was asked to
        return error

    async def open_forwarded(self, port: int, peer: tuple[str, int]):
        """A forwarded-tcpip channel to this client for a connection to ``port`` from ``peer``."""
        assert self.conn is not None
        return await self.conn.open_connection(wire.INCOMING_HOST, port, peer[0], peer[1], encoding=None)

    def session_requested(self):
        return LinkSession(self)

    def greeted(self, hello: wire.Hello) -> None:
        self.role = hello.role
        log.info("%s connected", self.role)
        self.agent.greeted(self)


class LinkSession(asyncssh.SSHServerSession):
    """A session channel of the link, which becomes what its subsystem asks for: the control
    channel (``ControlSession``) or the file server (asyncssh's stream session running
    ``TargetSFTPServer``); once chosen, every callback goes to that one.

    Not ``run_server(sftp_factory=...)``: with it set, asyncssh makes every session channel itself
    and never asks ``session_requested``, so the control subsystem would be refused. The choice
    is made here, per channel, when the client names the subsystem (after its env requests)."""

    def __init__(self, connection: AgentConnection) -> None:
        self.connection = connection
        self.chan: asyncssh.SSHServerChannel | None = None
        self.inner: asyncssh.SSHServerSession | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == wire.CONTROL_SUBSYSTEM:
            self.inner = ControlSession(self.connection)
        elif subsystem == wire.SFTP_SUBSYSTEM:
            self.inner = self._file_server()
        if self.inner is None:
            return False
        self.inner.connection_made(self.chan)
        return self.inner.subsystem_requested(subsystem)

    def _file_server(self) -> SSHServerStreamSession | None:
        """The sftp session for the exports this channel asked for, on the target's root; None
        (refused) when it asked for none, or wrongly, or the root cannot be opened. The root is
        opened now, not in the factory: asyncssh starts the session straight after this answer,
        and a failure here is the client's clear "subsystem refused"."""
        assert self.chan is not None
        try:
            exports = wire.FsExports.decode(self.chan.get_environment().get(wire.FS_EXPORTS_ENV))
            root = TargetRoot.at(self.connection.agent.target.root)
        except (wire.ProtocolError, OSError) as exc:
            log.warning("refused an sftp channel: %s", exc)
            return None
        # SFTP v3 (what sshfs speaks) is all this server offers
        return SSHServerStreamSession(None, lambda chan: TargetSFTPServer(chan, root, exports), sftp_version=3)

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def session_started(self) -> None:
        assert self.inner is not None
        self.inner.session_started()

    def data_received(self, data, datatype) -> None:
        assert self.inner is not None
        self.inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return self.inner.eof_received() if self.inner is not None else False

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)


def make_listener(spec: str, backlog: int = 16) -> tuple[socket.socket, Callable[[], None]]:
    """``unix:/path`` (inside the per-session directory only the session can reach) or
    ``tcp:127.0.0.1:PORT`` (loopback of the agent's own pod: only a port-forward or an exec'd relay
    reaches it; PORT 0 lets the kernel choose a free one, announced in the READY line).
    Made before the agent enters the target's namespace, so it stays where the runner can reach it."""
    kind, _, where = spec.partition(":")
    if kind == "unix":
        if os.path.exists(where):
            os.unlink(where)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(where)
        os.chmod(where, 0o666)  # the session directory's own mode (0700) is what keeps others out
        cleanup = lambda: os.path.exists(where) and os.unlink(where)  # noqa: E731
    elif kind == "tcp":
        host, _, port = where.rpartition(":")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("--listen tcp: must be a loopback address")
        listener = no_delay(socket.create_server((host, int(port))))
        cleanup = lambda: None  # noqa: E731
    else:
        raise ValueError(f"bad --listen {spec!r}")
    listener.listen(backlog)
    listener.setblocking(False)
    return listener, cleanup


async def serve(agent: Agent, listener: socket.socket, cleanup: Callable[[], None],
                exec_socket: tuple[str, socket.socket, Callable[[], None]] | None = None) -> None:
    """Announce readiness, accept clients until the agent stops, then close everything.

    ``exec_socket`` (path, listener, cleanup): a second, unix listener for relays exec'd in the
    agent's container (the exec transport), announced in the READY line as ``exec_socket``."""
    loop = asyncio.get_running_loop()
    tasks = TaskSet("agent")
    ready = {"version": wire.PROTOCOL_VERSION, "host_key": agent.host_key.export_public_key().decode().strip()}
    if listener.family in (socket.AF_INET, socket.AF_INET6):
        ready["port"] = listener.getsockname()[1]  # what the kernel chose for tcp:127.0.0.1:0
    listeners = [(listener, cleanup)]
    if exec_socket is not None:
        ready["exec_socket"] = exec_socket[0]
        listeners.append(exec_socket[1:])
    print("PODTWIN_AGENT_READY " + wire.json.dumps(ready), flush=True)

    async def accept_forever(sock_listener: socket.socket) -> None:
        while True:
            sock, _ = await loop.sock_accept(sock_listener)
            tasks.spawn(agent.handle(sock), "handshake")

    for sock, _ in listeners:
        tasks.spawn(accept_forever(sock), "accept")
    tasks.spawn(agent.watch(), "watch")
    try:
        await agent.shutdown.wait()
    finally:
        tasks.cancel_all()   # accepting, watching, and handshakes still under way
        if agent.incoming is not None:
            agent.incoming.close()  # removes this session's rules before anything else
        for sock, remove in listeners:
            sock.close()
            remove()
        for conn in list(agent.connections):
            if conn.conn is not None:
                conn.conn.close()
        await asyncio.sleep(0.1)
