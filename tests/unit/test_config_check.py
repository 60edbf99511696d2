"""`podtwin config check`: what a session would load, printed; a bad file is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path


def check(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "mirrord.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "podtwin.runner.cli", "config", "check", "-f", str(path), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)


def test_prints_the_effective_config_and_names_ignored_keys(tmp_path):
    result = check(tmp_path, {"target": "deploy/api", "feature": {"hostname": True,
                                                                   "network": {"incoming": "steal"}}})
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["target"]["path"] == "deployment/api"   # mirrord's canonical form
    assert effective["feature"]["network"]["incoming"]["mode"] == "steal"
    assert "feature.hostname is not supported yet" in result.stderr


def test_refuses_what_a_session_would_refuse_in_one_line(tmp_path):
    result = check(tmp_path, {"feature": {"network": {"incoming": {"mode": "mirror",
                                                                   "http_filter": {"header_filter": "x"}}}}})
    assert result.returncode == 125
    assert result.stderr.strip().splitlines() == [
        "podtwin: feature.network.incoming.http_filter works with mode steal only — set "
        "feature.network.incoming.mode to steal, or remove the filter"]
    bad_args = check(tmp_path, {"container": {"cli_extra_args": ["--network", "host"]}})
    assert bad_args.returncode == 125 and "--network is not allowed" in bad_args.stderr
    bad_target = check(tmp_path, {}, "--target", "banana/x")
    assert bad_target.returncode == 125 and "banana/x" in bad_target.stderr
