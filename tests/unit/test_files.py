"""The agent's file server without SSH: the path rules, the confined lookups (openat2 and the
userspace fallback, each test run with both), and the SFTP server's allowlist and read-only rules
called directly. Over a real link: test_agent_link.py."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import asyncssh
import pytest

from podtwin.agent.files.paths import MAX_SYMLINKS, Export, ExportMap, Walk, normalise
from podtwin.agent.files.root import TargetRoot, have_openat2
from podtwin.agent.files.sftp import TargetSFTPServer
from podtwin.agent.link import wire

RESOLVERS = [pytest.param(False, id="openat2",
                          marks=pytest.mark.skipif(not have_openat2(), reason="kernel without openat2")),
             pytest.param(True, id="userspace")]


# -- pure path logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    (b"", b"/"), (b".", b"/"), (b"/", b"/"), (b"//etc//config/", b"/etc/config"),
    (b"etc/config", b"/etc/config"), (b"/../../etc/./x/../config", b"/etc/config"), (b"/..", b"/"),
])
def test_normalise_folds_and_clamps_lexically(given, expected):
    assert normalise(given) == expected


def test_normalise_refuses_nul():
    with pytest.raises(OSError):
        normalise(b"/etc/\0x")


def test_export_map_places_in_the_nearest_export_and_shows_the_way():
    exports = ExportMap([Export(b"/data", False), Export(b"/data/uploads", True), Export(b"/etc/config", False)])
    assert exports.place(b"/data/uploads/a").export.path == b"/data/uploads"
    assert exports.place(b"/data/uploads/a").below == b"a"
    assert exports.place(b"/data/x").export == Export(b"/data", False)
    assert exports.place(b"/data").below == b""
    assert exports.place(b"/database") is None        # a prefix of the name is not the directory
    assert exports.place(b"/etc/passwd") is None
    assert exports.way_to_exports(b"/") == [b"data", b"etc"]
    assert exports.way_to_exports(b"/etc") == [b"config"]
    assert exports.way_to_exports(b"/etc/config") is None   # an export, not the way to one
    assert exports.way_to_exports(b"/var") is None


def test_walk_splices_links_and_counts_them():
    walk = Walk(b"/a/./b")
    assert walk.next() == b"a"
    assert not walk.last
    assert walk.follow(b"x/y") is False          # relative: spliced in where the link was
    assert [walk.next(), walk.next(), walk.next()] == [b"x", b"y", b"b"]
    assert walk.last and walk.next() is None
    walk = Walk(b"l")
    walk.next()
    assert walk.follow(b"/etc/passwd") is True   # absolute: restart at the root
    for _ in range(MAX_SYMLINKS - 1):
        walk.follow(b"l")
    with pytest.raises(OSError) as err:
        walk.follow(b"l")
    assert err.value.errno == errno.ELOOP


def test_fs_exports_round_trip_and_validation():
    exports = wire.FsExports((wire.FsExport("/etc/config"), wire.FsExport("/data", True, True),
                              wire.FsExport("/app/config", source="/srv/config")),
                             not_found=(r"\.kube",), read_write=("^/data/up/",), read_only=("^/data/ro",))
    assert wire.FsExports.decode(exports.encode()) == exports

    def doc(*exports, **lists):
        return json.dumps({"exports": list(exports), "not_found": [], "read_write": [], "read_only": [], **lists})

    def export(path="/x", write=False, writable=False, source=None, **more):
        return {"path": path, "write": write, "writable": writable, "source": source, **more}

    for bad in [None, "not json", "{}", "[]", doc(), json.dumps({"exports": [export()]}),
                doc({"path": "/x"}), doc(export(write=1)), doc(export("x")), doc(export("/")),
                doc(export("/a/../b")), doc(export("/a/")), doc(export(extra=1)),
                doc(export(source="/")), doc(export(source="rel")), doc(export(write=True)),
                doc(export("/a"), export("/a", True, True)), doc(export(), not_found="x"),
                doc(export(), read_only=[1])]:
        with pytest.raises(wire.ProtocolError):
            wire.FsExports.decode(bad)


# -- confined lookups ------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root`` (the target's root) beside ``outside`` (the agent's files, never to be served)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("target passwd")
    outside.mkdir()
    (outside / "secret").write_text("agent secret")
    (root / "abs").symlink_to("/etc/passwd")                  # absolute: the target's file
    (root / "to_outside").symlink_to(outside / "secret")      # absolute, to a path only outside
    (root / "up").symlink_to("../../../../etc/passwd")        # relative, climbing past the root
    (root / "chain1").symlink_to("chain2")
    (root / "chain2").symlink_to("/etc/../chain3")
    (root / "chain3").symlink_to("etc/passwd")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("/loop1")
    (root / "outdir").symlink_to(outside)                     # a directory outside
    (root / "secret").symlink_to("../outside/secret")
    return tmp_path


def read(root: TargetRoot, path: bytes) -> str:
    fd = root.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1000).decode()
    finally:
        os.close(fd)


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_links_resolve_inside_the_root(tree, userspace):
    with TargetRoot.at(tree / "root", userspace) as root:
        assert read(root, b"/abs") == "target passwd"
        assert read(root, b"/up") == "target passwd"
        assert read(root, b"../../../etc/passwd") == "target passwd"
        assert read(root, b"/chain1") == "target passwd"
        assert read(root, b"/etc/../../../abs") == "target passwd"
        assert root.stat(b"/abs").st_size == len("target passwd")
        assert stat.S_ISLNK(root.lstat(b"/abs").st_mode)
        assert root.readlink(b"/abs") == b"/etc/passwd"      # the text, unresolved
        assert stat.S_ISDIR(root.lstat(b"/").st_mode)


@pytest.mark.parametrize("userspace", RESOLVERS)
@pytest.mark.parametrize("path", [b"/to_outside", b"/outdir/secret", b"/secret", b"/../outside/secret"])
def test_a_file_outside_the_root_is_never_served(tree, userspace, path):
    with TargetRoot.at(tree / "root", userspace) as root:
        with pytest.raises(FileNotFoundError):
            read(root, path)
        with pytest.raises(FileNotFoundError):
            root.stat(path)


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_a_symlink_loop_is_eloop(tree, userspace):
    with TargetRoot.at(tree / "root", userspace) as root:
        with pytest.raises(OSError) as err:
            read(root, b"/loop1")
        assert err.value.errno == errno.ELOOP


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_changes_through_links_stay_inside(tree, userspace):
    with TargetRoot.at(tree / "root", userspace) as root:
        root.mkdir(b"/etc/made", 0o755)
        with pytest.raises(FileNotFoundError):
            root.mkdir(b"/outdir/made", 0o755)     # its parent resolves to root/<outside's path>
        assert not (tree / "outside" / "made").exists()
        os.close(root.open(b"/abs_new", os.O_WRONLY | os.O_CREAT, 0o600))
        assert (tree / "root" / "abs_new").exists()
        root.rename(b"/abs_new", b"/etc/renamed", replace=False)
        with pytest.raises(FileExistsError):
            root.rename(b"/etc/renamed", b"/etc/passwd", replace=False)
        root.set_attrs(b"/etc/renamed", size=3, mode=0o640)
        assert (tree / "root" / "etc" / "renamed").stat().st_mode & 0o777 == 0o640
        root.unlink(b"/secret")                 # the link itself, not what it points to
        assert (tree / "outside" / "secret").exists()
        root.rmdir(b"/etc/made")
        with root.subroot(b"/etc") as etc:
            assert read(etc, b"/passwd") == "target passwd"
            assert {name for name, _ in etc.listdir(b"/")} == {b"passwd", b"renamed"}


# -- the SFTP server's rules, called directly --------------------------------------------------
@pytest.fixture
def target(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc" / "config").mkdir(parents=True)
    (root / "etc" / "config" / "app.yaml").write_text("key: value")
    (root / "etc" / "config" / "..data").symlink_to("/etc/shadow")   # absolute: out of the export
    (root / "etc" / "config" / "rel").symlink_to("app.yaml")
    (root / "etc" / "shadow").write_text("not exported")
    (root / "etc" / "hostname").write_text("pod-1")
    (root / "data").mkdir()
    (root / "data" / "f").write_text("data")
    return root


def server(root: Path, userspace: bool, *exports: tuple[str, bool], **lists) -> TargetSFTPServer:
    fs = wire.FsExports(tuple(wire.FsExport(path, write, write) for path, write in exports), **lists)
    return TargetSFTPServer(None, TargetRoot.at(root, userspace), fs)


async def read_all(srv: TargetSFTPServer, path: bytes) -> bytes:
    handle = await srv.open(path, asyncssh.FXF_READ, asyncssh.SFTPAttrs())
    try:
        return await srv.read(handle, 0, 1000)
    finally:
        srv.close(handle)


async def names(srv: TargetSFTPServer, path: bytes) -> list[bytes]:
    return [name.filename async for name in srv.scandir(path)]


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_server_serves_only_the_exports(target, userspace):
    srv = server(target, userspace, ("/etc/config", False), ("/etc/hostname", False))

    async def scenario():
        assert await read_all(srv, b"/etc/config/app.yaml") == b"key: value"
        assert await read_all(srv, b"/etc/config/rel") == b"key: value"
        assert await read_all(srv, b"/etc/hostname") == b"pod-1"          # a file export
        assert sorted(await names(srv, b"/")) == [b".", b"..", b"etc"]
        assert sorted(await names(srv, b"/etc")) == [b".", b"..", b"config", b"hostname"]
        assert sorted(await names(srv, b"/etc/config")) == [b".", b"..", b"..data", b"app.yaml", b"rel"]
        way = await srv.stat(b"/etc")
        assert way.permissions == stat.S_IFDIR | 0o555
        for outside in [b"/etc/shadow", b"/etc/config/../shadow", b"/data/f", b"/etc/hostname/x"]:
            with pytest.raises((asyncssh.SFTPNoSuchFile, NotADirectoryError)):
                await read_all(srv, outside)
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await names(srv, b"/data")
        # the link leaves the export: resolved beneath it (ENOENT), never the target's /etc/shadow
        with pytest.raises(FileNotFoundError):
            await read_all(srv, b"/etc/config/..data")
        assert await srv.readlink(b"/etc/config/..data") == b"/etc/shadow"
        assert srv.realpath(b"/etc/config/../config/./app.yaml") == b"/etc/config/app.yaml"
        srv.exit()
    asyncio.run(scenario())


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_server_refuses_changes_to_read_only_exports(target, userspace):
    srv = server(target, userspace, ("/etc/config", False), ("/data", True))

    async def scenario():
        attrs = asyncssh.SFTPAttrs()
        refusals = [
            srv.open(b"/etc/config/app.yaml", asyncssh.FXF_WRITE, attrs),
            srv.open(b"/etc/config/new", asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, attrs),
            srv.setstat(b"/etc/config/app.yaml", asyncssh.SFTPAttrs(permissions=0o777)),
            srv.mkdir(b"/etc/config/d", attrs), srv.remove(b"/etc/config/app.yaml"),
            srv.rmdir(b"/etc/config"), srv.rename(b"/etc/config/app.yaml", b"/etc/config/b"),
            srv.rmdir(b"/etc"),                              # on the way to the exports
            srv.remove(b"/data"),                            # an export itself
        ]
        for refused in refusals:
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await refused
        handle = await srv.open(b"/etc/config/app.yaml", asyncssh.FXF_READ, attrs)
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await srv.fsetstat(handle, asyncssh.SFTPAttrs(size=0))
        srv.close(handle)
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            srv.symlink(b"/etc/shadow", b"/data/l")          # what is not overridden is refused
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await srv.mkdir(b"/var/x", attrs)                # outside: not there at all

        # the writable export takes changes
        handle = await srv.open(b"/data/new", asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, attrs)
        assert await srv.write(handle, 0, b"written") == 7
        srv.close(handle)
        await srv.mkdir(b"/data/d", attrs)
        await srv.rename(b"/data/new", b"/data/d/moved")
        await srv.setstat(b"/data/d/moved", asyncssh.SFTPAttrs(permissions=0o600))
        assert (target / "data" / "d" / "moved").read_text() == "written"
        assert (target / "data" / "d" / "moved").stat().st_mode & 0o777 == 0o600
        await srv.remove(b"/data/d/moved")
        await srv.rmdir(b"/data/d")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await srv.rename(b"/data/f", b"/etc/config/f")   # into a read-only export
        srv.exit()
    asyncio.run(scenario())


# -- feature.fs's lists, per file ---------------------------------------------------------------
@pytest.mark.parametrize("userspace", RESOLVERS)
def test_lists_decide_per_file_in_mirrords_order(target, userspace):
    """not_found hides (lookups, opens and listings), read_only refuses writes in a writable
    export, read_write lifts a path in an export that takes writes, never in one that does not."""
    fs = wire.FsExports((wire.FsExport("/etc/config"), wire.FsExport("/data", False, True)),
                        not_found=(r"APP\.YAML$",), read_write=(r"^/data/d(/|$)", r"^/etc/config/"),
                        read_only=(r"^/data/",))
    srv = TargetSFTPServer(None, TargetRoot.at(target, userspace), fs)
    (target / "data" / "d").mkdir()

    async def scenario():
        attrs = asyncssh.SFTPAttrs()
        for hidden in (srv.stat(b"/etc/config/app.yaml"), read_all(srv, b"/etc/config/app.yaml")):
            with pytest.raises(asyncssh.SFTPNoSuchFile):     # case-insensitive, as in mirrord
                await hidden
        assert b"app.yaml" not in await names(srv, b"/etc/config")
        assert await read_all(srv, b"/etc/config/rel") == b"key: value"   # a link's own name decides
        with pytest.raises(asyncssh.SFTPPermissionDenied):   # read_write cannot lift a read-only export
            await srv.open(b"/etc/config/new", asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, attrs)
        with pytest.raises(asyncssh.SFTPPermissionDenied):   # read_only beats the export's default
            await srv.open(b"/data/f", asyncssh.FXF_WRITE, attrs)
        handle = await srv.open(b"/data/d/new", asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, attrs)
        srv.close(handle)                                     # read_write comes before read_only
        assert (target / "data" / "d" / "new").exists()
        srv.exit()
    asyncio.run(scenario())


@pytest.mark.parametrize("userspace", RESOLVERS)
def test_a_mapped_export_serves_its_source(target, userspace):
    fs = wire.FsExports((wire.FsExport("/app/config", source="/etc/config"),), not_found=("^/etc/config/rel$",))
    srv = TargetSFTPServer(None, TargetRoot.at(target, userspace), fs)

    async def scenario():
        assert await read_all(srv, b"/app/config/app.yaml") == b"key: value"
        assert sorted(await names(srv, b"/app/config")) == [b".", b"..", b"..data", b"app.yaml"]  # rules: target names
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await read_all(srv, b"/etc/config/app.yaml")      # the source itself is not exported
        srv.exit()
    asyncio.run(scenario())


def test_bad_list_regex_is_a_protocol_error(target):
    with pytest.raises(wire.ProtocolError, match="not_found"):
        TargetSFTPServer(None, TargetRoot.at(target, False), wire.FsExports((wire.FsExport("/x"),), not_found=("(",)))


def test_local_file_systems_are_told_apart(tmp_path):
    """Calls on a local file system run on the agent's event loop; anything else in a thread."""
    from podtwin.agent.files.root import is_local
    for path, local in ((tmp_path, True), ("/proc", False)):
        fd = os.open(path, os.O_PATH)
        try:
            assert is_local(fd) is local, path
        finally:
            os.close(fd)



