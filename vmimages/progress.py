"""One line per build step with elapsed seconds, on stderr.

Every finished step prints one permanent line ``[vmimages] <step>: 12.3s``. On a terminal a
transient status line below it shows the steps still running with a ticking timer.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = True if enabled is None else enabled
        self.tty = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, float]] = {}
        self._next = 0
        self._ticker: threading.Thread | None = None

    # -- output -------------------------------------------------------------------------------
    def _status_line(self) -> str:
        now = time.monotonic()
        parts = [f"{what} {now - t0:.0f}s" for what, t0 in self._running.values()]
        return ("[vmimages] running: " + ", ".join(parts))[:200] if parts else ""

    def _emit(self, line: str | None) -> None:
        """Print a permanent line (if any) and redraw the status line; caller holds _lock."""
        if self.tty:
            sys.stderr.write("\r\033[K")
        if line is not None:
            sys.stderr.write(line + "\n")
        if self.tty:
            sys.stderr.write(self._status_line())
        sys.stderr.flush()

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                if not self._running:
                    self._ticker = None
                    return
                self._emit(None)

    def note(self, msg: str) -> None:
        if self.enabled:
            with self._lock:
                self._emit(f"[vmimages] {msg}")

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.monotonic()
        with self._lock:
            ident = self._next
            self._next += 1
            self._running[ident] = (what, start)
            if self.tty:
                self._emit(None)
                if self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick, daemon=True)
                    self._ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            dt = time.monotonic() - start
            with self._lock:
                del self._running[ident]
                status = f"{dt:.1f}s" if ok else f"FAILED after {dt:.1f}s"
                self._emit(f"[vmimages] {what}: {status}")
