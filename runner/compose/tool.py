"""Docker Compose itself: finding it as docker does, and asking it to resolve a project.

podtwin re-implements nothing of compose: ``docker compose config`` is the parser (its YAML, which
keeps a service's ``x-*`` keys; the JSON form drops them), and the generated project is run by
the same compose binary.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from podtwin.runner.errors import ConfigError, DockerUnavailable

INSTALL_HINT = ("install Docker Compose v2 (the `docker compose` plugin: Debian/Ubuntu's docker-compose-plugin or "
                "docker-compose-v2 package; `make setup` in a podtwin checkout builds one)")


@dataclass(frozen=True)
class Compose:
    """A compose v2 command line: ``docker compose`` (the plugin) or a v2 ``docker-compose``."""

    argv: tuple[str, ...]
    version: str


def find_compose() -> Compose:
    """``docker compose`` (the CLI plugin, found by docker itself), else ``docker-compose`` if it
    is v2; a one-line error naming what to install otherwise."""
    found: list[str] = []
    for argv in (("docker", "compose"), ("docker-compose",)):
        if shutil.which(argv[0]) is None:
            continue
        try:
            done = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = done.stdout.strip().removeprefix("v")
        if done.returncode != 0 or not version:
            continue
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 2:
            return Compose(argv, version)
        found.append(f"{' '.join(argv)} {version}")
    if found:
        raise DockerUnavailable(f"podtwin compose needs Docker Compose v2; found only {', '.join(found)}", INSTALL_HINT)
    raise DockerUnavailable("Docker Compose v2 was not found (neither `docker compose` nor `docker-compose`)",
                            INSTALL_HINT)


@dataclass(frozen=True)
class ProjectArgs:
    """compose's own options that choose the project (they go before the command)."""

    files: tuple[str, ...] = ()
    project_name: str | None = None
    profiles: tuple[str, ...] = ()
    env_files: tuple[str, ...] = ()
    project_directory: str | None = None
    cwd: Path = field(default_factory=Path.cwd)

    def argv(self) -> list[str]:
        out: list[str] = []
        for f in self.files:
            out += ["-f", f]
        if self.project_name:
            out += ["-p", self.project_name]
        for p in self.profiles:
            out += ["--profile", p]
        for e in self.env_files:
            out += ["--env-file", e]
        if self.project_directory:
            out += ["--project-directory", self.project_directory]
        return out

    def directory(self) -> Path:
        """The project directory, as compose picks it: --project-directory, else the first
        file's directory, else the working directory."""
        if self.project_directory:
            return (self.cwd / self.project_directory).resolve()
        if self.files and self.files[0] != "-":
            return (self.cwd / self.files[0]).resolve().parent
        return self.cwd.resolve()


def resolve(compose: Compose, args: ProjectArgs) -> dict[str, Any]:
    """The project as compose resolves it: files merged, interpolated, env_files folded into
    ``environment``, paths made absolute, inactive profiles left out."""
    done = subprocess.run([*compose.argv, *args.argv(), "config"], capture_output=True, text=True,
                          cwd=args.cwd, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        raise ConfigError(f"docker compose cannot read the project: {lines[-1] if lines else f'exit {done.returncode}'}",
                          "check it with `docker compose config`")
    model = yaml.safe_load(done.stdout) or {}
    if not isinstance(model, dict) or not model.get("name"):
        raise ConfigError("docker compose config gave no project", "check it with `docker compose config`")
    return model
