"""Undo in reverse order, one guarded step at a time: every rule, container, pod and mount is
recorded when it is made, and removed in reverse order however things end. A step that fails is
logged and reported; the others still run (sshuttle's firewall ``finally:`` does the same)."""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("podtwin.undo")


class UndoStack:
    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, undo: Callable[[], object]) -> None:
        self.steps.append((what, undo))

    def __len__(self) -> int:
        return len(self.steps)

    def unwind(self) -> list[str]:
        """Run every step, newest first; what failed, as "what: why" lines."""
        failures = []
        while self.steps:
            what, undo = self.steps.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                failures.append(f"{what}: {exc}")
                log.warning("undoing %s failed: %s", what, exc)
        return failures
