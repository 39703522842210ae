#!/usr/bin/env python3
"""Snapshot creation latency: setup-snapshot, transition-to-incremental and transition-to-snapshot,
timed around the ioctl itself, in ONE guest, against volume size and against dirty page cache.

One guest boots with one sparse data disk of the largest volume size (/dev/vdb). For each volume
size, in ascending order, the disk gets one partition of that size (the largest size is the whole
disk, no partition table), made ext4 with lazy inode-table init (``mkfs.ext4 -q -F -O ^orphan_file``)
and mounted with ``noinit_itable``, so that no background inode-table zeroing competes with the
ioctls. The module is loaded with debug=0. One cycle, in one guest Python process (pydbd's Control,
``time.perf_counter`` around each call, so no Python start-up is included):

1. setup-snapshot of the volume with COW file ``.datto0`` and ``-f F``;
2. transition-to-incremental;
3. transition-to-snapshot with a new COW file ``.datto1`` and the same ``-f F``;
4. destroy (not timed); both COW files are then deleted, the guest synced and the volume trimmed
   (so the sparse host image stays small).

Nothing is subtracted: each time is the whole ioctl, the COW file's creation and space included.
The module's memory is read around the cycle as its /proc/vmallocinfo allocations (its per-block
bitmaps) plus /proc/meminfo's SUnreclaim (kmalloc'ed index sections; other slab users add noise),
right before setup-snapshot, right after it and right after transition-to-incremental; the
difference, scaled to a TiB of volume, is the memory per tracked TiB (meaningful on the large
volumes, where the bitmaps dwarf the noise).

Series 1, volume and COW size: every size with ``-f 32`` (a fixed 32 MiB COW file) and with
``-f 0`` (the module default, 10 % of the volume). The COW file's space is fallocated, not written,
so neither setup-snapshot nor transition-to-snapshot should grow with it.

Series 2, dirty page cache: on the 1 GiB volume with ``-f 32``, ``dd`` writes 0, 64 or 256 MiB
buffered (no sync) just before the cycle; the guest's writeback is held off (vm.dirty_* sysctls),
and /proc/meminfo's Dirty is read in the same process right before setup-snapshot, whose freeze must
flush it all.

Each point runs ``--repeat`` times (median, min, max). The targets, reported and not asserted: on
the 8 GiB volume, setup-snapshot with the default COW size (819 MiB) within 1.5 times its time with
``-f 32`` and under 150 ms.

    .venv/bin/python benchmarks/snapshot_latency.py [--target debian-6.1] [--quick] [--repeat 3]
        [--sizes 64,1024,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestcmd import BenchError, boot_and_describe, finish_guest, finish_run
from benchmarks.guestcmd import run as guest_run
from harness.errors import GuestCommandError, GuestError
from harness.guest import CommandResult, Guest
from harness.qemu import DiskSpec

DISK = "/dev/vdb"
PART = "/dev/vdb1"
MNT = "/mnt/vol"
COW_SETUP = f"{MNT}/.datto0"
COW_NEXT = f"{MNT}/.datto1"  # transition-to-snapshot needs a new file; the old one is kept for update-img
MINOR = 0
MIB = 1024 * 1024

FULL_SIZES_MIB = (64, 256, 1024, 8192, 65536)
QUICK_SIZES_MIB = (64, 256, 1024)
# A constant COW size: what grows with the volume is the ioctl's own work. 32, not 16: an 8 GiB
# volume's index alone takes 16 MiB (8 bytes per 4 KiB block), and a COW file no larger than its
# index fails at the first copy (spec section 9, defect 7), which the first write after thaw makes.
SMALL_FALLOC_MIB = 32


def small_falloc_mib(size_mib: int) -> int:
    """The fixed COW size for a volume: SMALL_FALLOC_MIB, or twice the index where that is larger
    (a 64 GiB volume's index takes 128 MiB)."""
    return max(SMALL_FALLOC_MIB, 2 * size_mib // 512)


DEFAULT_FALLOC = 0  # the module's default: cow_fallocate_percentage_default (10 %) of the volume
DIRTY_MIB = (0, 64, 256)
DIRTY_VOLUME_MIB = 1024
SETUP_TARGET_MS = 150.0
COW_RATIO_TARGET = 1.5  # setup-snapshot with the default COW size over -f SMALL_FALLOC_MIB ...
TARGET_VOLUME_MIB = 8192  # ... on this volume
TIB_MIB = 1024 * 1024
OPS = ("setup", "to_incremental", "to_snapshot")

# Dirty pages must stay dirty until setup-snapshot's freeze flushes them: no background writeback
# below 768 MiB, no periodic flusher, no expiry within the benchmark.
HOLD_WRITEBACK = (
    "sysctl -q -w vm.dirty_background_bytes=805306368 vm.dirty_bytes=1073741824 "
    "vm.dirty_writeback_centisecs=0 vm.dirty_expire_centisecs=360000"
)
GUEST_MEMORY_MIB = 1536  # room for 256 MiB of dirty pages under those limits


@dataclass
class Cycle:
    """One setup / transition / transition cycle, milliseconds per ioctl."""

    setup_ms: float
    to_incremental_ms: float
    to_snapshot_ms: float
    dirty_kib_before: int  # /proc/meminfo Dirty right before setup-snapshot
    dirty_kib_after: int  # ... and right after it (the freeze flushed the volume's share)
    falloc_setup_bytes: int  # COW size the module chose at setup
    falloc_snapshot_bytes: int  # ... and at transition-to-snapshot
    memory_kib_before: int  # the module's vmalloc + SUnreclaim right before setup-snapshot
    memory_kib_snapshot: int  # ... right after it
    memory_kib_incremental: int  # ... right after transition-to-incremental


@dataclass
class Point:
    series: str  # "volume" or "dirty"
    size_mib: int
    falloc_arg: int  # the -f given (0: the module default)
    dirty_mib: int  # buffered MiB written, not synced, before setup
    cycles: list[Cycle] = field(default_factory=list)


# ---------------------------------------------------------------- guest commands


def run(g: Guest, cmd: str, timeout: float = 300.0) -> CommandResult:
    """guestcmd.run with a longer default: the largest zero-fills take minutes under TCG."""
    return guest_run(g, cmd, timeout)


def make_volume(g: Guest, size_mib: int, disk_mib: int) -> str:
    """A fresh ext4 of size_mib mounted at MNT: a partition of that size, or the whole disk when it
    is the disk's size. Returns the device."""
    run(g, f"mountpoint -q {MNT} && umount {MNT} || true")
    if size_mib == disk_mib:
        # drop the previous partition table, and the kernel's view of it, so /dev/vdb1 is gone
        run(g, f"wipefs -a -q {DISK} && blockdev --rereadpt {DISK}")
        dev = DISK
    else:
        run(g, f"echo 'start=2048, size={size_mib}MiB' | sfdisk -q --wipe always {DISK}")
        run(g, f"for i in $(seq 50); do test -b {PART} && break; sleep 0.1; done; test -b {PART}")
        dev = PART
    run(g, f"mkfs.ext4 -q -F -O ^orphan_file {dev}")
    run(g, f"mkdir -p {MNT} && mount -o noinit_itable {dev} {MNT}")
    got = int(run(g, f"blockdev --getsize64 {dev}").stdout.split()[0])
    if got != size_mib * MIB:
        raise BenchError(f"{dev} has {got} bytes, not {size_mib} MiB")
    return dev


def settle(g: Guest) -> None:
    """Between cycles: COW files gone, everything on disk, freed blocks trimmed (host image sparse)."""
    run(g, f"rm -f {COW_SETUP} {COW_NEXT} {MNT}/dirty.dat && sync && fstrim {MNT}")


# The cycle runs in one guest Python process, each ioctl timed alone; destroy runs even when a
# transition fails, so that the next point starts untracked.
CYCLE = """
import os, time
from pydbd.control import Control

def dirty_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("Dirty:"):
            return int(line.split()[1])

def memory_kib():
    got = dict()
    for line in open("/proc/meminfo"):
        key, value = line.split(":")
        got[key] = int(value.split()[0])
    module_vmalloc = sum(int(line.split()[1]) for line in open("/proc/vmallocinfo") if "[dattobd]" in line)
    return module_vmalloc // 1024 + got["SUnreclaim"]

def timed_ms(call, *args, **kwargs):
    start = time.perf_counter()
    call(*args, **kwargs)
    return (time.perf_counter() - start) * 1000

with Control() as c:
    before = dirty_kib()
    mem_before = memory_kib()
    setup = timed_ms(c.setup_snapshot, {dev!r}, {cow!r}, {minor}, fallocated_mib={f})
    try:
        after = dirty_kib()
        mem_snapshot = memory_kib()
        falloc_setup = c.info({minor}).falloc_size
        to_inc = timed_ms(c.transition_to_incremental, {minor})
        mem_incremental = memory_kib()
        to_snap = timed_ms(c.transition_to_snapshot, {cow_next!r}, {minor}, fallocated_mib={f})
        falloc_snap = c.info({minor}).falloc_size
    finally:
        c.destroy({minor})
result = [setup, to_inc, to_snap, before, after, falloc_setup, falloc_snap, mem_before, mem_snapshot,
          mem_incremental]
"""


def run_cycle(g: Guest, dev: str, falloc_mib: int) -> Cycle:
    code = CYCLE.format(dev=dev, cow=COW_SETUP, cow_next=COW_NEXT, minor=MINOR, f=falloc_mib)
    try:
        values = g.py(code, timeout=900)
    except GuestError as e:
        raise BenchError(f"setup/transition cycle on {dev} with -f {falloc_mib} failed: {e}") from e
    setup, to_inc, to_snap, before, after, falloc_setup, falloc_snap, *memory = values
    return Cycle(float(setup), float(to_inc), float(to_snap), int(before), int(after),
                 int(falloc_setup), int(falloc_snap), *(int(m) for m in memory))  # fmt: skip


def write_dirty(g: Guest, mib: int) -> None:
    """mib MiB of buffered writes to the volume, left dirty (no sync, no fsync)."""
    if mib:
        run(g, f"dd if=/dev/zero of={MNT}/dirty.dat bs=1M count={mib} status=none")


def show(p: Point, c: Cycle) -> None:
    print(
        f"  {p.series:<6} {p.size_mib:>5} MiB  -f {p.falloc_arg:<2} "
        f"dirty {c.dirty_kib_before / 1024:6.1f} MiB -> {c.dirty_kib_after / 1024:5.1f}  "
        f"COW {c.falloc_setup_bytes / MIB:6.1f} MiB  "
        f"setup {c.setup_ms:8.1f} ms  to-incremental {c.to_incremental_ms:7.1f} ms  "
        f"to-snapshot {c.to_snapshot_ms:8.1f} ms  module memory "
        f"{c.memory_kib_snapshot - c.memory_kib_before:+d} KiB (snapshot), "
        f"{c.memory_kib_incremental - c.memory_kib_before:+d} KiB (incremental)",
        flush=True,
    )


def measure(g: Guest, p: Point, dev: str, repeat: int) -> Point:
    for _ in range(repeat):
        settle(g)
        write_dirty(g, p.dirty_mib)
        p.cycles.append(run_cycle(g, dev, p.falloc_arg))
        show(p, p.cycles[-1])
    settle(g)
    return p


def bench(g: Guest, sizes: tuple[int, ...], repeat: int) -> list[Point]:
    points = []
    run(g, HOLD_WRITEBACK)
    for size in sizes:
        print(f"volume {size} MiB ...", flush=True)
        dev = make_volume(g, size, max(sizes))
        if size == sizes[0]:
            # the first cycle after insmod pays for cold kernel paths and caches: not reported
            settle(g)
            run_cycle(g, dev, SMALL_FALLOC_MIB)
        for falloc in (small_falloc_mib(size), DEFAULT_FALLOC):
            points.append(measure(g, Point("volume", size, falloc, 0), dev, repeat))
        if size == DIRTY_VOLUME_MIB:
            print(f"dirty page cache on the {size} MiB volume ...", flush=True)
            for dirty in DIRTY_MIB:
                points.append(measure(g, Point("dirty", size, SMALL_FALLOC_MIB, dirty), dev, repeat))
    run(g, f"umount {MNT}")
    return points


# ---------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(p: Point) -> dict[str, Any]:
    """A point as the renderer reads it: per ioctl median/min/max, the COW sizes, the dirty pages."""
    out: dict[str, Any] = {k: v for k, v in asdict(p).items() if k != "cycles"}
    out["runs"] = len(p.cycles)
    for op in OPS:
        out[op] = spread([getattr(c, f"{op}_ms") for c in p.cycles])
    for mode in ("snapshot", "incremental"):
        kib = statistics.median(getattr(c, f"memory_kib_{mode}") - c.memory_kib_before for c in p.cycles)
        out[f"memory_kib_{mode}"] = kib
        out[f"memory_mib_per_tib_{mode}"] = kib / 1024 * TIB_MIB / p.size_mib
    out["cow_setup_mib"] = p.cycles[0].falloc_setup_bytes / MIB
    out["cow_snapshot_mib"] = p.cycles[0].falloc_snapshot_bytes / MIB
    out["dirty_mib_before"] = statistics.median(c.dirty_kib_before for c in p.cycles) / 1024
    out["dirty_mib_after"] = statistics.median(c.dirty_kib_after for c in p.cycles) / 1024
    out["cycles"] = [asdict(c) for c in p.cycles]
    return out


def cow_size_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per volume size: setup-snapshot and transition-to-snapshot with the default COW size over
    the same with SMALL_FALLOC_MIB (both medians): what the COW file's size costs."""
    small = {p["size_mib"]: p for p in points if p["series"] == "volume" and p["falloc_arg"]}
    rows = []
    for p in points:
        if p["series"] != "volume" or p["falloc_arg"] or p["size_mib"] not in small:
            continue
        s = small[p["size_mib"]]
        row = {"size_mib": p["size_mib"], "cow_mib": p["cow_setup_mib"], "small_cow_mib": s["cow_setup_mib"]}
        for op in ("setup", "to_snapshot"):
            row[f"{op}_ratio"] = p[op]["median"] / s[op]["median"]
        rows.append(row)
    return rows


def print_report(results: dict[str, Any]) -> None:
    print(f"\n{'series':<7}{'size MiB':>9}{'-f':>4}{'dirty MiB':>10}{'COW MiB':>9}", end="")
    for op in OPS:
        print(f"{op + ' ms (min-max)':>32}", end="")
    print()
    for p in results.get("points", []):
        print(
            f"{p['series']:<7}{p['size_mib']:>9}{p['falloc_arg']:>4}{p['dirty_mib_before']:>10.1f}"
            f"{p['cow_setup_mib']:>9.1f}",
            end="",
        )
        for op in OPS:
            s = p[op]
            print(f"{s['median']:>14.1f} ({s['min']:7.1f}-{s['max']:7.1f})", end="")
        print()
    for r in results.get("cow_size", []):
        print(
            f"{r['size_mib']} MiB: default COW file {r['cow_mib']:.0f} MiB against {r['small_cow_mib']:.0f}: "
            f"setup-snapshot x{r['setup_ratio']:.2f}, transition-to-snapshot x{r['to_snapshot_ratio']:.2f}"
        )
    for p in results.get("points", []):
        if p["series"] == "volume":
            print(
                f"{p['size_mib']} MiB -f {p['falloc_arg']}: module memory {p['memory_kib_snapshot']:.0f} KiB "
                f"in snapshot mode ({p['memory_mib_per_tib_snapshot']:.1f} MiB per TiB), "
                f"{p['memory_kib_incremental']:.0f} KiB incremental "
                f"({p['memory_mib_per_tib_incremental']:.1f} MiB per TiB)"
            )


def host_allocated_mib(g: Guest) -> float:
    """What the sparse data disk really takes on the host (st_blocks are 512-byte units)."""
    return os.stat(g.disks[0].host_path).st_blocks * 512 / MIB


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default="debian-6.1")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES_MIB} MiB, one run per point")
    p.add_argument("--repeat", type=int, default=None, help="runs per point (default 3; quick: 1)")
    p.add_argument("--sizes", default=None, help="volume sizes in MiB, comma-separated (default: the full "
                   "sizes, or the quick ones with --quick)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    sizes: tuple[int, ...] = QUICK_SIZES_MIB if args.quick else FULL_SIZES_MIB
    if args.sizes:
        sizes = tuple(sorted(int(x) for x in args.sizes.split(",")))
    repeat = args.repeat or (1 if args.quick else 3)
    disk_mib = max(sizes)
    results: dict[str, Any] = {"target": args.target, "repeat": repeat, "sizes_mib": list(sizes)}
    results |= {"disk_mib": disk_mib, "small_falloc_mib": SMALL_FALLOC_MIB, "target_ms": SETUP_TARGET_MS}
    results |= {"cow_ratio_target": COW_RATIO_TARGET, "target_volume_mib": TARGET_VOLUME_MIB}
    results |= {"dirty_volume_mib": DIRTY_VOLUME_MIB, "guest_memory_mib": GUEST_MEMORY_MIB}
    results["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
    g = Guest(
        target=args.target,
        disks=[DiskSpec(disk_mib)],
        memory_mib=GUEST_MEMORY_MIB,
        module=False,
        name="bench-snapshot-latency",
    )
    failed = True
    try:
        boot_and_describe(g, results)
        print(f"accelerator {results['accel'].upper()}, guest kernel {results['guest_kernel']}, "
              f"{disk_mib} MiB sparse data disk, boot {g.boot_seconds:.1f} s")  # fmt: skip
        g.load_module(debug=0)
        points = bench(g, sizes, repeat)
        results["points"] = [summarize(pt) for pt in points]
        results["cow_size"] = cow_size_rows(results["points"])
        results["host_disk_allocated_mib"] = host_allocated_mib(g)
        failed = False
    except (BenchError, GuestCommandError, GuestError) as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
    finally:
        failed = finish_guest(g, failed, results)
    print_report(results)
    if "host_disk_allocated_mib" in results:
        print(f"host: the {disk_mib} MiB data disk took {results['host_disk_allocated_mib']:.0f} MiB")
    return finish_run(results, args.json, failed)


if __name__ == "__main__":
    sys.exit(main())
