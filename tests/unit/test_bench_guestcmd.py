"""The benchmarks' guest-command watchdog, run by the host's bash (host only)."""

from __future__ import annotations

import subprocess

from benchmarks.guestcmd import STALL_RC, watched


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_output_and_status_pass_through() -> None:
    r = bash(watched("echo out; echo err >&2; exit 3", stall_s=30))
    assert r.returncode == 3
    assert r.stdout.splitlines() == ["out", "err"]  # the command's stderr joins its stdout


def test_a_command_without_io_progress_is_stopped_with_the_block_state() -> None:
    # no device matches the prefix, so no I/O ever completes on a watched disk
    r = bash(watched("echo started; sleep 50; echo never", stall_s=2, disks="no-such-disk", sysrq=False))
    assert r.returncode == STALL_RC
    assert r.stdout.startswith("started\n=== no I/O completed on any virtio disk for 2 s")
    assert "never" not in r.stdout
