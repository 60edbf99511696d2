"""Build the local images podtwin and its tests need, with the `docker` CLI.

From a checkout or from an installed wheel alike: the wheel carries the Dockerfile
(``podtwin.images``) and the package's own tree is copied into the image as it is. Images:

* ``podtwin/debian-base:bookworm`` -- the base: kept if present; else Debian's
  ``debian:bookworm-slim`` when a registry answers; else minbase Debian made with debootstrap
  from the machine's own apt mirror (no registry needed). The build says which;
* the podtwin image -- the sidecar (and everything podtwin runs in a container but the agent),
  tagged ``podtwin:<version>`` (the name sessions look for; ``--tag`` or PODTWIN_IMAGE name
  another) and ``podtwin:dev``; rebuilt whenever the package's files change (a content hash is
  stored in a label);
* the agent image -- made from the podtwin image's own files (``images/agent.Dockerfile``,
  ``images/agent_rootfs.py``): Python, the agent's package and dependencies, iptables and the
  libraries they load, on an empty base (about 64 MB, what a cluster's nodes pull). Tagged with
  the podtwin image's name plus ``-agent`` (``podtwin-agent:<version>``, ``podtwin-agent:dev``)
  and the release's name ``ghcr.io/podtwin/podtwin-agent:<version>`` (the agent's default in
  clusters);
* ``podtwin-test/busybox:latest`` -- a checkout's test image, for the tests and the demo: static
  busybox plus two static Go tools (no libc, nothing podtwin): ``udpsend``, a UDP client, and
  ``h2probe``, an HTTP/1.1 + h2c + gRPC server and clients (images/h2probe).

Run ``podtwin images build [--force] [--tag NAME]`` (``python -m podtwin.runner.tools.images``).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from podtwin.runner.config.image import DEV_IMAGE, agent_image_name, podtwin_image_name, release_image_name
from podtwin.runner.errors import PodtwinError

BASE_IMAGE = "podtwin/debian-base:bookworm"
PODTWIN_IMAGE = podtwin_image_name()
BUSYBOX_IMAGE = "podtwin-test/busybox:latest"
HASH_LABEL = "podtwin.source-hash"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LOCK_FILE = "/tmp/podtwin-images.lock"

# In a checkout this file is runner/tools/images.py (the test image and the cluster's loader
# live there); in an installed wheel that directory is site-packages and has neither.
REPO = Path(__file__).resolve().parents[2]
PYTHON_BASE = "debian:bookworm-slim"   # pulled for the base when a registry answers
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

Echo = Callable[[str], None]


class ImageBuildError(PodtwinError):
    """An image could not be built."""


# --- helpers -----------------------------------------------------------------------------------


def _stream(cmd: list[str], echo: Echo, env: dict[str, str] | None = None) -> None:
    """Run cmd, echoing its output line by line as progress; raise on failure."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        echo("    " + line.rstrip())
    if proc.wait() != 0:
        raise ImageBuildError(f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode})",
                              "see the output above")


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


def _image_id(image: str) -> str | None:
    res = _docker("image", "inspect", "--format", "{{.Id}}", image)
    return res.stdout.strip() if res.returncode == 0 else None


def _label(image: str, label: str) -> str | None:
    res = _docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', image)
    return res.stdout.strip() if res.returncode == 0 else None


def _drop_if_replaced(image: str, old: str | None) -> None:
    # Drop the image the tag pointed to before, so repeated builds don't fill the disk -- only
    # if no other tag names it now (`image rm ID` would untag another work tree's copy too).
    # Fails (ignored) while a container still uses it.
    if old and old != _image_id(image):
        tags = _docker("image", "inspect", "-f", "{{len .RepoTags}}", old)
        if tags.returncode == 0 and tags.stdout.strip() == "0":
            _docker("image", "rm", old)


def _legacy_build_env() -> dict[str, str]:
    # Debian's docker.io 20.10 has no buildx: use the classic builder.
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith(".pyc"):
                yield Path(dirpath, name)


