"""Serial console of a QEMU guest, driven through pexpect.

`Console` spawns QEMU under pexpect (the serial port is QEMU's stdio) and runs a pump thread that reads
everything the guest prints, appends it to an unbuffered log file, feeds the console watcher and keeps
it in memory for `expect`. So the log is complete even when the host side hangs or is killed, and the
guest never stalls on a full pty.

`Shell` speaks to testinit's interactive bash on that console. Each command is written to a script in
the 9p exchange dir and run as `( . N.sh ) >N.out 2>N.err </dev/null`, so output is exact and
binary-safe; only a short marker line crosses the console, and the exit status is also written to
`N.rc`, so a kernel message printed in the middle of the marker cannot lose the result.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import os
import re
import secrets
import select
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pexpect  # type: ignore[import-untyped]

from harness.errors import GuestCrashError, GuestError, GuestTimeout
from harness.watch import ConsoleWatcher

TAIL_LINES = 60
PROMPT_WAIT = 15.0
PROMPT_RE = re.compile(r"bash-[\d.]+[#$] |[#$] $", re.M)


class _TextBuffer:
    """Append-only text with cheap slicing from an offset."""

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._starts: list[int] = []
        self.length = 0

    def append(self, text: str) -> None:
        if text:
            self._starts.append(self.length)
            self._chunks.append(text)
            self.length += len(text)

    def text_from(self, pos: int) -> str:
        if pos >= self.length:
            return ""
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        joined = "".join(self._chunks[i:])
        return joined[pos - self._starts[i] :]


class Console:
    """A QEMU process whose serial console is pumped into memory, a log file and a watcher."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        watcher: ConsoleWatcher | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.watcher = watcher or ConsoleWatcher()
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._buf = _TextBuffer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cond = threading.Condition()
        self._eof = False
        self._stop = False
        self.exit_status: int | None = None  # QEMU's exit code once it exited (None if killed by a signal)
        self.killed = False
        self.child = pexpect.spawn(argv[0], argv[1:], cwd=str(cwd) if cwd else None, dimensions=(50, 500))
        self._thread = threading.Thread(target=self._pump, name=f"console-{self.child.pid}", daemon=True)
        self._thread.start()

    # -- pump ------------------------------------------------------------------------------------
    def _pump(self) -> None:
        fd = self.child.child_fd
        while not self._stop:
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(fd, 65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                self._on_eof()
                return
            self._ingest(data)

    def _ingest(self, data: bytes) -> None:
        self._log.write(data)
        text = self._decoder.decode(data)
        self.watcher.feed(text)
        with self._cond:
            self._buf.append(text)
            self._cond.notify_all()

    def _on_eof(self) -> None:
        tail = self._decoder.decode(b"", final=True)
        self.watcher.feed(tail)
        self.watcher.flush()
        with self._cond:
            self._buf.append(tail)
            self._eof = True
            self._cond.notify_all()

    # -- state -----------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        with self._cond:
            return self._buf.length

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def alive(self) -> bool:
        return not self.eof and bool(self.child.isalive())

    def text_from(self, pos: int) -> str:
        with self._cond:
            return self._buf.text_from(pos)

    def tail(self, lines: int = TAIL_LINES) -> str:
        with self._cond:
            text = self._buf.text_from(max(0, self._buf.length - 200 * lines))
        return "\n".join(text.replace("\r", "").split("\n")[-lines:])

    def wait_output(self, timeout: float) -> None:
        """Sleep until new console output arrives, EOF, or `timeout` seconds."""
        with self._cond:
            length = self._buf.length
            self._cond.wait_for(lambda: self._buf.length != length or self._eof, timeout)

    # -- expect ----------------------------------------------------------------------------------
    def expect(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        start: int = 0,
        what: str = "",
        error: type[GuestError] = GuestTimeout,
        poll: Callable[[], bool] | None = None,
    ) -> re.Match[str] | None:
        """Wait for `pattern` in the console text after offset `start`.

        Returns the match, or None when `poll()` returned True first. On timeout QEMU is killed and
        `error` (GuestTimeout by default) is raised; on QEMU exit GuestCrashError is raised. Both carry
        the console tail.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text_from(start))
            if m:
                return m
            if poll is not None and poll():
                return None
            if self.eof:
                self.reap()
                raise GuestCrashError(
                    f"QEMU exited (status {self.exit_status}) while waiting for {what or rx.pattern!r}",
                    self.tail(),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise error(f"timed out after {timeout:.0f}s waiting for {what or rx.pattern!r}", self.tail())
            self.wait_output(min(remaining, 0.2))

    def send(self, text: str) -> None:
        self.child.send(text.encode())

    # -- lifecycle -------------------------------------------------------------------------------
    def wait_exit(self, timeout: float) -> bool:
        """Wait for QEMU to exit on its own; True if it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eof and not self.child.isalive():
                self.reap()
                return True
            self.wait_output(0.2)
            if not self.child.isalive():
                self._thread.join(timeout=2)
                self.reap()
                return True
        return False

    def kill(self) -> None:
        """SIGKILL QEMU and wait for the pump to drain the rest of its output. The whole process
        group goes: the console's end of the pty reads EOF only once no process holds the other end."""
        if self.child.isalive():
            self.killed = True
            try:
                if os.getpgid(self.child.pid) == self.child.pid:  # its own group (pexpect's setsid)
                    os.killpg(self.child.pid, 9)
                else:
                    self.child.kill(9)
            except ProcessLookupError:
                pass
        self._thread.join(timeout=5)
        self.reap()

    def reap(self, timeout: float = 5.0) -> None:
        """Collect QEMU's exit status. The pty hits EOF slightly before the process is gone, so wait up
        to `timeout` s for it (only once output reached EOF; a live QEMU is left alone)."""
        if self.exit_status is not None or not self.eof:
            return
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)
        self.exit_status = self.child.exitstatus

    def close(self) -> None:
        self.reap()  # QEMU that already hit EOF is about to exit on its own: do not shoot it
        if self.child.isalive():
            self.kill()
        self._thread.join(timeout=5)
        self.watcher.flush()
        self.reap()
        with contextlib.suppress(pexpect.ExceptionPexpect):
            self.child.close(force=True)
        self._log.close()

    def interact(self) -> None:
        """Hand the console to the user's terminal (Ctrl-] detaches); output is still logged."""
        self._stop = True
        self._thread.join(timeout=5)
        sys.stdout.write(self.tail(20) + "\n")
        sys.stdout.flush()

        def log_output(data: bytes) -> bytes:
            self._ingest(data)
            return data

        with contextlib.suppress(OSError):
            self.child.interact(escape_character="\x1d", output_filter=log_output)
        if not self.child.isalive():
            self._on_eof()