def test_opening_a_fifo_never_blocks_the_agents_loop(target):
    """A FIFO in an export (a log pipe shared by two containers) blocks its opener until a writer
    comes: only that request waits, every other call on the link goes on."""
    os.mkfifo(target / "etc" / "config" / "pipe")
    srv = server(target, False, ("/etc/config", False))

    async def scenario():
        opening = asyncio.ensure_future(srv.open(b"/etc/config/pipe", asyncssh.FXF_READ, asyncssh.SFTPAttrs()))
        await asyncio.sleep(0.2)
        assert not opening.done()
        assert await read_all(srv, b"/etc/config/app.yaml") == b"key: value"   # the loop still serves
        writer = os.open(target / "etc" / "config" / "pipe", os.O_WRONLY)    # the other end comes
        try:
            srv.close(await asyncio.wait_for(opening, 5))
        finally:
            os.close(writer)
        srv.exit()
    asyncio.run(scenario())



@pytest.mark.parametrize("userspace", RESOLVERS)
def test_an_export_directory_swapped_in_with_mv_is_served_anew(target, userspace):
    """The export's root is opened once per channel; a target that replaces the directory (write a
    new one, mv it into place, remove the old) is served from the new one, not the removed one."""
    srv = server(target, userspace, ("/etc/config", False))

    async def scenario():
        assert await read_all(srv, b"/etc/config/app.yaml") == b"key: value"
        new = target / "etc" / "config.new"
        new.mkdir()
        (new / "app.yaml").write_text("key: new")
        (target / "etc" / "config").rename(target / "etc" / "config.old")
        new.rename(target / "etc" / "config")
        shutil.rmtree(target / "etc" / "config.old")
        assert await read_all(srv, b"/etc/config/app.yaml") == b"key: new"
        srv.exit()
    asyncio.run(scenario())
