"""One error tree for the runner, translated once at the CLI edge.

Every error carries a user-facing message (what went wrong), a hint (how to fix it) and an exit
code. Lower layers raise these, chaining the original exception; the CLI prints one line.

Exit codes (README "Exit codes") are ``docker run``'s: the app's own code when the session ran;
125 whenever podtwin fails before or around the app, whatever the kind (a bad flag, config file or
profile: ``EXIT_CONFIG``; a target that cannot be parsed, found or used: ``EXIT_TARGET``; what
podtwin runs on: ``EXIT_INFRA``), so that no app's own code (2, 3, ...) can be taken for one of
podtwin's; 126 or 127 when the app's command cannot be run or is not in its image
(``AppStartError``); 130 after Ctrl-C or SIGTERM.
"""
from __future__ import annotations


EXIT_INFRA = 125
EXIT_CONFIG = EXIT_INFRA   # the kinds stay named; the code is docker's one code for its own failures
EXIT_TARGET = EXIT_INFRA
EXIT_INTERRUPTED = 130


class PodtwinError(Exception):
    """Base of every error podtwin reports to the user: by default, an infrastructure error."""

    exit_code = EXIT_INFRA
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

    exit_code = EXIT_CONFIG


class TargetError(PodtwinError):
    """The target does not exist, is not running, or cannot be parsed."""

    exit_code = EXIT_TARGET


class DockerUnavailable(PodtwinError):
    """The Docker engine does not answer."""

    default_hint = "start the Docker engine (or run `make setup`), or set DOCKER_HOST"


class ImageMissing(PodtwinError):
    """An image podtwin needs is not present locally."""


class AgentError(PodtwinError):
    """The agent did not start, or the link to it failed."""


class AppStartError(PodtwinError):
    """The app's command could not be started in its image (exit code as docker run's)."""

    def __init__(self, message: str, hint: str | None, exit_code: int) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class SessionError(PodtwinError):
    """A session could not be set up or torn down."""


class ClusterUnavailable(PodtwinError):
    """No Kubernetes cluster to talk to, or it refused our credentials."""

    default_hint = "check the cluster with `kubectl get nodes`, or pass --context/--kubeconfig"

    @classmethod
    def credentials_refused(cls, doing: str) -> "ClusterUnavailable":
        """The API server answered 401 to what we were ``doing``."""
        return cls(f"the cluster refused our credentials while trying to {doing}",
                   "log in again (your token or certificate may have expired)")


class Forbidden(PodtwinError):
    """The cluster does not let us do something the session needs (RBAC)."""

    default_hint = "ask for the Role in docs/kubernetes.md, or run `podtwin doctor`"


class PropagationRefused(PodtwinError):
    """The Docker engine does not let a mount made in the sidecar reach the app (Docker Desktop,
    rootless engines): the app gets a copy of the target's files instead."""
