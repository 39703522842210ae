"""Batch guests: boot, run one script through testinit (`dbd.cmd=`), power off. No shell, no QMP use.

Success needs the `TESTINIT-END rc=0` marker: a kernel panic also makes QEMU exit with status 0
(panic=-1 plus -no-reboot), so the exit status alone proves nothing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from harness.console import Console
from harness.errors import GuestCrashError, GuestTimeout
from harness.images import ImageLike, guest_image, image_files_exist, prepare_run
from harness.qemu import XCHG_MOUNT, DiskSpec, build_command, format_command
from harness.watch import ConsoleWatcher, Finding

END_RE = re.compile(r"TESTINIT-END rc=(\d+)")


@dataclass(frozen=True)
class BatchResult:
    rc: int | None  # the script's status from TESTINIT-END, None when the marker never came
    qemu_status: int | None  # QEMU's exit code (None: killed)
    stdout: bytes  # the script's stdout/stderr, exact (redirected into the exchange dir)
    stderr: bytes
    findings: list[Finding]
    console: str  # everything the guest printed
    run_dir: Path | None  # kept (console.log, overlay, disks) only when keep=True
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.findings

    @property
    def reason(self) -> str:
        if self.rc is None:
            return f"no TESTINIT-END marker (QEMU exit status {self.qemu_status}): the guest died"
        if self.findings:
            return f"kernel findings: {', '.join(f.kind for f in self.findings)}"
        return f"script exit status {self.rc}"


def run_batch(
    script: str,
    target: str,
    rootfs: str = "bookworm",
    disks: tuple[DiskSpec, ...] = (),
    timeout: float = 300.0,
    name: str = "batch",
    image: ImageLike | None = None,
    keep: bool = False,
) -> BatchResult:
    if image is None or not image_files_exist(image):
        image = guest_image(target, rootfs)
    rundir, cfg, _ = prepare_run(
        image, name=name, disks=disks, batch_cmd=f"{XCHG_MOUNT}/batch.sh", no_reboot=True
    )
    (rundir.xchg / "batch.sh").write_text(
        f"( {script}\n) >{XCHG_MOUNT}/batch.out 2>{XCHG_MOUNT}/batch.err </dev/null\n"
    )
    argv = build_command(cfg)
    (rundir.path / "qemu-cmdline.txt").write_text(format_command(argv) + "\n")
    t0 = time.monotonic()
    console = Console(argv, rundir.console_log, ConsoleWatcher(), cwd=rundir.path)
    try:
        console.expect(r"(?!)", timeout, what="QEMU to exit")  # never matches: waits for exit or timeout
    except GuestCrashError:
        pass  # QEMU exited: the normal end of a batch run
    except GuestTimeout:
        pass  # killed; reported through the missing marker
    finally:
        console.close()
    m = END_RE.search(console.text_from(0))
    result = BatchResult(
        rc=int(m.group(1)) if m else None,
        qemu_status=console.exit_status,
        stdout=_read(rundir.xchg / "batch.out"),
        stderr=_read(rundir.xchg / "batch.err"),
        findings=console.watcher.findings(),
        console=console.text_from(0).replace("\r", ""),
        run_dir=rundir.path if keep else None,
        seconds=time.monotonic() - t0,
    )
    if not keep:
        rundir.remove()
    return result


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
