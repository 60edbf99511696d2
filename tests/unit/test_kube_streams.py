"""The session socket a Kubernetes transport serves: a session that ends while a stream to the
agent is still being opened ends quietly (no asyncio error lines after podtwin's own)."""
import asyncio
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from podtwin.runner.backends.base import AgentReady
from podtwin.runner.backends.kube_streams import StreamTransport
from podtwin.runner.link.loop import LoopThread


class SlowStreams(StreamTransport):
    name = what = "slow"

    def connect(self, ready):
        async def open_stream():
            await asyncio.sleep(0.5)   # an API server slow to answer the port-forward
            raise OSError("refused")
        return open_stream


def test_a_stream_still_opening_when_the_session_ends_ends_quietly(tmp_path: Path, caplog):
    session = SimpleNamespace(files=SimpleNamespace(agent_socket=tmp_path / "agent.sock"))
    loop = LoopThread("test-link")
    transport = SlowStreams(kube=None)
    transport.setup(session, AgentReady(host_key="k"), loop)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "agent.sock"))
    time.sleep(0.1)                      # the relay is now waiting for the stream
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        transport.restore()
        loop.stop()
    client.close()
    assert not [r for r in caplog.records if r.name == "asyncio"], [r.getMessage() for r in caplog.records]
