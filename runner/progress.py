"""What a session tells the user while it starts and ends, on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """Slow steps say what they do and how long the session has taken so far."""

    def __init__(self, quiet: bool, prefix: str = "") -> None:
        self.quiet = quiet
        self.start = time.monotonic()
        self.prefix = prefix

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"podtwin [{time.monotonic() - self.start:4.1f}s] {self.prefix}{message}", file=sys.stderr,
                  flush=True)

    def warn(self, message: str) -> None:
        message = message.removeprefix("podtwin: ")
        print(message if message.startswith("podtwin") else f"podtwin: {self.prefix}{message}", file=sys.stderr,
              flush=True)

    def of(self, name: str) -> "Progress":
        """The same clock, each line naming ``name`` (one of several sessions, e.g. a compose service)."""
        other = Progress(self.quiet, f"{self.prefix}{name}: ")
        other.start = self.start
        return other
