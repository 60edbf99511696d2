"""One error tree for the runner, translated once at the CLI edge.

Every error carries a user-facing message (what went wrong), a hint (how to fix it) and an exit
code. Lower layers raise these, chaining the original exception; the CLI prints one line.
"""
from __future__ import annotations


class PodtwinError(Exception):
    """Base of every error podtwin reports to the user."""

    exit_code = 2
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def one_line(self) -> str:
        if self.hint:
            return f"podtwin: {self.message} — {self.hint}"
        return f"podtwin: {self.message}"


class ConfigError(PodtwinError):
    """A config file, profile or flag is invalid."""


class TargetError(PodtwinError):
    """The target does not exist, is not running, or cannot be parsed."""


class DockerUnavailable(PodtwinError):
    """The Docker engine does not answer."""

    default_hint = "start the Docker engine (or run `make setup`), or set DOCKER_HOST"


class ImageMissing(PodtwinError):
    """An image podtwin needs is not present locally."""


class AgentError(PodtwinError):
    """The agent did not start, or the link to it failed."""


class SessionError(PodtwinError):
    """A session could not be set up or torn down."""