def package_files() -> dict[str, Path]:
    """What the podtwin image is made of, by its path in the build context: the Dockerfile and
    every file of the podtwin.runner and podtwin.agent packages, wherever they are installed."""
    import podtwin.agent
    import podtwin.runner
    from importlib import resources

    files = {"Dockerfile": Path(str(resources.files("podtwin.images") / "Dockerfile"))}
    for package in (podtwin.runner, podtwin.agent):
        top, name = Path(package.__file__).parent, package.__name__.rsplit(".", 1)[1]
        for f in _walk(top):
            files[f"podtwin/{name}/{f.relative_to(top)}"] = f
    return files


def agent_files() -> dict[str, Path]:
    """What the agent image's build context is made of (besides the podtwin image it starts from)."""
    from importlib import resources
    images = resources.files("podtwin.images")
    return {"Dockerfile": Path(str(images / "agent.Dockerfile")),
            "agent_rootfs.py": Path(str(images / "agent_rootfs.py"))}


def agent_hash(podtwin_digest: str) -> str:
    """A content hash of what makes the agent image: the podtwin image's, and its own files."""
    h = hashlib.sha256(podtwin_digest.encode())
    for rel, f in sorted(agent_files().items()):
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def requirements() -> str:
    """The package's run-time dependencies, as pip's requirements file (no extras)."""
    from importlib.metadata import requires
    return "\n".join(r for r in requires("podtwin") or [] if "extra ==" not in r) + "\n"


def source_hash() -> str:
    """A content hash of what goes into the podtwin image."""
    h = hashlib.sha256(requirements().encode())
    for rel, f in sorted(package_files().items()):
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# --- apt configuration of the host -------------------------------------------------------------


def _deb822_stanzas(text: str) -> list[str]:
    return [s for s in text.split("\n\n") if s.strip()]


def _field(stanza: str, name: str) -> list[str]:
    for line in stanza.splitlines():
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].split()
    return []


def _debian_sources() -> tuple[str, str]:
    """(mirror URL for debootstrap, sources text to install in the image), read from the host.

    The mirror is whatever this machine's apt uses for bookworm (CI may point apt at a local
    mirror); the image gets the same Debian entries so `apt-get` inside it works too.
    """
    stanzas = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        stanzas += [s for s in _deb822_stanzas(f.read_text())
                    if "deb" in _field(s, "Types")
                    and any(x.startswith(SUITE) for x in _field(s, "Suites"))]
    if stanzas:
        main = next((s for s in stanzas if SUITE in _field(s, "Suites")), stanzas[0])
        return _field(main, "URIs")[0], "\n\n".join(s.strip() for s in stanzas) + "\n"
    lines = []
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"]:
                rest = words[1:]
                if rest and rest[0].startswith("["):  # skip "[arch=... signed-by=...]" options
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                if len(rest) >= 2 and rest[1].startswith(SUITE):
                    lines.append((rest[0], rest[1], line.strip()))
    if lines:
        main = next((l for l in lines if l[1] == SUITE), lines[0])
        return main[0], "\n".join(l[2] for l in lines) + "\n"
    return DEFAULT_MIRROR, f"deb {DEFAULT_MIRROR} {SUITE} main\n"


def _unmount_under(root: Path) -> None:
    # debootstrap bind-mounts /dev, /proc, /sys while it runs; if it dies half-way they stay
    # mounted and rmtree would walk into the host's /dev. Unmount deepest first.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m == str(root) or m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)


# --- the three images ----------------------------------------------------------------------------


