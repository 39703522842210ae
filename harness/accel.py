"""Choose the QEMU accelerator: "kvm" only when a real kernel boots under KVM, else "tcg".

On this project's hosts /dev/kvm exists but KVM guests hang or QEMU aborts, while a trivial real-mode
probe succeeds, so the probe boots the guest kernel itself (no root fs: it must print its banner and
reach the "unable to mount root" panic, which makes QEMU exit through -no-reboot). Every QEMU run is
bounded: on timeout its whole process group is SIGKILLed and never waited for unboundedly.

The verdict is cached per boot id (and QEMU binary) in the cache dir, under a file lock, so parallel
pytest workers probe once. `DBD_ACCEL=tcg|kvm` overrides everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

ACCELS = ("kvm", "tcg")
PROBE_TIMEOUT = 8.0  # seconds for the kernel probe (a working KVM needs about 1 s)
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def cpu_model(accel: str) -> str:
    """The -cpu value used with `accel` (RDRAND matters: without it mkfs stalls on an unseeded CRNG)."""
    return "host" if accel == "kvm" else "qemu64,+rdrand"


def default_cache_dir() -> Path:
    base = os.environ.get("DBD_HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dbd-harness"
    )
    return Path(base)


def qemu_binary() -> str:
    return os.environ.get("DBD_QEMU", "qemu-system-x86_64")


def select_accel(
    kernel: Path | None = None,
    *,
    qemu: str | None = None,
    kvm_device: Path = Path("/dev/kvm"),
    cache_dir: Path | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> str:
    """Return "kvm" or "tcg". Without a `kernel` to probe with, KVM is never trusted."""
    forced = os.environ.get("DBD_ACCEL", "").strip().lower()
    if forced:
        if forced not in ACCELS:
            raise ValueError(f"DBD_ACCEL must be one of {ACCELS}, not {forced!r}")
        return forced
    if not _kvm_usable(kvm_device) or kernel is None:
        return "tcg"
    qemu = qemu or qemu_binary()
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_boot_id()}\0{qemu}\0{kvm_device}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"accel-{key}"
    with open(cache_dir / "accel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cached = cache_file.read_text().strip()
            if cached in ACCELS:
                return cached
        except OSError:
            pass
        verdict = "kvm" if probe_kvm(kernel, qemu=qemu, timeout=timeout) else "tcg"
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(verdict + "\n")
        tmp.replace(cache_file)
        return verdict


def probe_kvm(kernel: Path, *, qemu: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot `kernel` under KVM without a root fs; True if it printed its banner and panicked in time."""
    argv = [
        qemu or qemu_binary(),
        "-machine", "pc", "-accel", "kvm", "-cpu", cpu_model("kvm"), "-m", "256",
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]  # fmt: skip
    rc, out = run_bounded(argv, timeout, stop_when=b"Kernel panic")
    return b"Linux version" in out and b"Kernel panic" in out and rc in (0, None)


def run_bounded(argv: list[str], timeout: float, stop_when: bytes | None = None) -> tuple[int | None, bytes]:
    """Run argv with a hard wall-clock bound; returns (exit code or None when killed, stdout+stderr).

    The child runs in its own session; on timeout (or once `stop_when` shows up in its output) the whole
    process group gets SIGKILL, and the harness waits at most 2 s more for it to be reaped.
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            return 127, str(e).encode()
        deadline = time.monotonic() + timeout
        rc: int | None = None
        while True:
            rc = proc.poll()
            if rc is not None:
                break
            if time.monotonic() >= deadline or (stop_when is not None and _file_contains(out, stop_when)):
                _kill_group(proc)
                rc = None if time.monotonic() >= deadline else 0
                break
            time.sleep(0.05)
        out.seek(0)
        return rc, out.read()


def _file_contains(f: IO[bytes], needle: bytes) -> bool:
    return needle in os.pread(f.fileno(), 1 << 20, 0)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # A process stuck in the kernel may not die at once: leave it rather than hang the harness.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)


def _kvm_usable(dev: Path) -> bool:
    return os.access(dev, os.R_OK | os.W_OK)


def _boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"
