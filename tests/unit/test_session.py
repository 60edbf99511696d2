"""Session bookkeeping: labels, the session directory, and telling live runners from dead ones."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from podtwin.runner.state import session as s


def labels_for(pid: int, **extra) -> dict:
    return {s.LABEL_HOST: socket.gethostname(), s.LABEL_RUNNER_PID: str(pid),
            s.LABEL_RUNNER_START: s.process_start(pid), **extra}


def test_live_dead_and_reused_pids():
    assert s.runner_alive(labels_for(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    recorded = labels_for(child.pid)
    child.wait()
    assert not s.runner_alive(recorded)
    # same PID, another process (a reused PID): the start time differs, so it is not the runner
    assert not s.runner_alive({**labels_for(os.getpid()), s.LABEL_RUNNER_START: "1"})
    # another machine's session is not ours to judge
    assert s.runner_alive({**recorded, s.LABEL_HOST: "some-other-host"})


def test_session_directory_is_private_and_owned(tmp_path, monkeypatch):
    monkeypatch.setenv("PODTWIN_STATE_DIR", str(tmp_path))
    sess = s.Session.create("container/x")
    assert sess.dir.parent == tmp_path / "sessions"
    assert oct(sess.dir.stat().st_mode & 0o777) == "0o700"
    assert s.dir_owner_alive(sess.dir)
    labels = sess.labels("agent")
    assert labels[s.LABEL_SESSION] == sess.id and labels[s.LABEL_ROLE] == "agent"
    assert sess.name("app") == f"podtwin-{sess.id}-app"
    sess.write_keys()
    assert oct((sess.dir / "client_key").stat().st_mode & 0o777) == "0o600"
    assert (sess.dir / "client_key.pub").read_text().startswith("ssh-ed25519 ")
    sess.remove_dir()
    assert not sess.dir.exists()


def test_a_state_dir_that_is_a_file_or_too_long_is_one_line(tmp_path, monkeypatch):
    from podtwin.runner.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PODTWIN_STATE_DIR", str(blocker))
    with pytest.raises(ConfigError, match="cannot use the state directory"):
        s.Session.create("container/x")
    deep = tmp_path / ("d" * 100)
    monkeypatch.setenv("PODTWIN_STATE_DIR", str(deep))
    with pytest.raises(ConfigError, match="too long a path"):
        s.Session.create("container/x")
    assert not deep.exists()   # refused before anything was made