def build_base(echo: Echo) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed", "run `make setup`")
    mirror, sources = _debian_sources()
    echo(f"[images] building base image {BASE_IMAGE} (debootstrap from {mirror}, a few minutes)...")
    old = _image_id(BASE_IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="podtwin-rootfs-", dir="/var/tmp"))
    try:
        rootfs = tmp / "rootfs"
        # ca-certificates: so apt (and pip later) can use https mirrors from inside the image.
        _stream(["debootstrap", "--variant=minbase", "--include=ca-certificates",
                 SUITE, str(rootfs), mirror], echo)
        # Replace debootstrap's one-line sources.list with the host's Debian entries.
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        deb822 = "URIs:" in sources
        target = "etc/apt/sources.list.d/debian.sources" if deb822 else "etc/apt/sources.list"
        (rootfs / target).write_text(sources)
        for d in ("var/lib/apt/lists", "var/cache/apt/archives"):  # keep the image small
            for p in (rootfs / d).glob("*"):
                if p.is_file():
                    p.unlink()
        echo(f"[images] importing rootfs as {BASE_IMAGE}...")
        tar = f"tar --numeric-owner -C {shlex.quote(str(rootfs))} -c ."
        imp = f"docker import --change 'CMD [\"/bin/bash\"]' - {BASE_IMAGE}"
        _stream(["bash", "-o", "pipefail", "-c", f"{tar} | {imp}"], echo)
        _drop_if_replaced(BASE_IMAGE, old)
    finally:
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def build_podtwin(echo: Echo, digest: str, force: bool, image: str, also: tuple[str, ...] = ()) -> None:
    echo(f"[images] building {image} (apt, pip install of its dependencies, this package's files)...")
    old = _image_id(image)
    with tempfile.TemporaryDirectory(prefix="podtwin-ctx-") as ctx_dir:
        # A small context made of exactly what the image needs (never .venv or .git).
        ctx = Path(ctx_dir)
        for rel, f in package_files().items():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, ctx / rel)
        (ctx / "requirements.txt").write_text(requirements())
        # Trust the same extra CAs as the host (TLS-intercepting proxies on CI / corporate nets).
        (ctx / "local-ca").mkdir()
        for crt in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
            shutil.copy2(crt, ctx / "local-ca" / crt.name)
        cmd = ["docker", "build", "--network", "host", "--label", f"{HASH_LABEL}={digest}"]
        for name in (image, *also):
            cmd += ["-t", name]
        for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):  # follow the host's PyPI mirror
            if os.environ.get(var):
                cmd += ["--build-arg", f"{var}={os.environ[var]}"]
        if force:
            cmd.append("--no-cache")
        _stream([*cmd, str(ctx)], echo, env=_legacy_build_env())
    _drop_if_replaced(image, old)


def build_agent(echo: Echo, digest: str, force: bool, full: str, image: str, also: tuple[str, ...] = ()) -> None:
    echo(f"[images] building {image} from {full}'s files (the agent's small image)...")
    old = _image_id(image)
    with tempfile.TemporaryDirectory(prefix="podtwin-ctx-") as ctx_dir:
        ctx = Path(ctx_dir)
        for rel, f in agent_files().items():
            shutil.copy2(f, ctx / rel)
        cmd = ["docker", "build", "--build-arg", f"FULL={_image_id(full)}", "--label", f"{HASH_LABEL}={digest}"]
        for name in (image, *also):
            cmd += ["-t", name]
        if force:
            cmd.append("--no-cache")
        _stream([*cmd, str(ctx)], echo, env=_legacy_build_env())
    _drop_if_replaced(image, old)


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) segment."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _go() -> str:
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
                                     if Path(p).exists()), None)
    if go is None:
        raise ImageBuildError("no Go toolchain to build the test app's Go tools",
                              "install Go (`apt-get install golang-go`)")
    return go


def _build_go(module: str, out: Path, echo: Echo) -> None:
    """A static Go binary (CGO_ENABLED=0) from the module in ``module``; modules it needs come
    from the Go module proxy (or the module cache), checked against its go.sum."""
    echo(f"[images] compiling {module} (static, CGO_ENABLED=0)...")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    _stream([_go(), "build", "-C", str(REPO / module), "-trimpath", "-ldflags", "-s -w",
             "-o", str(out), "."], echo, env=env)


# What podtwin-test/busybox is built from, so also what its content hash covers.
TEST_APP_SOURCES = ("images/busybox/Dockerfile", "images/testapp/udpsend.go", "images/testapp/go.mod",
                    "images/h2probe/main.go", "images/h2probe/go.mod", "images/h2probe/go.sum")


def test_app_hash() -> str:
    digest = hashlib.sha256()
    for rel in TEST_APP_SOURCES:
        digest.update(rel.encode() + b"\0" + (REPO / rel).read_bytes())
    return digest.hexdigest()


