#!/usr/bin/env python3
"""Backup round cost against volume size: what update-img copies for a fixed change.

One guest per volume size, with two sparse virtio disks of that size: the volume (/dev/vdb, ext4 with
lazy inode tables, mounted ``noinit_itable`` so that no background zeroing joins a round) and the
backup disk (/dev/vdc, ext4), which holds the backup image as a sparse file of the volume's size
standing for the full copy (update-img writes only the blocks it copies). The seed README's cycle:

1. setup-snapshot with the default COW size (``-f 0``: 10 % of the volume), transition-to-incremental;
2. per change, smallest first: a new file of that many bytes from /dev/urandom, ``sync``; the
   module's count of changed blocks (info nr_changed_blocks); transition-to-snapshot with a new COW
   file (default size); update-img from the old COW file into the image, timed; the number of
   blocks it copied (its "copying complete" line); transition-to-incremental; the old COW file
   deleted.

A round's cost is what it copies: every block the change wrote, plus whatever else the module
reported (file system metadata, and anything a design that grows with the volume would add). The
target, reported and not asserted: for the 1 MiB change, copied at most the change's blocks plus 64.
Changes larger than ``--max-change-mib`` are skipped (10 % of a TiB would take hours under TCG).

    .venv/bin/python benchmarks/round_cost.py [--target debian-6.1] [--sizes 1024,8192,65536]
        [--max-change-mib 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestcmd import BenchError, boot_and_describe, finish_guest, finish_run, run
from harness.errors import GuestCommandError, GuestError
from harness.guest import Guest
from harness.qemu import DiskSpec

MNT = "/mnt/vol"
BACKUPS = "/backups"
IMAGE = f"{BACKUPS}/img"
MIB = 1024 * 1024
BLOCK = 4096
PY = "PYTHONPATH=/src python3"
DBDCTL = f"{PY} -m pydbd.dbdctl"
UPDATE_IMG = f"{PY} -m pydbd.updateimg"
FULL_SIZES_MIB = (1024, 8192, 65536)
CHANGES = ("1M", "1%", "10%")
SPURIOUS_TARGET = 64  # blocks copied beyond the change's own for the 1 MiB round
COPIED_RE = re.compile(r"copying complete: (\d+) blocks changed")


@dataclass
class Round:
    size_mib: int
    change: str  # as given: "1M" or a share of the volume
    change_mib: int
    written_blocks: int  # the change's own blocks
    nr_changed: int  # what the module counted before transition-to-snapshot
    copied: int  # what update-img copied
    update_img_s: float
    to_snapshot_ms: float  # the dbdctl call, Python start-up included

    @property
    def extra(self) -> int:
        return self.copied - self.written_blocks


def change_mib(change: str, size_mib: int) -> int:
    if change.endswith("%"):
        return max(1, size_mib * int(change[:-1]) // 100)
    if change.endswith("M"):
        return int(change[:-1])
    raise ValueError(f"change {change!r}: give MiB as 1M or a share of the volume as 1%")


def dbdctl_ms(g: Guest, args: str) -> float:
    start = time.monotonic()
    run(g, f"{DBDCTL} {args}", timeout=1800)
    return (time.monotonic() - start) * 1000


def nr_changed(g: Guest) -> int:
    out = run(g, f"{PY} -c 'from pydbd.control import Control; print(Control().info(0).nr_changed_blocks)'")
    return int(out.stdout.split()[-1])


def bench_size(target: str, size_mib: int, changes: list[str], results: dict[str, Any]) -> list[Round]:
    g = Guest(
        target=target,
        disks=[DiskSpec(size_mib), DiskSpec(size_mib)],
        module=False,
        name=f"bench-round-cost-{size_mib}",
    )
    rounds: list[Round] = []
    failed = True
    try:
        boot_and_describe(g, results)
        g.load_module(debug=0)
        run(g, f"mkfs.ext4 -q -F -O ^orphan_file -E lazy_itable_init=1 /dev/vdb && mkdir -p {MNT}", 1800)
        run(g, f"mount -o noinit_itable /dev/vdb {MNT}")
        run(
            g,
            f"mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p {BACKUPS} && mount /dev/vdc {BACKUPS}",
            1800,
        )
        run(g, f"truncate -s {size_mib}M {IMAGE}")
        dbdctl_ms(g, f"setup-snapshot /dev/vdb {MNT}/.datto0 0")
        dbdctl_ms(g, "transition-to-incremental 0")
        for n, change in enumerate(changes, start=1):
            mib = change_mib(change, size_mib)
            run(g, f"dd if=/dev/urandom of={MNT}/change{n} bs=1M count={mib} status=none && sync", 3600)
            counted = nr_changed(g)
            to_snap = dbdctl_ms(g, f"transition-to-snapshot {MNT}/.datto{n} 0")
            start = time.monotonic()
            out = run(g, f"{UPDATE_IMG} /dev/datto0 {MNT}/.datto{n - 1} {IMAGE}", 3600).stdout
            took = time.monotonic() - start
            m = COPIED_RE.search(out)
            if not m:
                raise BenchError(f"update-img printed no 'copying complete' line:\n{out[-2000:]}")
            r = Round(size_mib, change, mib, mib * MIB // BLOCK, counted, int(m.group(1)), took, to_snap)
            rounds.append(r)
            print(
                f"  {size_mib:>7} MiB  change {change:>4} ({mib} MiB, {r.written_blocks} blocks): "
                f"module counted {counted}, update-img copied {r.copied} ({r.extra:+d}) in {took:.1f} s; "
                f"transition-to-snapshot {to_snap:.0f} ms",
                flush=True,
            )
            dbdctl_ms(g, "transition-to-incremental 0")
            run(g, f"rm -f {MNT}/.datto{n - 1}")
        run(g, f"{DBDCTL} destroy 0")
        failed = False
    except (BenchError, GuestCommandError, GuestError) as e:
        print(f"\nFAILED ({size_mib} MiB): {e}", file=sys.stderr)
    finally:
        failed = finish_guest(g, failed, results)
    if failed:
        raise BenchError(f"the {size_mib} MiB volume's rounds failed")
    return rounds


def print_report(rounds: list[dict[str, Any]]) -> None:
    header = ("volume MiB", "change", "written", "counted", "copied", "extra", "update-img s")
    print("\n" + " ".join(f"{h:>12}" for h in header))
    for r in rounds:
        print(
            f"{r['size_mib']:>12} {r['change']:>12} {r['written_blocks']:>12} {r['nr_changed']:>12} "
            f"{r['copied']:>12} {r['copied'] - r['written_blocks']:>+12} {r['update_img_s']:>12.1f}"
        )


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default="debian-6.1")
    p.add_argument("--sizes", default=",".join(map(str, FULL_SIZES_MIB)), help="volume sizes, MiB")
    p.add_argument("--changes", default=",".join(CHANGES), help="changes per round: 1M, 1%%, ...")
    p.add_argument("--max-change-mib", type=int, default=8192, help="skip larger changes")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    sizes = sorted(int(x) for x in args.sizes.split(","))
    results: dict[str, Any] = {"target": args.target, "sizes_mib": sizes, "spurious_target": SPURIOUS_TARGET}
    results["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
    rounds: list[Round] = []
    failed = False
    for size in sizes:
        changes = [c for c in args.changes.split(",") if change_mib(c, size) <= args.max_change_mib]
        print(f"volume {size} MiB, changes {', '.join(changes)} ...", flush=True)
        try:
            rounds += bench_size(args.target, size, changes, results)
        except BenchError:
            failed = True
            break
    results["rounds"] = [asdict(r) for r in rounds]
    print_report(results["rounds"])
    return finish_run(results, args.json, failed)


if __name__ == "__main__":
    sys.exit(main())
