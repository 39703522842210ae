#!/usr/bin/env python3
"""Benchmark update-img's block copy against a full ``dd bs=1M`` copy of the same snapshot.

A synthetic snapshot file (incompressible data, so reads cost real I/O) and index-only COW files with
1 %, 10 % and 50 % of the blocks changed, scattered (single blocks) or clustered (1 MiB runs), are
built in a scratch directory. The full copy (``dd`` onto an empty file) runs first; its result is
the image that every update-img case then updates in place, as after an initial backup. Each copy
runs in a fresh child process, so its peak RSS is the copy's own, and is timed including a final
fsync of the image (``dd`` gets ``conv=fsync``). When running as root the page cache is dropped
before every timed run; the output says whether that happened. Each case runs ``--repeat`` times
and the median is reported, because a VM's disk is noisy.

Targets reported against: 1 % scattered at least 20x faster than the full copy; clustered changes
at >= 70 % of the full copy's bandwidth; peak RSS of the copy < 64 MiB. Nothing is asserted.

    python benchmarks/update_img.py [--size 1G] [--repeat 3] [--dir DIR] [--keep] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydbd import updateimg
from pydbd.cow import BLOCK_SIZE, build_cow_file

UUID = bytes(range(16))
CLUSTER_BLOCKS = 256  # 1 MiB runs for the clustered cases
MIB = 1024 * 1024


@dataclass(frozen=True)
class Timing:
    seconds: float
    max_rss_kib: int


@dataclass(frozen=True)
class Row:
    case: str
    blocks: int
    timing: Timing


# ---------------------------------------------------------------- child process: one timed copy


def child_main(snapshot: str, cow: str, image: str, per_block: bool) -> int:
    """Run update-img's copy once; print ``seconds max_rss_kib`` on stdout."""
    if per_block:
        updateimg.MAX_RUN_BLOCKS = 1  # what upstream does: one 4 KiB read and write per block
    info = SimpleNamespace(uuid=UUID, seqid=2)
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        rc = updateimg.run(
            snapshot,
            cow,
            image,
            info_lookup=lambda m: info,
            minor_resolver=lambda p: 0,
            out=quiet,
            progress=False,
        )
    fsync_path(image)
    seconds = time.perf_counter() - start
    print(f"{seconds} {peak_rss_kib()}")
    return rc


