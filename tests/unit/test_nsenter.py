"""Finding a container's main process from its ID, in a /proc tree made for the test."""
from __future__ import annotations

from pathlib import Path

import pytest

from podtwin.agent.target.nsenter import NamespaceError, main_pid, pids_of_container, strip_runtime

CID = "3f2a" + "b" * 60


def fake_proc(root: Path, procs: dict[int, tuple[int, str]]) -> Path:
    """pid -> (parent pid, cgroup file text)"""
    for pid, (ppid, cgroup) in procs.items():
        d = root / str(pid)
        d.mkdir()
        (d / "cgroup").write_text(cgroup)
        (d / "stat").write_text(f"{pid} (proc name) S {ppid} 1 1 0 -1\n")
    (root / "self").mkdir()
    return root


def test_strip_runtime():
    assert strip_runtime(f"containerd://{CID}") == CID
    assert strip_runtime(f"docker://{CID.upper()}") == CID
    with pytest.raises(NamespaceError):
        strip_runtime("containerd://not-an-id")


def test_main_pid_is_the_container_process_whose_parent_is_outside(tmp_path):
    v1 = f"12:pids:/kubepods/besteffort/pod1234/{CID}\n11:memory:/kubepods/besteffort/pod1234/{CID}\n"
    proc = fake_proc(tmp_path, {
        100: (1, "0::/system.slice/containerd.service\n"),      # the shim: not in the container
        201: (100, v1),                                         # the container's main process
        202: (201, v1),                                         # its child
        300: (100, "12:pids:/kubepods/besteffort/pod9/" + "c" * 64 + "\n"),  # another container
    })
    assert sorted(pids_of_container(CID, proc)) == [201, 202]
    assert main_pid(f"containerd://{CID}", proc) == 201


def test_systemd_cgroup_paths_and_missing_containers(tmp_path):
    proc = fake_proc(tmp_path, {
        50: (1, f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{CID}.scope\n"),
    })
    assert main_pid(CID, proc) == 50
    with pytest.raises(NamespaceError, match="no process of container"):
        main_pid("d" * 64, proc)


def test_pod_main_pid_for_an_ephemeral_container(tmp_path):
    from podtwin.agent.target.nsenter import pod_main_pid

    # cgroup paths name the container: found as on a node
    (tmp_path / "a").mkdir()
    proc = fake_proc(tmp_path / "a", {1: (0, f"0::/kubepods/pod1/{CID}\n"), 7: (0, "0::/kubepods/pod1/" + "e" * 64)})
    assert pod_main_pid(CID, proc) == 1
    # a private cgroup namespace hides the IDs: the PID namespace's init is the target's process
    (tmp_path / "b").mkdir()
    proc = fake_proc(tmp_path / "b", {1: (0, "0::/\n"), 9: (0, "0::/\n")})
    (proc / "1" / "comm").write_text("sleep\n")
    assert pod_main_pid(CID, proc) == 1
    # ... unless the pod shares one PID namespace (shareProcessNamespace): then init is pause
    (proc / "1" / "comm").write_text("pause\n")
    with pytest.raises(NamespaceError, match="shared processes"):
        pod_main_pid(CID, proc)
