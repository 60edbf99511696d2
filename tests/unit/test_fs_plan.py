"""feature.fs's keys applied to a target's mounts (runner/sidecar/fs_plan.py): what is mounted,
and what is said once where podtwin's grain (a directory) is coarser than mirrord's (a file)."""
from __future__ import annotations

import pytest

from podtwin.runner.config.loader import load_config
from podtwin.runner.config.models import FsConfig
from podtwin.runner.errors import ConfigError
from podtwin.runner.sidecar.fs_plan import Export, literal_path, map_path, plan_files, python_template

MOUNTS = (("/etc/config", False), ("/data", True), ("/var/run/secrets/kubernetes.io/serviceaccount", False))


@pytest.mark.parametrize("pattern,path", [
    (r"^/app/config/.*", "/app/config"), (r"^/srv/app\.yaml$", "/srv/app.yaml"), (r"^/data/cache-.*", "/data"),
    (r"^/etc/config(/|$)", "/etc/config"), (r"/app/config", "/app/config"), (r"^/app/configs?/x", "/app"),
    (r"^/home/user/(.*)", "/home/user"), (r"^/a/b/", "/a/b"), (r".*\.json$", None), (r"^/.*", None),
    (r"^/\w+/x", None), (r"config/app", None), (r"^/a$", "/a"), (r"^/opt/app(/.*)?$", "/opt/app"),
    (r"^/app/config/?$", "/app/config"), (r"^/app/config/*", "/app/config"), (r"^/app/config.json$", "/app/config.json"),
    (r"^/app/.*", "/app"),
])
def test_literal_path(pattern, path):
    assert literal_path(pattern) == path


def test_mirrord_replacements_in_python():
    assert python_template("/app/$1/${name}/$$/$x") == r"/app/\g<1>/\g<name>/$/\g<x>"
    assert map_path(r"^/home/user/(.*)", "/app/$1", "/home/user") == "/app"
    assert map_path(r"^/config(?P<rest>.*)", "/etc/real${rest}", "/config") == "/etc/real"
    assert map_path(r"^/other", "/x", "/config") is None


def fs(**keys) -> FsConfig:
    return FsConfig.model_validate(keys)


def test_read_mode_mounts_every_volume_read_only():
    plan = plan_files(fs(), MOUNTS)
    assert plan.exports == [Export("/data"), Export("/etc/config"),
                            Export("/var/run/secrets/kubernetes.io/serviceaccount")]
    assert plan.notices == []


def test_write_mode_writes_where_the_target_does():
    plan = plan_files(fs(mode="write"), MOUNTS)
    assert Export("/data", write=True, writable=True) in plan.exports
    assert Export("/etc/config") in plan.exports


def test_read_write_regex_makes_its_mount_writable_but_not_the_default():
    plan = plan_files(fs(read_write=[r"^/data/uploads/"]), MOUNTS)
    assert Export("/data", write=False, writable=True) in plan.exports   # per file, in the agent
    assert Export("/etc/config") in plan.exports                        # read-only in the target


def test_literal_regexes_outside_the_mounts_bring_their_paths():
    plan = plan_files(fs(read_only=[r"^/app/config/.*", r"^/etc/config/app\.yaml$"],
                         read_write=[r"^/srv/state(/|$)"]), MOUNTS)
    assert Export("/app/config") in plan.exports
    assert Export("/srv/state", write=True, writable=True) in plan.exports
    assert len(plan.exports) == 5 and plan.notices == []   # /etc/config/app.yaml: inside a mount already


def test_system_directories_and_regexes_naming_no_path_are_said():
    plan = plan_files(fs(read_only=[r"^/etc/.*", r".*\.json$"]), MOUNTS)
    assert [e.path for e in plan.exports] == [p for p, _ in sorted(MOUNTS)]
    assert len(plan.notices) == 2
    assert "names /etc, which podtwin does not mount whole" in plan.notices[0]
    assert r"'.*\\.json$' names no directory" in plan.notices[1] and "/etc/config" in plan.notices[1]


def test_local_and_not_found_drop_whole_mounts_or_say_their_grain():
    plan = plan_files(fs(local=[r"^/etc/config$", r"\.py$"], not_found=[r"^/data(/|$)", r"\.kube"]), MOUNTS)
    assert [e.path for e in plan.exports] == ["/var/run/secrets/kubernetes.io/serviceaccount"]
    text = "\n".join(plan.notices)
    assert "/etc/config stays the image's own (feature.fs.local '^/etc/config$')" in text
    assert "/data is not mounted (feature.fs.not_found" in text
    assert r"feature.fs.local '\\.py$' applies per mount" in text


def test_localwithoverrides_mounts_only_what_is_named_and_local_mounts_nothing():
    plan = plan_files(fs(mode="localwithoverrides", read_only=[r"^/etc/config/"]), MOUNTS)
    assert plan.exports == [Export("/etc/config")]
    plan = plan_files(fs(mode="local", read_only=[r"^/etc/config/"]), MOUNTS)
    assert plan.exports == [] and "feature.fs.read_only has nothing to apply to" in plan.notices[0]


def test_mapping_mounts_the_targets_replacement_directory():
    plan = plan_files(fs(mapping={r"^/app/config/(.*)": "/etc/config/$1", r".*\.json": "/x"}), MOUNTS)
    assert Export("/app/config", source="/etc/config") in plan.exports
    assert any("podtwin maps whole directories" in n for n in plan.notices)
    assert any("/app/config shows the target's /etc/config" in n for n in plan.notices)


def test_rust_named_groups_are_accepted_and_bad_regexes_refused_at_load(tmp_path):
    path = tmp_path / "mirrord.json"
    path.write_text('{"feature": {"fs": {"mode": "read", "mapping": {"^/a/(?<rest>.*)": "/b/${rest}"}}}}')
    cfg, _ = load_config(path, None, tmp_path)
    assert list(cfg.feature.fs.mapping) == ["^/a/(?P<rest>.*)"]
    path.write_text('{"feature": {"fs": {"not_found": ["("]}}}')
    with pytest.raises(ConfigError, match="not_found"):
        load_config(path, None, tmp_path)


class _Engine:
    def __init__(self, fuse, propagation):
        self.answer = (fuse, propagation)

    def probe_files(self, image):
        return self.answer


def test_doctor_names_what_the_files_need_and_the_way_out():
    from podtwin.runner.tools.doctor import files_checks
    good = files_checks(_Engine(None, None), "podtwin:dev")
    assert all(c.ok for c in good)
    bad = files_checks(_Engine("No such device", "a mount made in one container does not reach another"), "x")
    assert [c.passed for c in bad] == [False, False]
    assert "FAIL  /dev/fuse not usable in a container (No such device) — load the fuse module" in bad[0].line()
    assert "--fs local" in bad[0].line() and "--fs local" in bad[1].line()


def test_coarser_mounts_and_bad_replacements_are_said():
    plan = plan_files(fs(read_only=[r"^/data/cache-.*", r"^/srv/app/"], mapping={r"^/app/config": "/srv/$1"}), ())
    assert plan.exports == [Export("/data"), Export("/srv/app")]
    text = "\n".join(plan.notices)
    assert "podtwin mounts /data whole" in text and "/srv/app whole" not in text
    assert "feature.fs.mapping '^/app/config'" in text and "not applied" in text
