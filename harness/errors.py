"""Exceptions raised by the guest harness.

Every guest failure carries the tail of the serial console, so a failing test shows what the kernel
said without opening the log file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.watch import Finding


class GuestError(Exception):
    """Base class: something went wrong with a guest (boot, command, console, QEMU)."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.message = message
        self.console_tail = console_tail
        text = message
        if console_tail:
            text += "\n--- console tail ---\n" + console_tail.rstrip("\n") + "\n--- end of console tail ---"
        super().__init__(text)


class GuestBootError(GuestError):
    """The guest did not reach a usable shell (QEMU failed, testinit failed, boot timed out)."""


class GuestTimeout(GuestError):
    """A guest operation exceeded its timeout; QEMU has been killed."""


class GuestCrashError(GuestError):
    """QEMU exited (or the kernel panicked) while the harness was waiting for the guest."""


class KernelCrashError(GuestCrashError):
    """The kernel oopsed, panicked or hung a task while a command ran: the command was abandoned."""

    def __init__(self, cmd: str, findings: Sequence[Finding], console_tail: str = "") -> None:
        self.cmd = cmd
        self.findings = list(findings)
        first = self.findings[0]
        parts = [f"kernel {first.kind} during `{cmd[:200]}`: {first.line.strip()}"]
        for f in self.findings:
            parts.append(f"=== {f.kind} (console line {f.line_no}): {f.line}\n{f.excerpt}")
        super().__init__("\n".join(parts), console_tail)


class GuestCommandError(GuestError):
    """A command run by Guest.check() exited with a non-zero status."""

    def __init__(self, cmd: str, rc: int, stdout: str, stderr: str) -> None:
        self.cmd = cmd
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"guest command failed (rc={rc}): {cmd}\n"
            f"--- stdout ---\n{_clip(stdout)}\n--- stderr ---\n{_clip(stderr)}"
        )


class GuestPythonError(GuestError):
    """An exception raised by a Guest.py() snippet, rebuilt on the host.

    `type` is the exception class name (e.g. "FileNotFoundError"), `errno` the OSError errno or None.
    """

    def __init__(
        self,
        type: str,
        message: str,
        errno: int | None = None,
        strerror: str | None = None,
        traceback: str = "",
        module: str = "builtins",
    ) -> None:
        self.type = type
        self.errno = errno
        self.strerror = strerror
        self.traceback = traceback
        self.module = module
        head = f"{type}: {message}" + (f" [errno {errno}]" if errno is not None else "")
        super().__init__(f"guest python raised {head}\n{traceback}".rstrip())
        self.message = message


class KernelWarningError(GuestError):
    """The kernel printed warnings/oopses/panics (watcher findings) that the test did not expect."""

    def __init__(self, findings: Sequence[Finding], where: str = "") -> None:
        self.findings = list(findings)
        parts = [f"{len(self.findings)} unexpected kernel finding(s){' in ' + where if where else ''}:"]
        for f in self.findings:
            parts.append(f"=== {f.kind} (console line {f.line_no}): {f.line}\n{f.excerpt}")
        super().__init__("\n".join(parts))


class ModuleBuildError(GuestError):
    """The kernel module could not be built for the target."""


def _clip(text: str, limit: int = 4000) -> str:
    if len(text) <= limit:
        return text
    return text[: limit // 2] + f"\n... [{len(text) - limit} characters cut] ...\n" + text[-limit // 2 :]
