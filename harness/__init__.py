"""QEMU guest harness for the dattobd-compatible module: boot throwaway guests, run commands exactly,
cut power, watch the kernel console for warnings/oopses/panics, keep artifacts of failures.

Public API (see harness.guest for details):
    Guest, DiskSpec, CommandResult, Finding, run_batch, BatchResult, select_accel
    errors: GuestError, GuestBootError, GuestTimeout, GuestCrashError, GuestCommandError,
            GuestPythonError, KernelCrashError, KernelWarningError, ModuleBuildError
"""

from harness.accel import select_accel
from harness.batch import BatchResult, run_batch
from harness.errors import (
    GuestBootError,
    GuestCommandError,
    GuestCrashError,
    GuestError,
    GuestPythonError,
    GuestTimeout,
    KernelCrashError,
    KernelWarningError,
    ModuleBuildError,
)
from harness.guest import CommandResult, Guest
from harness.images import GuestDisk
from harness.qemu import DiskSpec
from harness.watch import Finding

__all__ = [
    "BatchResult",
    "CommandResult",
    "DiskSpec",
    "Finding",
    "Guest",
    "GuestBootError",
    "GuestCommandError",
    "GuestCrashError",
    "GuestDisk",
    "GuestError",
    "GuestPythonError",
    "GuestTimeout",
    "KernelCrashError",
    "KernelWarningError",
    "ModuleBuildError",
    "run_batch",
    "select_accel",
]
