"""Guest commands for the benchmarks: a failed command ends the benchmark with everything the
guest printed, instead of a bare exit status."""

from __future__ import annotations

import sys
from typing import Any

from harness.errors import GuestError
from harness.guest import CommandResult, Guest


class BenchError(Exception):
    """A guest command failed; the message carries its stderr."""


def run(g: Guest, cmd: str, timeout: float = 120.0) -> CommandResult:
    """Run a guest command; on failure raise BenchError with its rc, stdout tail and stderr."""
    r = g.run(cmd, timeout=timeout)
    if r.rc != 0:
        raise BenchError(
            f"guest command failed (rc {r.rc}): {cmd}\n--- stdout (tail) ---\n{r.stdout[-2000:]}"
            f"\n--- stderr ---\n{r.stderr}"
        )
    return r


def boot_and_describe(g: Guest, results: dict[str, Any]) -> None:
    """Boot the guest and record what the numbers were measured on: accelerator, kernel, vCPUs."""
    g.boot()
    argv = g.command_line
    results["accel"] = argv[argv.index("-accel") + 1] if "-accel" in argv else "?"
    results["guest_kernel"] = run(g, "uname -r").stdout.strip()
    results["guest_nproc"] = run(g, "nproc").stdout.strip()


def finish_guest(g: Guest, failed: bool, results: dict[str, Any]) -> bool:
    """Power the guest off; kernel findings on its console (a WARNING, KASAN, ...) are recorded in
    results and make the run failed. Returns whether it failed."""
    try:
        g.finish(test_failed=failed, artifact_dir=None)
    except GuestError as e:  # KernelWarningError: kernel findings on the console
        print(f"\nkernel findings: {e}", file=sys.stderr)
        results["kernel_findings"] = str(e)
        return True
    return failed
