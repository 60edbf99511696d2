"""Gather the agent's image into a directory: run inside the podtwin image (its venv's Python).

What the agent runs and nothing else: the Python interpreter and its standard library (without
tests, IDLE, Tk, ...), the agent's dependencies with theirs (from the venv's package metadata),
the agent's own package and iptables/ip6tables (what its steal rules need),
plus every shared library those load (ldd) and the dynamic loader's cache. The image is this
directory on an empty base (``FROM scratch``); Debian's package manager and docs stay behind.

``python agent_rootfs.py ROOTFS``
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

# The third-party packages podtwin.agent imports (tests/unit/test_agent_image.py checks the list).
AGENT_REQUIREMENTS = ("asyncssh", "h11", "h2")
VENV_SITE = Path(sysconfig.get_paths()["purelib"])   # run with the venv's Python: its site-packages
SOURCE = Path("/opt/podtwin-src/podtwin")
TOOLS = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore")
# iptables' match and target modules (dlopen'd), in the machine's multiarch directory
XTABLES = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu") / "xtables"
ETC = ("passwd", "group", "nsswitch.conf", "protocols", "services", "ethertypes", "ld.so.conf", "ld.so.conf.d")
# Standard library parts no agent code reaches.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "pydoc_data", "ensurepip", "distutils",
               "venv", "sqlite3", "curses", "dbm", "site-packages", "dist-packages", "sitecustomize.py",
               "turtle.py", "pydoc.py", "doctest.py", "__phello__"}
DYNLOAD_SKIP = re.compile(r"^(_sqlite3|_curses|_curses_panel|readline|_dbm|_gdbm|_tkinter|nis|_lzma|_bz2|"
                          r"_testcapi|_testinternalcapi|_testbuffer|_testimportmultiple|_testmultiphase|_xxtestfuzz|"
                          r"xxlimited|xxlimited_35|_ctypes_test|audioop)\.")


def copy_path(src: Path, root: Path) -> None:
    """``src`` at the same path under root, following its chain of symlinks (each kept as a
    symlink). Directories on the way are taken by their real path (Debian's /lib is /usr/lib)."""
    src = Path(src)
    for _ in range(20):
        src = Path(os.path.realpath(src.parent)) / src.name
        dst = root / str(src).lstrip("/")
        if not os.path.lexists(dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst)
        if not src.is_symlink():
            return
        target = os.readlink(src)
        src = Path(target) if target.startswith("/") else src.parent / target
    raise RuntimeError(f"symlink loop at {src}")


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def libraries(path: Path) -> set[str]:
    """The shared libraries (and loader) ``path`` loads, by ldd."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            found.add(m.group(1))
    return found


def stdlib(root: Path) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])   # /usr/lib/python3.11
    for entry in sorted(lib.iterdir()):
        if entry.name in STDLIB_SKIP:
            continue
        if entry.name == "lib-dynload":
            for mod in sorted(entry.iterdir()):
                if not DYNLOAD_SKIP.match(mod.name):
                    copy_path(mod, root)
            continue
        copy_path(entry, root)


def requirements_closure(names) -> list[metadata.Distribution]:
    todo, done = list(names), {}
    while todo:
        requirement = todo.pop()
        name = re.split(r"[\s<>=!~;\[]", requirement)[0].lower().replace("_", "-")
        if not name or name in done:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if ";" in requirement:   # a marker that does not apply here (another Python, platform)
                continue
            raise
        done[name] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return list(done.values())


def main(root: Path) -> None:
    root.mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if os.path.islink(f"/{link}"):   # Debian's merged /usr
            os.symlink(target, root / link)
    python = Path(os.path.realpath(sys.base_prefix + "/bin/python3"))   # /usr/bin/python3.11
    copy_path(python, root)
    for name in ("python3", "python"):
        os.makedirs(root / "usr/local/bin", exist_ok=True)
        os.symlink(str(python), root / "usr/local/bin" / name)
    stdlib(root)
    site = root / "opt/podtwin/site-packages"
    for dist in requirements_closure(AGENT_REQUIREMENTS):
        for f in dist.files or []:
            src = Path(dist.locate_file(f)).resolve()
            if src.is_relative_to(VENV_SITE) and "__pycache__" not in src.parts and src.is_file():
                dst = site / src.relative_to(VENV_SITE)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    shutil.copytree(SOURCE / "agent", root / "opt/podtwin-src/podtwin/agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for tool in TOOLS:
        copy_path(Path(shutil.which(tool, path="/usr/sbin:/usr/bin")), root)
    copy_path(XTABLES, root)
    for name in ETC:
        if os.path.lexists(f"/etc/{name}"):
            copy_path(Path(f"/etc/{name}"), root)
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    # Every ELF file now in the tree, and what each loads.
    needed: set[str] = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink() and is_elf(path):
                needed |= libraries(path)
    for lib in sorted(needed):
        copy_path(Path(lib), root)
    subprocess.run(["ldconfig", "-r", str(root)], check=True)
    # Compiled once here (each agent starts in a fresh container), named by their paths in the
    # image; the standard library comes compiled from Debian's package.
    subprocess.run([str(python), "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", str(root / "opt")],
                   check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