def build_busybox(echo: Echo, force: bool) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists() or not _is_static_elf(busybox.resolve()):
        raise ImageBuildError(f"no static {busybox} on this machine",
                              "install Debian's busybox-static (`make setup` does)")
    echo(f"[images] building {BUSYBOX_IMAGE} (FROM scratch: static busybox, udpsend, h2probe)...")
    old = _image_id(BUSYBOX_IMAGE)
    with tempfile.TemporaryDirectory(prefix="podtwin-ctx-") as ctx_dir:
        ctx = Path(ctx_dir)
        shutil.copy2(REPO / "images/busybox/Dockerfile", ctx / "Dockerfile")
        shutil.copy2(busybox.resolve(), ctx / "busybox")
        _build_go("images/testapp", ctx / "udpsend", echo)
        _build_go("images/h2probe", ctx / "h2probe", echo)
        cmd = ["docker", "build", "-t", BUSYBOX_IMAGE, "--label", f"{HASH_LABEL}={test_app_hash()}",
               *(["--no-cache"] if force else []), str(ctx)]
        _stream(cmd, echo, env=_legacy_build_env())
    _drop_if_replaced(BUSYBOX_IMAGE, old)


def build_images(echo: Echo = print, force: bool = False, tag: str | None = None) -> str:
    """Build the missing images (all of them with force); rebuild the podtwin image if the
    package's files changed. ``tag``: the podtwin image's name (default: the one sessions use).
    Returns that name."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise ImageBuildError("the Docker engine does not answer",
                              "start it (in a checkout: scripts/docker-engine.sh), or set DOCKER_HOST")
    # Image tags are machine-wide: concurrent `make setup`/`make test` runs take turns.
    with open(LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo("[images] another image build is running; waiting for it...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_all(echo, force, tag or PODTWIN_IMAGE)


def _is_checkout() -> bool:
    return (REPO / "pyproject.toml").is_file() and (REPO / "images" / "busybox" / "Dockerfile").is_file()


def _base(echo: Echo, force: bool) -> bool:
    """The base image: kept if present; else pulled when a registry answers; else made with
    debootstrap. Returns whether it is new."""
    if not force and _image_id(BASE_IMAGE) is not None:
        echo(f"[images] {BASE_IMAGE}: present")
        return False
    if not force:
        try:
            pulled = subprocess.run(["docker", "pull", "-q", PYTHON_BASE], capture_output=True, text=True, timeout=300)
            why = (pulled.stderr.strip().splitlines() or ["?"])[-1][:120]
        except subprocess.TimeoutExpired:
            pulled, why = None, "no answer within 300 s"
        if pulled is not None and pulled.returncode == 0:
            _pulled_base(echo)
            return True
        echo(f"[images] base: no registry answers ({why}); making it with debootstrap instead")
    build_base(echo)
    return True


def _pulled_base(echo: Echo) -> None:
    """The pulled Debian, pointed at the host's apt mirror (as the debootstrapped base is), so
    the podtwin image's apt-get reaches what the host reaches."""
    mirror, sources = _debian_sources()
    deb822 = "URIs:" in sources
    target = "/etc/apt/sources.list.d/debian.sources" if deb822 else "/etc/apt/sources.list"
    with tempfile.TemporaryDirectory(prefix="podtwin-base-") as ctx:
        (Path(ctx) / "sources").write_text(sources)
        (Path(ctx) / "Dockerfile").write_text(
            f"FROM {PYTHON_BASE}\nRUN rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*\nCOPY sources {target}\n")
        _stream(["docker", "build", "-q", "-t", BASE_IMAGE, ctx], echo, env=_legacy_build_env())
    echo(f"[images] base: {PYTHON_BASE}, pulled (a registry answers), apt pointed at {mirror}")


