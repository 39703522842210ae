"""Guest commands for the benchmarks: a failed command ends the benchmark with everything the
guest printed, instead of a bare exit status."""

from __future__ import annotations

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
