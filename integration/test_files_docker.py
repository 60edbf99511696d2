"""The target's files at their real paths (feature.fs): a Docker target's bind mount and named
volume appear in the app, through sshfs in the sidecar over the link, read-only by default."""
from __future__ import annotations

import os
import secrets
import signal

import pytest

from conftest import APP_IMAGE, docker, kill, session_containers, wait_until, write_config


@pytest.fixture
def files_target(tmp_path):
    """A target with a bind-mounted config directory and a named volume it writes to."""
    name = f"podtwin-test-files-{secrets.token_hex(3)}"
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yaml").write_text("greeting: from the target's config\n")
    (config / "secret").write_text("s3cret\n")
    (config / "secret").chmod(0o440)
    volume = f"{name}-data"
    docker("volume", "create", "--label", "podtwin-test", volume)
    # the volume's root is the target user's, as an app image's Dockerfile would make it
    docker("run", "--rm", "-v", f"{volume}:/data", APP_IMAGE, "chown", "1000:1000", "/data")
    os.chown(config / "secret", 0, 2000)   # readable by the target's extra group only (and root)
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "-v", f"{config}:/etc/config:ro",
           "-v", f"{volume}:/data", "--user", "1000:1000", "--group-add", "2000", APP_IMAGE, "sh", "-c",
           "echo written-by-target > /data/state; exec sleep 3600")
    docker("exec", "-u", "0", name, "sh", "-c", "mkdir -p /srv/extra && echo outside-the-mounts > /srv/extra/file")
    wait_until(lambda: docker("exec", name, "cat", "/data/state", check=False).stdout.strip() == "written-by-target",
               20, "the target to write its volume")
    yield name, config
    docker("rm", "-f", name, check=False)
    docker("volume", "rm", "-f", volume, check=False)


