"""The period of a COW file in the block trace: what the workload wrote, discarded or zeroed below
the filesystem between the markers of its device (guestlib.discards), for the change-list oracles."""

from __future__ import annotations

import os

from guestlib import cowchain, discards, oracles
from pydbd import cowview


def device_of(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return cowview.device_of(fd, path)
    finally:
        os.close(fd)


def written_below(cow: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """What the workload wrote, discarded or zeroed below the filesystem in the period of ``cow``
    (traced by guestlib.discards), as (the blocks every change list must mark, the blocks that
    may explain a marked one besides). The period is cut by the markers of its device: it starts
    where its snapshot was taken (or its COW file's creation began: explains only) and ends where
    the next snapshot's COW file's creation began; after that only what lies outside the new COW
    file explains (the rest is its creation: a preallocation is no change; the previous change
    list, written for update-img after the freeze, is the next period's)."""
    device = device_of(cow)
    st_dev = os.stat(cow).st_dev
    live = sorted(cowchain.live_extents(st_dev))
    start, taken = discards.mark_for(st_dev), discards.mark_for(st_dev, taken=True)
    segs = discards.segments(device, "WDN", (start, taken))
    starts = [i for i, (mark, _) in enumerate(segs) if mark == start]
    if not starts:  # no marker: the whole trace counts
        return [run for _, runs in segs for run in runs], []
    first, last = (starts[-2] if len(starts) > 1 else 0), starts[-1]
    taken_at = next((i for i in range(first + 1, last) if segs[i][0] == taken), first)

    def runs_of(lo: int, hi: int) -> list[tuple[int, int]]:
        return [run for _, runs in segs[lo:hi] for run in runs]

    newest = [
        (b, 1) for f, n in runs_of(last, len(segs)) for b in range(f, f + n) if not oracles.touches(b, live)
    ]
    return runs_of(taken_at, last), runs_of(first, taken_at) + newest
