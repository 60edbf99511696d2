"""Find a container's main process from its ID, and enter its network namespace.

For a node agent (Kubernetes Job with hostPID): the runner knows the target container's ID from
the pod status (``containerd://<id>``); every process of that container has the ID in its
``/proc/PID/cgroup`` paths (cgroup v1 and v2, cgroupfs and systemd drivers alike). The container's
main process is the one whose parent is outside the container.

``setns`` switches only the calling thread, so it must happen in the main thread before any other
thread exists: threads created later (asyncio's executor, for example) inherit it. Sockets keep the
namespace they were created in, which is how the agent's listener can stay in its own pod (where
port-forward reaches it) while everything else it does happens in the target's namespace.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

CLONE_NEWNET = 0x40000000
_ID = re.compile(r"^[0-9a-f]{12,64}$")


class NamespaceError(Exception):
    pass


def strip_runtime(container_id: str) -> str:
    """``containerd://abc...`` / ``docker://abc...`` / ``abc...`` -> ``abc...``"""
    cid = container_id.split("://", 1)[-1].strip().lower()
    if not _ID.match(cid):
        raise NamespaceError(f"not a container ID: {container_id!r}")
    return cid


def pids_of_container(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    cid = strip_runtime(container_id)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if cid in (entry / "cgroup").read_text():
                found.append(int(entry.name))
        except OSError:  # the process exited, or we may not read it
            continue
    return found


def _parent(pid: int, proc: Path) -> int:
    stat = (proc / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def main_pid(container_id: str, proc: Path = Path("/proc")) -> int:
    """The container's main process: the one of its processes whose parent is not one of them."""
    pids = pids_of_container(container_id, proc)
    if not pids:
        raise NamespaceError(f"no process of container {strip_runtime(container_id)[:12]} on this node"
                             " (is the agent on the target's node, with hostPID?)")
    members = set(pids)
    roots = []
    for pid in pids:
        try:
            if _parent(pid, proc) not in members:
                roots.append(pid)
        except OSError:
            continue
    return min(roots or pids)


def pod_main_pid(container_id: str, proc: Path = Path("/proc")) -> int:
    """For an ephemeral container that targets the container (``targetContainerName``): it shares
    that container's PID namespace, so the container's processes are visible without hostPID.
    Found by the cgroup as on a node; when the cgroup paths do not show container IDs (a private
    cgroup namespace), the PID namespace's init is the target's main process -- unless the pod
    shares one PID namespace between its containers, where init is the pod's pause process."""
    try:
        return main_pid(container_id, proc)
    except NamespaceError:
        pass
    try:
        comm = (proc / "1" / "comm").read_text().strip()
    except OSError as exc:
        raise NamespaceError(f"no process of container {strip_runtime(container_id)[:12]} is visible"
                             " (is the ephemeral container's targetContainerName the target?)") from exc
    if comm == "pause":
        raise NamespaceError(f"no process of container {strip_runtime(container_id)[:12]} found among "
                             "the pod's shared processes (its cgroup paths hide container IDs)")
    return 1


def enter_netns(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NamespaceError(f"setns into the network namespace of PID {pid}: {os.strerror(err)}"
                                 " (the agent needs SYS_ADMIN and SYS_PTRACE)")
    finally:
        os.close(fd)
