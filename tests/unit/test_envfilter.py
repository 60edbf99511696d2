"""Environment layering: include/exclude < env_file < unset < override < -e."""
from __future__ import annotations

from pathlib import Path

import pytest

from podtwin.runner.config.models import EnvConfig
from podtwin.runner.env import NEVER_COPIED, apply_env, matches_any, read_env_file
from podtwin.runner.errors import ConfigError

REMOTE = {
    "DB_HOST": "db.prod",
    "DB_PASSWORD": "s3cret",
    "MY_APP_MODE": "prod",
    "REGION": "eu",
    "PATH": "/remote/bin",
    "HOME": "/root",
    "HOSTNAME": "api-5d9f",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
}


def env(**kw: object) -> EnvConfig:
    return EnvConfig.model_validate(kw)


def test_default_copies_everything_but_image_and_host_variables() -> None:
    out = apply_env(REMOTE, env(), {})
    assert out == {k: v for k, v in REMOTE.items() if k not in NEVER_COPIED}
    assert "KUBERNETES_SERVICE_HOST" in out


def test_include_keeps_only_matches_with_wildcards() -> None:
    out = apply_env(REMOTE, env(include="DB_HOST;MY_APP_*"), {})
    assert out == {"DB_HOST": "db.prod", "MY_APP_MODE": "prod"}


def test_exclude_drops_matches() -> None:
    out = apply_env(REMOTE, env(exclude=["DB_PASS*", "REGION"]), {})
    assert "DB_PASSWORD" not in out and "REGION" not in out and out["DB_HOST"] == "db.prod"


def test_patterns_are_case_sensitive() -> None:
    assert apply_env(REMOTE, env(include="db_host"), {}) == {}


def test_question_mark_and_literal_brackets() -> None:
    assert matches_any("REGION", ["REGIO?"])
    assert not matches_any("REGION", ["REGI?"])
    assert matches_any("A[1]", ["A[1]"]) and not matches_any("A1", ["A[1]"])


def test_never_copied_only_by_exact_include() -> None:
    assert "PATH" not in apply_env(REMOTE, env(include="P*"), {})
    assert apply_env(REMOTE, env(include="PATH;HOME"), {}) == {"PATH": "/remote/bin", "HOME": "/root"}


def test_disabled_env_copies_nothing_but_keeps_explicit_values() -> None:
    out = apply_env(REMOTE, env(enabled=False, override={"A": "1"}), {"B": "2"})
    assert out == {"A": "1", "B": "2"}


def test_precedence_env_file_unset_override_cli(tmp_path: Path) -> None:
    env_file = tmp_path / "dev.env"
    env_file.write_text("# local values\nREGION=us\nexport FROM_FILE='quoted value'\nDB_HOST=file\n\n")
    cfg = env(env_file=env_file, unset=["region", "MY_APP_MODE"], override={"DB_HOST": "override", "NEW": "o"})
    out = apply_env(REMOTE, cfg, {"NEW": "cli"})
    assert "REGION" not in out  # unset beats the remote value and the env_file, case-insensitively
    assert "MY_APP_MODE" not in out
    assert out["FROM_FILE"] == "quoted value"
    assert out["DB_HOST"] == "override"  # override beats env_file
    assert out["NEW"] == "cli"  # -e beats override
    assert out["DB_PASSWORD"] == "s3cret"


def test_env_file_beats_remote(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("REGION=us\n")
    assert apply_env(REMOTE, env(env_file=tmp_path / ".env"), {})["REGION"] == "us"


def test_override_and_cli_beat_unset() -> None:
    out = apply_env(REMOTE, env(unset=["REGION", "X"], override={"REGION": "o"}), {"X": "cli"})
    assert out["REGION"] == "o" and out["X"] == "cli"


def test_pre_read_env_file_values_are_used() -> None:
    out = apply_env({}, env(env_file="/does/not/exist"), {}, env_file_values={"A": "1"})
    assert out == {"A": "1"}


def test_bad_env_file_lines_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\nnot a pair\n")
    with pytest.raises(ConfigError, match=r"bad.env:2"):
        read_env_file(bad)


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read env_file"):
        apply_env({}, env(env_file=tmp_path / "missing.env"), {})
