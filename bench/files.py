"""The target's files benchmark (a section of ``bench/run.py``; issue #11).

A target container with a volume at ``/data`` holding one large file (``--files-mb``, random
bytes) and ``--small-files`` small ones (1 KiB each). The same reader (``ptbench files``: one
sequential read of the large file in 1 MiB reads, then open+read+close of every small file, the
first pass cold and two more warm) runs in four arms, in one run:

* **in the target**: ``docker exec TARGET ptbench files ...``, the baseline;
* **podtwin**: ``podtwin container run --target container/TARGET IMAGE ptbench files ...``: the
  app reads ``/data`` through the sidecar's sshfs, the link and the agent's SFTP server;
* **sshfs over OpenSSH**: the same sshfs options (``ro,dir_cache=no,max_read=131072``) in a client container,
  to an OpenSSH ``sshd`` (built here: the podtwin image plus Debian's openssh-server) that has
  the target's volume, over the staging network: the yardstick for podtwin's file path;
* **docker exec cat** (what ``kubectl exec cat`` is for a pod): the large file streamed to the
  host by one exec, and one exec per small file.

Everything carries the run's label and is removed at the end.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from run import PODTWIN_IMAGE, MB, docker, log

if TYPE_CHECKING:
    from run import Bench

SSHD_DOCKERFILE = f"""FROM {PODTWIN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends openssh-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /run/sshd && ssh-keygen -A
"""


class FilesSection:
    def __init__(self, bench: "Bench") -> None:
        self.bench = bench
        tag = bench.tag
        self.volume = f"ptbench-files-{tag}"
        self.target = f"ptbench-files-target-{tag}"
        self.sshd = f"ptbench-sshd-{tag}"
        self.sshd_image = f"podtwin-bench/sshd:{tag}"
        self.keys = Path(tempfile.mkdtemp(prefix=f"ptbench-keys-{tag}-"))
        self.results: dict[str, dict] = {}
        self.exec_cat: dict[str, float] = {}

    def args(self, root: str) -> list[str]:
        return ["ptbench", "files", "-big", f"{root}/big", "-small", f"{root}/small"]

    def staging(self) -> None:
        b = self.bench
        n, size = b.args.small_files, int(b.args.files_mb * MB)
        log(f"files: a volume with a {size / MB:.0f} MB file and {n} small files; target {self.target}")
        docker("volume", "create", "--label", b.label, self.volume)
        docker("run", "--rm", "--label", b.label, "-v", f"{self.volume}:/data", b.image, "sh", "-c",
               f"head -c {size} /dev/urandom > /data/big && mkdir /data/small && "
               f"for i in $(seq 1 {n}); do head -c 1024 /dev/urandom > /data/small/f$i; done", timeout=300)
        docker("run", "-d", "--name", self.target, "--label", b.label, "--network", b.network,
               "-v", f"{self.volume}:/data", b.image, "sleep", "3600")

    def reader(self, cmd: list[str], what: str) -> dict:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=self.bench.env)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "result":
                    return event
                if event.get("event") == "error":
                    raise RuntimeError(f"files, {what}: {event['error']}")
        raise RuntimeError(f"files, {what}: no result (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")

    def sshfs_arm(self) -> dict:
        b = self.bench
        log(f"files: building {self.sshd_image} (openssh-server from Debian)")
        with tempfile.TemporaryDirectory(prefix="ptbench-sshd-") as ctx:
            (Path(ctx) / "Dockerfile").write_text(SSHD_DOCKERFILE)
            docker("build", "-q", "--network", "host", "-t", self.sshd_image, "--label", b.label, ctx, timeout=600,
                   env={**__import__("os").environ, "DOCKER_BUILDKIT": "0"})
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.keys / "id")], check=True)
        (self.keys / "authorized_keys").write_text((self.keys / "id.pub").read_text())
        ptbench = self.keys / "ptbench"
        cid = docker("create", "--label", b.label, b.image).stdout.strip()
        try:
            docker("cp", f"{cid}:/bin/ptbench", str(ptbench))
        finally:
            docker("rm", "-f", cid, check=False)
        docker("run", "-d", "--name", self.sshd, "--label", b.label, "--network", b.network,
               "-v", f"{self.volume}:/data:ro", "-v", f"{self.keys}/authorized_keys:/root/.ssh/authorized_keys:ro",
               self.sshd_image, "/usr/sbin/sshd", "-D", "-e", "-p", "2222")
        time.sleep(1)
        options = "ro,dir_cache=no,max_read=131072,port=2222,IdentityFile=/keys/id,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null"
        script = (f"mkdir -p /mnt/t && sshfs -o {options} root@{self.sshd}:/data /mnt/t && "
                  f"/keys/ptbench files -big /mnt/t/big -small /mnt/t/small; fusermount3 -u /mnt/t")
        return self.reader(["docker", "run", "--rm", "--label", b.label, "--network", b.network,
                            "--cap-drop", "ALL", "--cap-add", "SYS_ADMIN", "--device", "/dev/fuse",
                            "--security-opt", "apparmor=unconfined", "-v", f"{self.keys}:/keys:ro",
                            PODTWIN_IMAGE, "sh", "-c", script], "sshfs over OpenSSH")

    def exec_cat_arm(self) -> None:
        t = time.monotonic()
        with open("/dev/null", "wb") as sink:
            subprocess.run(["docker", "exec", self.target, "cat", "/data/big"], stdout=sink, check=True, timeout=600)
        self.exec_cat["mb_s"] = self.bench.args.files_mb / (time.monotonic() - t)
        times = []
        for i in range(1, 21):
            t = time.monotonic()
            subprocess.run(["docker", "exec", self.target, "cat", f"/data/small/f{i}"], stdout=subprocess.DEVNULL,
                           check=True, timeout=60)
            times.append((time.monotonic() - t) * 1e6)
        self.exec_cat["p50_us"] = statistics.median(times)

    def run(self) -> None:
        self.staging()
        log("files: in the target")
        self.results["in the target"] = self.reader(["docker", "exec", self.target, *self.args("/data")], "direct")
        log("files: podtwin")
        self.results["podtwin"] = self.reader(
            [*self.bench.podtwin, "container", "run", "-q", "--target", f"container/{self.target}", self.bench.image,
             *self.args("/data")], "podtwin")
        log("files: sshfs over OpenSSH")
        try:
            self.results["sshfs over OpenSSH"] = self.sshfs_arm()
        except Exception as exc:  # noqa: BLE001 - the yardstick is optional: say why it is missing
            log(f"files: sshfs over OpenSSH skipped: {exc}")
        log("files: docker exec cat")
        self.exec_cat_arm()

    def report(self) -> str:
        base = self.results["in the target"]
        ssh = self.results.get("sshfs over OpenSSH")
        out = ["| Reader | Sequential read, MB/s | vs in the target | small file open+read+close p50 / p99, "
               "cold, µs | warm, µs |", "|---|---:|---:|---:|---:|"]
        for arm, r in self.results.items():
            out.append(f"| {arm} | {r['mb_s']:.0f} | {r['mb_s'] / base['mb_s']:.2f}x | "
                       f"{r['cold_p50_us']} / {r['cold_p99_us']} | {r['warm_p50_us']} / {r['warm_p99_us']} |")
        out.append(f"| docker exec cat (one exec per file) | {self.exec_cat['mb_s']:.0f} | "
                   f"{self.exec_cat['mb_s'] / base['mb_s']:.2f}x | {self.exec_cat['p50_us']:.0f} (p50) | — |")
        pod = self.results["podtwin"]
        ratio = f"podtwin's sequential read is {pod['mb_s'] / ssh['mb_s']:.2f}x sshfs over OpenSSH's" if ssh \
            else "sshfs over OpenSSH did not run (see the log)"
        return "\n".join(out) + (f"\n\n{self.bench.args.files_mb:.0f} MB file, {self.bench.args.small_files} "
                                 f"small files of 1 KiB, three passes (the first cold). {ratio}.\n")

    def cleanup(self) -> None:
        b = self.bench
        for name in (self.target, self.sshd):
            docker("rm", "-f", name, check=False, timeout=60)
        docker("volume", "rm", "-f", self.volume, check=False, timeout=60)
        docker("image", "rm", "-f", self.sshd_image, check=False, timeout=60)
        subprocess.run(["rm", "-rf", str(self.keys)], check=False)
        if b.label:
            left = docker("volume", "ls", "-q", "--filter", f"label={b.label}", check=False).stdout.split()
            if left:
                docker("volume", "rm", "-f", *left, check=False)
