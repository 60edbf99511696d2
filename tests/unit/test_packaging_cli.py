"""The packaged tool's habits (issue #15): docs/cli.md is the commands' own help; the version
says the package, the image and Python; completion scripts come from click; every command's
help shows an example."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

from podtwin.runner.cli import main
from podtwin.runner.cli_doc import _walk, render

REPO = Path(__file__).resolve().parents[2]


def test_docs_cli_md_is_the_commands_own_help():
    assert (REPO / "docs" / "cli.md").read_text() == render(), "run `make docs`"


def test_every_command_shows_an_example():
    missing = [name for name, text in _walk(main, ["podtwin"], None) if "Example:" not in text]
    assert not missing, missing


def test_version_names_package_image_and_python():
    out = CliRunner().invoke(main, ["--version"]).output
    assert out.startswith("podtwin 0.") and "images: podtwin:" in out and "podtwin-agent:" in out and f"Python {sys.version.split()[0]}" in out


def test_completion_scripts():
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef podtwin"), ("fish", "complete --no-files")):
        result = CliRunner().invoke(main, ["completion", shell])
        assert result.exit_code == 0 and marker in result.output and "_PODTWIN_COMPLETE" in result.output, shell
    assert CliRunner().invoke(main, ["completion", "tcsh"]).exit_code != 0


def test_the_wheel_carries_everything_the_image_build_needs(tmp_path):
    """Built offline from this tree (as `pip wheel .` would, without fetching build tools): every
    file `podtwin images build` puts in the image's context is in the wheel at the same place."""
    import subprocess
    import zipfile

    from podtwin.runner.tools.images import agent_files, package_files

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("podtwin-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {"podtwin/images/Dockerfile" if rel == "Dockerfile" else rel for rel in package_files()}
    wanted |= {f"podtwin/images/{f.name}" for f in agent_files().values()}
    assert wanted <= names, sorted(wanted - names)
    assert any(n.startswith("podtwin/runner/profiles/") for n in names)


def test_docker_run_flags_translate_to_container_run():
    from podtwin.runner.cli import _docker_run_args
    assert _docker_run_args(["-e", "A=1", "-eB=2", "-it", "--rm", "-p8080:80", "--name=x", "--cap-add", "NET_ADMIN",
                             "--cpus=1", "-m", "512m", "img:1", "sh", "-c", "echo -e"]) == [
        "-e", "A=1", "-eB=2", "-it", "--rm", "-p8080:80", "--name=x", "--docker-arg=--cap-add",
        "--docker-arg=NET_ADMIN", "--docker-arg=--cpus=1", "--docker-arg=-m", "--docker-arg=512m",
        "--", "img:1", "sh", "-c", "echo -e"]
    assert _docker_run_args(["--privileged", "img"]) == ["--docker-arg=--privileged", "--", "img"]