def test_bind_mount_and_volume_appear_read_only(podtwin, files_target):
    name, config = files_target
    script = ("cat /etc/config/app.yaml /data/state; ls -ln /etc/config/secret; "
              "echo local > /data/state 2>/dev/null && echo WROTE || echo write-refused; "
              "cat /data/state")
    result = podtwin.run("container", "run", "-q", "--target", f"container/{name}", APP_IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "greeting: from the target's config"
    assert lines[1] == "written-by-target"
    assert lines[2].startswith("-r--r-----") and lines[2].split()[2:4] == ["0", "2000"]   # mode, owner
    assert lines[3:] == ["write-refused", "written-by-target"]              # read mode: nothing written
    assert docker("exec", name, "cat", "/data/state").stdout.strip() == "written-by-target"


def test_files_are_live_and_local_mode_serves_none(podtwin, files_target, tmp_path):
    name, config = files_target
    proc = podtwin.start("container", "run", "--target", f"container/{name}", APP_IMAGE, "sh", "-c",
                         "while true; do cat /etc/config/app.yaml; sleep 0.2; done")
    try:
        wait_until(lambda: "from the target's config" in proc.out_path.read_text() or proc.poll() is not None,
                   60, "the app to read the target's config")
        assert proc.poll() is None, proc.err_path.read_text()
        (config / "app.yaml").write_text("greeting: changed in the target\n")
        wait_until(lambda: "changed in the target" in proc.out_path.read_text(), 15, "the change to show")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    cfg = write_config(tmp_path / "local.json", {"feature": {"fs": "local"}})
    result = podtwin.run("container", "run", "-q", "-f", str(cfg), "--target", f"container/{name}", APP_IMAGE,
                         "sh", "-c", "cat /etc/config/app.yaml 2>/dev/null || echo no-such-file")
    assert result.stdout.strip() == "no-such-file", result.stderr


def test_mirrords_lists_decide_paths_and_write_mode_writes(podtwin, files_target, tmp_path):
    """A read_only regex naming a directory outside the mounts brings it over; not_found hides a
    file inside a mount; local leaves a mount as the image's own; --fs write writes the target's
    writable volume (and only it)."""
    name, _ = files_target
    cfg = write_config(tmp_path / "mirrord.json", {"target": f"container/{name}", "feature": {"fs": {
        "read_only": ["^/srv/extra/.*"], "not_found": [r"^/etc/config/SECRET$"], "local": ["^/nothing$"]}}})
    script = ("cat /srv/extra/file; ls /etc/config; cat /etc/config/secret 2>&1 || echo hidden; "
              "echo from-the-app > /data/new && echo WROTE; echo x > /etc/config/new 2>/dev/null || echo ro-refused")
    result = podtwin.run("container", "run", "-f", str(cfg), "--fs", "write", APP_IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["outside-the-mounts", "app.yaml", lines[2]] and "hidden" in result.stdout
    assert "WROTE" in lines and "ro-refused" in lines
    assert docker("exec", name, "cat", "/data/new").stdout.strip() == "from-the-app"
    assert "the target's files: /data (writable), /etc/config, /srv/extra" in result.stderr
    # a regex that names no path is said once, not ignored
    cfg = write_config(tmp_path / "named.json", {"feature": {"fs": {"read_only": [r".*\.json$"], "local": ["^/data"]}}})
    result = podtwin.run("container", "run", "-f", str(cfg), "--target", f"container/{name}", APP_IMAGE,
                         "sh", "-c", "cat /data/state 2>/dev/null || echo image-own")
    assert result.stdout.strip() == "image-own", result.stderr
    assert "/data stays the image's own (feature.fs.local '^/data')" in result.stderr
    assert r"feature.fs.read_only '.*\\.json$' names no directory" in result.stderr


def test_as_target_user_reads_what_the_target_user_can(podtwin, files_target):
    """The secret is 0440 root:2000; the target runs as 1000:1000 with group 2000 added."""
    name, _ = files_target
    script = "id -u; id -G; cat /etc/config/secret 2>&1"
    result = podtwin.run("container", "run", "--as-target-user", "--target", f"container/{name}", APP_IMAGE,
                         "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1000" and "2000" in lines[1].split() and lines[2] == "s3cret"
    assert "the app runs as the target's user 1000:1000, with groups 2000" in result.stderr
    result = podtwin.run("container", "run", "-q", "-u", "1234", "--target", f"container/{name}", APP_IMAGE,
                         "sh", "-c", script)
    assert "Permission denied" in result.stdout, result.stdout + result.stderr


def test_sigkill_of_the_runner_leaves_no_mount_and_no_volume(podtwin, files_target):
    name, _ = files_target
    proc = podtwin.start("container", "run", "--target", f"container/{name}", APP_IMAGE, "sh", "-c",
                         "cat /etc/config/app.yaml; exec sleep 600")
    wait_until(lambda: "from the target's config" in proc.out_path.read_text() or proc.poll() is not None,
               60, "the app to read the target's config")
    assert proc.poll() is None, proc.err_path.read_text()
    kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not session_containers(runner=proc), 30, "the session's containers to go")
    # the podtwin fixture then checks that no volume (nor anything else) of the session is left,
    # and nothing of the session may stay mounted on the daemon's side
    wait_until(lambda: "podtwin-" not in _daemon_fuse_mounts(), 30, "the FUSE mount to go")


@pytest.mark.parametrize("role,why", [("sidecar", "the sidecar stopped"),
                                      ("agent", "the link to the agent was lost")])
def test_sigkill_mid_read_ends_the_session_and_leaves_no_mount(podtwin, files_target, role, why):
    """The app's file reads fail (never hang) once the agent or the sidecar's sshfs is gone, and
    the session ends with one line naming why: no mount, no volume, no container left."""
    name, _ = files_target
    proc = podtwin.start("container", "run", "--target", f"container/{name}", APP_IMAGE, "sh", "-c",
                         "while true; do cat /etc/config/app.yaml || echo READ-FAILED; sleep 0.3; done")
    wait_until(lambda: "from the target's config" in proc.out_path.read_text() or proc.poll() is not None,
               60, "the app to read the target's config")
    assert proc.poll() is None, proc.err_path.read_text()
    docker("kill", "-s", "KILL", session_containers(role, runner=proc)[0])
    assert proc.wait(timeout=30) == 125
    last = proc.err_path.read_text().strip().splitlines()[-1]
    assert why in last and "Traceback" not in proc.err_path.read_text()
    wait_until(lambda: not session_containers(runner=proc), 10, "the session's containers to go")
    wait_until(lambda: "podtwin-" not in _daemon_fuse_mounts(), 10, "the FUSE mount to go")


def _daemon_fuse_mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return "".join(line for line in f if "fuse.sshfs" in line)


def test_a_snapshot_copy_where_propagation_is_refused(podtwin, files_target):
    """PODTWIN_FS_COPY=1 takes the path of an engine that refuses mount propagation: the
    read-only files are copied into the app before it starts, said to be a snapshot; no FUSE mount
    in the app."""
    name, config = files_target
    script = ("cat /etc/config/app.yaml /data/state; ls -ln /etc/config/secret; "
              "grep -c fuse /proc/mounts || true")
    result = podtwin.run("container", "run", "--target", f"container/{name}", APP_IMAGE, "sh", "-c", script,
                         env={"PODTWIN_FS_COPY": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["greeting: from the target's config", "written-by-target"]
    assert lines[2].startswith("-r--r-----") and lines[2].split()[2:4] == ["0", "2000"]   # owners kept
    assert lines[3] == "0"                                                                  # a copy, no mount
    assert "refuses mount propagation: /data, /etc/config copied into the app as a snapshot" in result.stderr
    result = podtwin.run("container", "run", "-q", "--fs", "write", "--target", f"container/{name}", APP_IMAGE,
                         "sh", "-c", "ls /data 2>&1; cat /etc/config/app.yaml", env={"PODTWIN_FS_COPY": "1"})
    assert result.returncode == 0, result.stderr
    assert "/data: not available: a writable path needs mount propagation" in result.stderr
    assert "greeting: from the target's config" in result.stdout and "state" not in result.stdout


def test_a_target_paused_mid_session_neither_hangs_nor_ends_it(podtwin, files_target):
    """`docker pause` freezes the target's processes, not its agent: the app's reads of the
    target's files and the session carry on, and the session ends normally afterwards."""
    name, _ = files_target
    proc = podtwin.start("container", "run", "-q", "--target", f"container/{name}", APP_IMAGE, "sh", "-c",
                         "for i in 1 2 3 4 5 6; do cat /etc/config/app.yaml >/dev/null && echo read$i; sleep 1; done")
    wait_until(lambda: "read1" in proc.out_path.read_text() or proc.poll() is not None, 60, "the first read")
    docker("pause", name)
    try:
        wait_until(lambda: "read3" in proc.out_path.read_text() or proc.poll() is not None, 20, "reads while paused")
    finally:
        docker("unpause", name)
    assert proc.wait(timeout=30) == 0, proc.err_path.read_text()
    assert proc.out_path.read_text().split() == [f"read{i}" for i in range(1, 7)]
