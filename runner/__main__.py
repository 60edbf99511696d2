"""`python -m podtwin.runner`: the podtwin CLI."""
import os
import sys


def _interrupted(exc: BaseException | None) -> bool:
    """Whether a Ctrl-C is behind ``exc``: Python 3.11 wraps one that lands in a class's
    ``__set_name__`` (a pydantic field, say) in a RuntimeError."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


try:
    from podtwin.runner.cli import run
except BaseException as exc:  # noqa: BLE001 - only a Ctrl-C while still importing is handled here
    if not _interrupted(exc):
        raise
    # Nothing was created yet. os._exit: past the interpreter's exit path, which could still end
    # the process with SIGINT (-2) instead of 130 (see cli._exit_now).
    print("podtwin: interrupted", file=sys.stderr, flush=True)
    os._exit(130)

run()
