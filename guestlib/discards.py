"""The writes, discards and write-zeroes sent to a disk, traced below the filesystem (tracefs).

A change list marks what a discard covered in incremental mode: what a device reads after a discard
is the device's choice, so the block may have changed; write-zeroes (ext4's lazy inode table
initialisation sends them in the background) write zeros. On the test disks such blocks read zeros
before and after, so a snapshot diff shows no change there; the precision oracle takes these traced
operations as changes of the workload, and counts only what neither changed nor was discarded or
zeroed as spurious. Plain writes count as the workload's too (a rewrite of the same data is a
write, as dm-log-writes would record it), except inside the COW files' extents, where only the
driver and the creation of its files write. Discards of a snapshot period never reach the disk
(the driver completes them), so they are not traced.

The trace runs in its own tracefs instance from :func:`start` on; :func:`blocks` reads what it has
so far, as 4 KiB blocks of the traced partition or disk.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

INSTANCE = Path("/sys/kernel/tracing/instances/dbd-discards")
_EVENT = re.compile(r"block_bio_queue: (\d+),(\d+) (\S+) (\d+) \+ (\d+)|(tracing_mark_write): (\S+)")


def mark_for(st_rdev: int, taken: bool = False) -> str:
    """The marker written before each setup-snapshot and transition-to-snapshot of the device
    ``st_rdev`` (major:minor), where its COW file's creation starts, or with ``taken`` after it
    returned, when the snapshot exists and its period has begun."""
    kind = "dbd-snapshot-taken" if taken else "dbd-cow-create"
    return f"{kind}-{os.major(st_rdev)}:{os.minor(st_rdev)}"


SECTOR = 512
BLOCK = 4096


def _disk_and_start(device: str) -> tuple[int, int, int]:
    """(disk major, disk minor, first sector) of a disk or partition."""
    rdev = os.stat(device).st_rdev
    sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    if (sysfs / "partition").exists():
        start = int((sysfs / "start").read_text())
        major, minor = (int(x) for x in (sysfs.resolve().parent / "dev").read_text().split(":"))
        return major, minor, start
    return os.major(rdev), os.minor(rdev), 0


def _sectors(device: str) -> int:
    rdev = os.stat(device).st_rdev
    return int(Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size").read_text())


def start() -> None:
    """Trace discards and write-zeroes of every disk from now on (idempotent)."""
    if not Path("/sys/kernel/tracing/instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    enable = INSTANCE / "events/block/block_bio_queue/enable"
    if enable.exists() and enable.read_text().strip() == "1":
        return
    INSTANCE.mkdir(exist_ok=True)
    (INSTANCE / "buffer_size_kb").write_text("32768")
    # rwbs: W write, D discard (DE secure erase), N other ops, which include write-zeroes
    (INSTANCE / "events/block/block_bio_queue/filter").write_text('rwbs ~ "W*" || rwbs ~ "D*" || rwbs ~ "N*"')
    enable.write_text("1")


def mark(text: str) -> None:
    """Put a marker into the trace (see :func:`mark_for`)."""
    marker = INSTANCE / "trace_marker"
    if marker.exists():
        marker.write_text(text)


Segment = tuple[str, list[tuple[int, int]]]


def blocks(device: str, ops: str = "DN") -> list[tuple[int, int]]:
    """Every traced run of ``device``, see :func:`segments`."""
    return [run for _, segment in segments(device, ops) for run in segment]


def segments(device: str, ops: str = "DN", marks: tuple[str, ...] = ()) -> list[Segment]:
    """(first block, count) of every traced bio of ``device`` (relative to it) whose operation (the
    first letter of rwbs) is in ``ops``, in the 4 KiB blocks it touches, split at each marker in
    ``marks``: (the marker that opened the segment, "" for the first; its runs). Lost events (the
    trace buffer wrapped) raise OSError: a partial trace would make blocks look spurious."""
    major, minor, first_sector = _disk_and_start(device)
    try:
        text = (INSTANCE / "trace").read_text()
    except FileNotFoundError:
        return [("", [])]
    for stats in INSTANCE.glob("per_cpu/cpu*/stats"):
        overrun = re.search(r"^overrun: (\d+)", stats.read_text(), re.M)
        if overrun and int(overrun.group(1)):
            raise OSError(f"the block trace lost {overrun.group(1)} events ({stats.parent.name})")
    end_sector = first_sector + _sectors(device)
    out: list[Segment] = [("", [])]
    for m in _EVENT.finditer(text):
        if m.group(6):
            if m.group(7) in marks:
                out.append((m.group(7), []))
            continue
        if (int(m.group(1)), int(m.group(2))) != (major, minor) or m.group(3)[0] not in ops:
            continue
        sector, count = int(m.group(4)), int(m.group(5))
        lo, hi = max(sector, first_sector), min(sector + count, end_sector)
        if hi <= lo:
            continue
        b0 = (lo - first_sector) * SECTOR // BLOCK
        b1 = ((hi - first_sector) * SECTOR + BLOCK - 1) // BLOCK
        out[-1][1].append((b0, b1 - b0))
    return out


def stop() -> None:
    if INSTANCE.is_dir():
        (INSTANCE / "events/block/block_bio_queue/enable").write_text("0")
        INSTANCE.rmdir()