def peak_rss_kib() -> int:
    """This process's own peak RSS. getrusage's ru_maxrss is not used because Linux carries the
    parent's peak over fork and exec, so it would report the benchmark process instead."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- parent: setup and measurement


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    suffix = text[-1:].upper()
    value = int(text[:-1]) * units[suffix] if suffix in units else int(text)
    if value < CLUSTER_BLOCKS * BLOCK_SIZE * 4 or value % BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 4096 and at least 4 MiB: {text}")
    return value


def write_snapshot(path: Path, size: int) -> None:
    """Incompressible contents, written in 4 MiB pieces to keep this process small."""
    with open(path, "wb") as f:
        left = size
        while left:
            piece = min(left, 4 * MIB)
            f.write(os.urandom(piece))
            left -= piece
        f.flush()
        os.fsync(f.fileno())


def fresh_image(path: Path, size: int) -> None:
    """An empty sparse file of the right size: the target of the full copy. Its result, a fully
    allocated image as after the initial backup, is then the image that update-img updates in place."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def scattered(nblocks: int, percent: int, rng: random.Random) -> list[int]:
    return rng.sample(range(nblocks), nblocks * percent // 100)


def clustered(nblocks: int, percent: int, rng: random.Random) -> list[int]:
    clusters = nblocks // CLUSTER_BLOCKS
    chosen = rng.sample(range(clusters), max(1, clusters * percent // 100))
    return [c * CLUSTER_BLOCKS + i for c in sorted(chosen) for i in range(CLUSTER_BLOCKS)]


def cases(nblocks: int) -> Iterator[tuple[str, list[int], bool]]:
    rng = random.Random(4776)
    for percent in (1, 10, 50):
        yield f"{percent}% scattered", scattered(nblocks, percent, rng), False
        yield f"{percent}% clustered", clustered(nblocks, percent, rng), False
    yield "10% clustered, 4 KiB I/O", clustered(nblocks, 10, rng), True
    yield "1% scattered, 4 KiB I/O", scattered(nblocks, 1, rng), True


def time_child(snapshot: Path, cow: Path, image: Path, per_block: bool) -> Timing:
    cmd = [sys.executable, __file__, "--child", str(snapshot), str(cow), str(image)]
    if per_block:
        cmd.append("--per-block")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return Timing(float(out[0]), int(out[1]))


def time_dd(snapshot: Path, image: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["dd", f"if={snapshot}", f"of={image}", "bs=1M", "conv=notrunc,fsync", "status=none"],
        check=True,
    )
    return time.perf_counter() - start


def median_timing(timings: list[Timing]) -> Timing:
    """The median time (the VM's disk is noisy) and the largest peak RSS seen."""
    return Timing(statistics.median(t.seconds for t in timings), max(t.max_rss_kib for t in timings))


def measure(work: Path, size: int, repeat: int) -> tuple[Timing, list[Row], bool]:
    snapshot, image, cow = work / "snapshot", work / "image", work / "old.cow"
    print(f"writing a {size // MIB} MiB snapshot in {work} ...", flush=True)
    write_snapshot(snapshot, size)
    dropped = True
    dd_times = []
    for _ in range(repeat):
        fresh_image(image, size)
        dropped &= drop_caches()
        dd_times.append(Timing(time_dd(snapshot, image), 0))
    dd = median_timing(dd_times)
    print(f"  dd: {dd.seconds:.3f} s", flush=True)
    rows = []
    for name, blocks, per_block in cases(size // BLOCK_SIZE):
        build_cow_file(cow, size // 512, mode="incremental", changes=blocks, uuid=UUID, seqid=1)
        timings = []
        for _ in range(repeat):
            dropped &= drop_caches()
            timings.append(time_child(snapshot, cow, image, per_block))
        rows.append(Row(name, len(blocks), median_timing(timings)))
        print(f"  {name}: {rows[-1].timing.seconds:.3f} s", flush=True)
    return dd, rows, dropped


# ---------------------------------------------------------------- report


def print_table(size: int, dd: Timing, rows: list[Row], dropped: bool) -> None:
    dd_rate = size / dd.seconds / MIB
    print()
    print(
        f"snapshot size {size // MIB} MiB; page cache dropped before each run: {'yes' if dropped else 'no'}"
    )
    header = ("case", "blocks", "seconds", "MB/s", "x faster", "bw vs dd", "RSS MiB")
    print(f"{header[0]:<28} " + " ".join(f"{h:>9}" for h in header[1:]))
    dd_cells = (size // BLOCK_SIZE, f"{dd.seconds:.3f}", f"{dd_rate:.1f}", "1.00", "100%", "-")
    print(f"{'dd bs=1M (full copy)':<28} " + " ".join(f"{c:>9}" for c in dd_cells))
    for row in rows:
        rate = row.blocks * BLOCK_SIZE / row.timing.seconds / MIB
        print(
            f"{row.case:<28} {row.blocks:>8} {row.timing.seconds:>9.3f} {rate:>9.1f} "
            f"{dd.seconds / row.timing.seconds:>9.2f} {rate / dd_rate:>9.0%} "
            f"{row.timing.max_rss_kib / 1024:>9.1f}"
        )
    peak = max(row.timing.max_rss_kib for row in rows) / 1024
    print(f"\npeak RSS of the update-img copies: {peak:.1f} MiB (target < 64 MiB)")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this benchmark process: {own:.1f} MiB")
    print_targets(dd, rows, dd_rate)


def print_targets(dd: Timing, rows: list[Row], dd_rate: float) -> None:
    by_name = {row.case: row for row in rows}
    one = by_name["1% scattered"]
    print(f"target 1% scattered >= 20x faster than dd: {dd.seconds / one.timing.seconds:.1f}x")
    for row in rows:
        if row.case.endswith("% clustered"):
            rate = row.blocks * BLOCK_SIZE / row.timing.seconds / MIB
            print(f"target {row.case} >= 70% of dd bandwidth: {rate / dd_rate:.0%}")


def to_json(size: int, repeat: int, dd: Timing, rows: list[Row], dropped: bool) -> dict[str, Any]:
    """The numbers of print_table as a JSON document."""
    dd_rate = size / dd.seconds / MIB
    cases = []
    for row in rows:
        rate = row.blocks * BLOCK_SIZE / row.timing.seconds / MIB
        cases.append(
            {
                "case": row.case,
                "blocks": row.blocks,
                "seconds": row.timing.seconds,
                "mib_s": rate,
                "x_faster_than_dd": dd.seconds / row.timing.seconds,
                "bw_vs_dd": rate / dd_rate,
                "max_rss_mib": row.timing.max_rss_kib / 1024,
            }
        )
    return {
        "size_mib": size / MIB,
        "repeat": repeat,
        "page_cache_dropped": dropped,
        "dd": {"seconds": dd.seconds, "mib_s": dd_rate},
        "cases": cases,
        "targets": {"1% scattered x faster": 20, "clustered bw vs dd": 0.7, "max_rss_mib": 64},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=1024 * MIB, help="snapshot size (e.g. 256M, 1G)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("SNAP", "COW", "IMAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--per-block", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        snap, cow, image = args.child
        return child_main(snap, cow, image, args.per_block)
    work = Path(tempfile.mkdtemp(prefix="update-img-bench-", dir=args.dir or "/var/tmp"))
    try:
        dd, rows, dropped = measure(work, args.size, max(1, args.repeat))
        print_table(args.size, dd, rows, dropped)
        if args.json is not None:
            doc = to_json(args.size, max(1, args.repeat), dd, rows, dropped)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"results written to {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