@dataclass(frozen=True)
class RawResult:
    stdout: bytes
    stderr: bytes
    rc: int
    duration: float


class Shell:
    """Command protocol over testinit's interactive bash (see module docstring)."""

    def __init__(self, console: Console, xchg_host: Path, xchg_guest: str, commands_log: Path) -> None:
        self.console = console
        self.host_dir = xchg_host / ".cmd"
        self.guest_dir = f"{xchg_guest}/.cmd"
        self.host_dir.mkdir(parents=True, exist_ok=True)
        self.commands_log = commands_log
        self.nonce = secrets.token_hex(4)
        self.counter = 0
        self.ready = False

    def init(self, start: int, timeout: float) -> None:
        """Make the fresh shell quiet and scriptable; `start` is the offset of this boot's TESTINIT-START."""
        # bash's first prompt ("bash-5.2# "), possibly followed by late kernel messages. If it does not
        # show within PROMPT_WAIT s the init line is sent anyway: bash reads it once it is ready.
        give_up = time.monotonic() + min(timeout, PROMPT_WAIT)
        self.console.expect(
            PROMPT_RE, timeout, start=start, what="the shell prompt", poll=lambda: time.monotonic() > give_up
        )
        n = secrets.token_hex(3)
        # `$((20+22))` keeps the echoed input (before `stty -echo` applies) from matching the marker.
        self.console.send(
            "stty -echo cols 500; bind 'set enable-bracketed-paste off' 2>/dev/null; "
            f"export PS1='@@P@@# ' PS2='' TERM=dumb; unset PROMPT_COMMAND; echo @@READY-{n}-$((20+22))@@\n"
        )
        self.console.expect(rf"@@READY-{n}-42@@", timeout, start=start, what="the shell to initialize")
        self.ready = True

    def run(self, cmd: str, timeout: float, crash_check: Callable[[], bool] | None = None) -> RawResult:
        self.counter += 1
        n = self.counter
        host = self.host_dir
        for suffix in (".out", ".err", ".rc"):
            (host / f"{n}{suffix}").unlink(missing_ok=True)
        (host / f"{n}.sh").write_text(cmd + "\n")
        g = f"{self.guest_dir}/{n}"
        marker = f"@@RC-{self.nonce}-{n}="
        line = f'( . {g}.sh ) >{g}.out 2>{g}.err </dev/null; r=$?; echo $r >{g}.rc; echo "{marker}$r@@"\n'
        rc_file = host / f"{n}.rc"

        def rc_written() -> bool:
            return _read_rc(rc_file) is not None or (crash_check is not None and crash_check())

        t0 = time.monotonic()
        start = self.console.position
        self.console.send(line)
        try:
            m = self.console.expect(
                re.escape(marker) + r"(\d+)@@", timeout, start=start, what=f"command {n}: {cmd[:200]}",
                poll=rc_written,
            )  # fmt: skip
        except GuestError:
            self.ready = False
            self._log(n, cmd, None, time.monotonic() - t0)
            raise
        rc = int(m.group(1)) if m else _read_rc(rc_file)
        if rc is None:  # crash_check fired: the kernel panicked/died under the command
            self.ready = False
            self.console.wait_exit(10)
            raise GuestCrashError(f"guest crashed during command {n}: {cmd[:200]}", self.console.tail())
        duration = time.monotonic() - t0
        out = (host / f"{n}.out").read_bytes()
        err = (host / f"{n}.err").read_bytes()
        for suffix in (".sh", ".out", ".err", ".rc"):
            (host / f"{n}{suffix}").unlink(missing_ok=True)
        self._log(n, cmd, rc, duration)
        return RawResult(out, err, rc, duration)

    def send_raw(self, line: str) -> None:
        """Type a line into the shell without waiting for anything (reboot, exit)."""
        self.ready = False
        self.console.send(line + "\n")

    def _log(self, n: int, cmd: str, rc: int | None, duration: float) -> None:
        with open(self.commands_log, "a") as f:
            f.write(f"[{n}] rc={rc if rc is not None else 'none'} {duration:.3f}s: {shlex.quote(cmd)}\n")


def _read_rc(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None