def _build_all(echo: Echo, force: bool, image: str) -> str:
    new_base = _base(echo, force)
    digest = source_hash()
    # The default build also carries podtwin:dev (a checkout's habit), and the agent's image the
    # release's name (the agent's in clusters); a --tag build carries its own names only.
    also = (DEV_IMAGE,) if image == PODTWIN_IMAGE else ()
    if new_base or force or _label(image, HASH_LABEL) != digest:
        build_podtwin(echo, digest, force, image, also)
    else:
        echo(f"[images] {image}: up to date ({digest[:12]})")
    # The podtwin image's ID in the agent's hash: a new base (a newer Python or OpenSSL) makes a
    # new podtwin image with the same source digest, and the agent image must follow it.
    agent, agent_digest = agent_image_name(image), agent_hash(f"{digest}:{_image_id(image)}")
    agent_also = (release_image_name(), agent_image_name(DEV_IMAGE)) if image == PODTWIN_IMAGE else ()
    if force or _label(agent, HASH_LABEL) != agent_digest:
        build_agent(echo, agent_digest, force, image, agent, agent_also)
    else:
        echo(f"[images] {agent}: up to date ({agent_digest[:12]})")
    for source, names in ((image, also), (agent, agent_also)):
        for name in names:
            if _image_id(name) != _image_id(source):
                subprocess.run(["docker", "tag", source, name], check=True, capture_output=True)
    if not _is_checkout():
        echo(f"[images] {BUSYBOX_IMAGE}: not built (a checkout's test image)")
    elif force or _label(BUSYBOX_IMAGE, HASH_LABEL) != test_app_hash():
        build_busybox(echo, force)
    else:
        echo(f"[images] {BUSYBOX_IMAGE}: present")
    echo("[images] done")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m podtwin.runner.tools.images",
                                     description="Build the local images podtwin needs.")
    parser.add_argument("--force", action="store_true", help="rebuild every image from scratch")
    parser.add_argument("--tag", help="the podtwin image's name (default: the one sessions use)")
    args = parser.parse_args(argv)
    try:
        build_images(echo=lambda line: print(line, flush=True), force=args.force, tag=args.tag)
    except ImageBuildError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- getting the agent's image to a cluster --------------------------------------------------------

LOADERS = {
    "kind": lambda image, name: ["kind", "load", "docker-image", "--name", name or "kind", image],
    "minikube": lambda image, name: ["minikube", "image", "load", image, *(["-p", name] if name else [])],
    "k3d": lambda image, name: ["k3d", "image", "import", image, *(["-c", name] if name else [])],
    "podtwin-test": lambda image, name: [str(REPO / "integration" / "cluster" / "load.sh"), image],
}


def push_image(ref: str, echo: Echo = print) -> str:
    """Copy the local agent image to a registry as ``ref`` (REGISTRY/REPO, tagged with this
    version unless it names a tag); returns what agent.image should say."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    if not name or "/" not in name or any(c.isspace() for c in ref):
        raise ImageBuildError(f"{ref!r} is not a registry repository",
                              "give REGISTRY/REPO[:TAG], e.g. registry.example.com/team/podtwin-agent")
    target = f"{name}:{tag or release_image_name().rsplit(':', 1)[1]}"
    agent = agent_image_name()
    if _image_id(agent) is None:
        raise ImageBuildError(f"image {agent} is not built", "run `podtwin images build` first")
    subprocess.run(["docker", "tag", agent, target], check=True, capture_output=True)
    echo(f"[images] pushing {target}")
    _stream(["docker", "push", target], echo)
    return target


def load_image(where: str, echo: Echo = print) -> str:
    """Put the agent's image (its release name, which sessions use by default) on a local
    cluster's nodes: ``kind[:NAME]``, ``minikube[:PROFILE]``, ``k3d[:CLUSTER]`` or the project's
    ``podtwin-test`` cluster. Returns the image's name."""
    kind, _, name = where.partition(":")
    if kind not in LOADERS:
        raise ImageBuildError(f"unknown cluster kind {kind!r}", f"use one of {', '.join(LOADERS)} (NAME after ':')")
    image = release_image_name()
    if _image_id(image) is None:
        raise ImageBuildError(f"image {image} is not built", "run `podtwin images build` first")
    cmd = LOADERS[kind](image, name)
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise ImageBuildError(f"`{cmd[0]}` is not installed", f"install {kind}'s CLI, or push to a registry "
                              "with `podtwin images push REGISTRY/REPO`")
    echo(f"[images] loading {image} into {where}")
    _stream(cmd, echo)
    return image
