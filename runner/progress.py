"""What a session tells the user while it starts and ends, on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """Slow steps say what they do and how long the session has taken so far."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"podtwin [{time.monotonic() - self.start:4.1f}s] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(message if message.startswith("podtwin") else f"podtwin: {message}", file=sys.stderr, flush=True)
