"""Synchronous facade over qemu.qmp's asyncio QMPClient.

The client lives on an event loop in a daemon thread; every call is `run_coroutine_threadsafe(...)
.result(timeout)`. Events are recorded as they arrive (a listener whose `put` appends to a list), so
`wait_event` can look at events that came before it was called. Closing is safe when QEMU has
already exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, Message, QMPClient

from harness.errors import GuestError

T = TypeVar("T")
Event = dict[str, Any]

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMPError(GuestError):
    """A QMP command failed or QMP could not be reached."""


class _Recorder(EventListener):
    def __init__(self, sink: Callable[[Event], None]) -> None:
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        self._sink(dict(event))


class QMP:
    """One QMP connection to one QEMU; usable from any thread."""

    def __init__(self, socket_path: Path, name: str = "harness") -> None:
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._client.register_listener(_Recorder(self._record))
        self.connected = False

    def _record(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, timeout: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
        """Connect, retrying while QEMU creates its socket; `alive()` False stops the retries."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                break
            if self.socket_path.exists():
                try:
                    self._call(self._client.connect(str(self.socket_path)), timeout=10)
                    self.connected = True
                    return
                except Exception as e:  # ConnectError, OSError, timeouts
                    last = e
            time.sleep(0.05)
        raise QMPError(f"could not connect to QMP at {self.socket_path}: {last!r}")

    def execute(self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 30.0) -> Any:
        if not self.connected:
            raise QMPError(f"QMP not connected (command {cmd})")
        try:
            return self._call(self._client.execute(cmd, args), timeout)
        except Exception as e:
            raise QMPError(f"QMP {cmd} failed: {e!r}") from e

    # -- convenience ------------------------------------------------------------------------------
    def system_reset(self) -> None:
        """Hard reset: the guest loses everything not yet written to its virtual disks (a power cut)."""
        self.execute("system_reset")

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def set_reboot_action(self, action: str) -> None:
        """ "reset" (a reset reboots the guest) or "shutdown" (a reset or panic ends QEMU)."""
        self.execute("set-action", {"reboot": action})

    def quit(self) -> None:
        """Ask QEMU to exit; no error if it is already gone."""
        with contextlib.suppress(QMPError):
            self.execute("quit", timeout=5)

    # -- events -----------------------------------------------------------------------------------
    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def event_count(self) -> int:
        with self._cond:
            return len(self._events)

    def wait_event(
        self,
        name: str,
        timeout: float,
        since: int = 0,
        predicate: Callable[[Event], bool] | None = None,
    ) -> Event | None:
        """First event `name` (matching `predicate`) at index >= `since`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events[since:]:
                    if ev.get("event") == name and (predicate is None or predicate(ev)):
                        return ev
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def close(self) -> None:
        """Disconnect (quietly if QEMU is gone) and stop the loop thread; idempotent."""
        if self._loop.is_closed():
            return
        if self.connected:
            with contextlib.suppress(Exception):  # EOFError etc. when QEMU already exited
                self._call(self._client.disconnect(), timeout=5)
            self.connected = False
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
