"""A session's teardown: each backend's ``restore`` and every object the session made, recorded
the moment it exists and undone in reverse order however the session ends (app exit, Ctrl-C,
SIGTERM, an error). A detached reaper covers the case where the runner itself is killed."""
from __future__ import annotations

from typing import Callable, Protocol

from podtwin.agent.undo import UndoStack
from podtwin.runner.progress import Progress


class Backend(Protocol):
    """A placement or a transport: ``setup`` and the ``restore`` that undoes it."""

    what: str

    def setup(self, *args, **kwargs) -> object: ...

    def restore(self) -> None: ...


class Teardown:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stack = UndoStack()

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self.stack.push(what, undo)

    def setup(self, backend: Backend, *args, **kwargs):
        """Record the backend's restore, then set it up: a setup that fails half-way is undone too."""
        self.add(backend.what, backend.restore)
        return backend.setup(*args, **kwargs)

    def __enter__(self) -> "Teardown":
        return self

    def __exit__(self, *exc) -> None:
        failures = self.stack.unwind()
        if failures:
            self.progress.warn("podtwin: clean-up was incomplete (" + "; ".join(failures) + ") — run `podtwin clean`")
