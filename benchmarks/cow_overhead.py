#!/usr/bin/env python3
"""Write overhead of tracking: fio in ONE guest, untracked vs active snapshot vs incremental.

One guest boots with a raw scratch disk (/dev/vdb), made ext4 without lazy init (no background
writes) and mounted at /mnt/vol. The module is loaded with debug=0. Two fio jobs, one job each,
iodepth 1, direct=1, psync, fixed size (``--seq-size``, ``--rand-size``) with a runtime cap
(``--runtime``; none for first-write passes, which must cover every block); repeatable phases run
each job ``--repeat`` times and report the median run. With ``--time-based S`` every run of a
repeatable phase lasts S seconds instead, looping over its file (short passes are noisy under TCG):

* seqwrite: sequential 1 MiB writes over ``seq.dat``;
* randwrite: random 4 KiB writes over ``rand.dat`` (fio's random map: every block once per pass,
  and the same order in every pass, so a rewrite pass touches exactly the blocks of the first one).

Paired runs (default; ``--no-pair`` turns them off): a second disk of the same size gets the same
file system and files at /mnt/ref and is never tracked; every measured run is paired with the same
job on it, run right after it (on odd repeats right before it; a one-run first-write phase gets one
reference run before and one after, and their mean), and a phase's ratio is the median of its
pairs' tracked / untracked ratios. The host is shared and TCG speed follows its load within
seconds, so pairs cancel the drift that a baseline measured minutes earlier cannot; the untracked
phases' pair ratios (ideally 1.0) show the noise that remains.

Both files are laid out with data (a sequential fio write pass, then sync) before anything is
measured, so no phase pays for block allocation or unwritten-extent conversion; one unreported
warm-up pass of each job follows. The phases, in order:

1. baseline: nothing tracked (module loaded);
2. snapshot, first writes: setup-snapshot (with a COW preallocation large enough for all the data),
   then each job once: every block written is written for the first time since the snapshot (COW);
3. snapshot, rewrites: the same jobs again: every block is already preserved;
4. incremental: transition-to-incremental, the same jobs again;
5. baseline again after destroy (drift check: the host is shared and TCG speed follows its load);
6. dm-origin, no snapshot: the file system is unmounted and mounted again through a device-mapper
   ``snapshot-origin`` target over the same disk (same files, same blocks), nothing tracked yet;
7. dm-snapshot, first writes: origin suspended, a ``snapshot`` target created over the same disk
   with a separate COW disk (/dev/vdc, persistent ``P``, chunk size 8 sectors = 4 KiB, like our
   4 KiB blocks), origin resumed; then each job once (every chunk written is copied first);
8. dm-snapshot, rewrites: the same jobs again (every chunk already copied); then the snapshot and
   the origin are removed and the disk is mounted directly again;
9. dm-thin, no snapshot: a thin pool on another scratch disk (split by two ``linear`` targets into
   metadata and data, as LVM splits a physical volume into a pool's metadata and data volumes; block
   size 128 sectors = 64 KiB, the smallest dm-thin allows and lvcreate's default for a pool this
   size; block zeroing on, the kernel's and LVM's default), a thin volume of the tracked volume's size
   in it, given the same file system and files the same way (mkfs, fio layout pass, sync, one
   unreported warm-up pass), mounted at /mnt/thin; nothing shared yet;
10. dm-thin, first writes: the thin volume suspended (which freezes the file system), an internal
   snapshot taken (``create_snap``, not activated: lvcreate marks thin snapshots to skip activation
   too), resumed; then each job once: every 64 KiB block first written after the snapshot is shared
   and gets a new block (copied first unless the write covers the whole block);
11. dm-thin, rewrites: the same jobs again (every block already unshared); then everything removed;
12. baseline at end (second drift check).

``--no-dm`` skips phases 6 to 8, ``--no-thin`` phases 9 to 11 (phase 12 runs if either ran). The dm
COW disk gets as much room as our COW preallocation, and its fill (``dmsetup status``) is recorded;
an overflowed (invalid) snapshot stops the benchmark, because its later writes would no longer be
copied. The thin pool's data gets twice the thin volume's size (``--thin-data``), so it can never
run out (the volume fully written, then fully unshared); its fill is recorded, and a pool that is
not read-write (out of data space, failed) stops the benchmark. No thin-provisioning-tools are
needed: dmsetup creates the pool on a zeroed metadata device and the kernel formats it; only LVM
runs thin_check at activation.

Then setup-snapshot latency: median of ``--setup-rounds`` setup/destroy cycles with a small fixed
``-f`` (timed around the dbdctl command in the guest, which includes the guest Python start-up, and
around the ioctl alone), with the preallocation the module reports (info falloc_size).

Targets reported against (nothing is asserted): bandwidth ratio to the baseline for first writes
>= 0.3 and above dm-snapshot's first-write ratio, rewrites >= 0.9, incremental >= 0.95;
setup-snapshot < 200 ms plus the COW preallocation; dm-thin's first-write ratio is reported beside
dm-snapshot's (no target: its unit of copy differs, see above). Every ratio, the peers' included, is the
median of the phase's paired ratios (see above); with ``--no-pair``, the ratio to the median of all
runs of the three untracked series (at the start, after destroy, at the end). The noise reported is
how far the untracked phases' ratios stray from 1.

    .venv/bin/python benchmarks/cow_overhead.py [--target debian-6.1] [--repeat 3] [--no-dm] [--no-thin]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestcmd import BenchError, boot_and_describe, finish_guest, run
from harness.errors import GuestCommandError, GuestError
from harness.guest import CommandResult, Guest
from harness.qemu import DiskSpec

MNT = "/mnt/vol"
REF_MNT = "/mnt/ref"  # the untracked reference volume: same size, file system and files, never tracked
DEV = "/dev/vdb"
DM_COW_DEV = "/dev/vdc"  # the dm-snapshot exception store (a second data disk)
DM_ORIGIN = "bench-origin"  # dm names: /dev/mapper/bench-origin, /dev/mapper/bench-snap
DM_SNAP = "bench-snap"
DM_CHUNK_SECTORS = 8
COW = f"{MNT}/.datto"
MINOR = 0
DBDCTL = "PYTHONPATH=/src python3 -m pydbd.dbdctl"
MIB = 1024 * 1024

TARGETS = {"snapshot first write": 0.3, "snapshot rewrite": 0.9, "incremental": 0.95}
# Our first writes must also beat this phase's ratio (same job, same run).
PEER_FIRST_WRITE = "dm-snapshot first write"
THIN_FIRST_WRITE = "dm-thin first write"
# Every peer's first-write phase, reported beside ours (key in the JSON: phase).
PEERS = {"dm_snapshot": PEER_FIRST_WRITE, "dm_thin": THIN_FIRST_WRITE}

# dm-thin: a pool on one scratch disk split into metadata and data, one thin volume, one snapshot.
THIN_MNT = "/mnt/thin"
THIN_META, THIN_DATA = "bench-thin-meta", "bench-thin-data"
THIN_POOL, THIN_VOL = "bench-pool", "bench-thin"
THIN_META_MIB = 16  # thin_metadata_size puts a few MiB for this pool; LVM's minimum is 2 MiB
THIN_BLOCK_SECTORS = 128  # 64 KiB
THIN_ORIGIN_ID, THIN_SNAP_ID = 0, 1
METADATA_BLOCK = 4096  # dm-thin metadata block size (dmsetup status counts these)
SETUP_TARGET_MS = 200.0


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    filename: str
    size_mib: int


def make_jobs(seq_mib: int, rand_mib: int) -> tuple[Job, ...]:
    return (
        Job("seqwrite 1M", "write", "1M", f"{MNT}/seq.dat", seq_mib),
        Job("randwrite 4k", "randwrite", "4k", f"{MNT}/rand.dat", rand_mib),
    )


@dataclass(frozen=True)
class FioResult:
    job: str
    phase: str
    bw_mib_s: float
    iops: float
    clat_p50_us: float
    clat_p99_us: float
    io_mib: float
    runtime_s: float
    runs_mib_s: tuple[float, ...] = ()  # every repeat's bandwidth; the row is the median run
    # Paired runs: each repeat also ran on the untracked reference volume right before or after;
    # per pair the tracked / reference bandwidth and p50/p99 completion latency, and its bandwidth.
    paired_bw: tuple[float, ...] = ()
    paired_p50: tuple[float, ...] = ()
    paired_p99: tuple[float, ...] = ()
    ref_mib_s: tuple[float, ...] = ()
    # every reference run's bandwidth, in order: a one-run phase's mean hides a slow run before it
    ref_runs_mib_s: tuple[float, ...] = ()


@dataclass
class TracerState:
    phase: str
    state: int
    error: int
    nr_changed_blocks: int
    falloc_size: int


@dataclass
class DmState:
    """`dmsetup status` of the dm snapshot: used/total sectors of the COW device, metadata sectors."""

    phase: str
    status: str
    used_sectors: int
    total_sectors: int
    metadata_sectors: int


@dataclass
class ThinState:
    """`dmsetup status` of the thin pool: used/total data blocks (THIN_BLOCK_SECTORS each) and
    metadata blocks (4 KiB each), and its mode (rw unless out of space or failed)."""

    phase: str
    status: str
    data_used_blocks: int
    data_total_blocks: int
    metadata_used_blocks: int
    metadata_total_blocks: int
    mode: str


@dataclass
class SetupLatency:
    fallocate_mib: int
    falloc_size_bytes: int
    dbdctl_ms: list[float] = field(default_factory=list)
    ioctl_ms: list[float] = field(default_factory=list)
    python_startup_ms: list[float] = field(default_factory=list)
    prealloc_ref_ms: list[float] = field(default_factory=list)  # fallocate + zero-fill + fsync, same size


# ---------------------------------------------------------------- guest commands


def tracer_info(g: Guest, phase: str) -> TracerState:
    r = run(g, f"{DBDCTL} info {MINOR} --json")
    d = json.loads(r.stdout)
    return TracerState(phase, int(d["state"]), int(d["error"]), int(d["nr_changed_blocks"]),
                       int(d["falloc_size"]))  # fmt: skip


def fio_cmd(job: Job, runtime: int, timed: bool = False) -> str:
    """The fio command of a job; runtime 0: no cap (the whole file is written once); timed: run
    for `runtime` seconds, looping over the file (only for phases where a block may be rewritten)."""
    cap = f"--runtime={runtime} " if runtime else ""
    if timed:
        cap = f"--time_based --runtime={runtime} "
    return (
        f"fio --name=bench --filename={job.filename} --rw={job.rw} --bs={job.bs} --size={job.size_mib}M "
        f"--direct=1 --ioengine=psync --iodepth=1 --numjobs=1 --randrepeat=1 {cap}--output-format=json"
    )


def parse_fio(text: str, job: str, phase: str) -> FioResult:
    start = text.find("{")  # fio may print notes before the JSON document
    if start < 0:
        raise BenchError(f"no JSON in fio output for {job} / {phase}:\n{text[-2000:]}")
    doc = json.loads(text[start:])
    w = doc["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return FioResult(
        job=job,
        phase=phase,
        bw_mib_s=w["bw_bytes"] / MIB,
        iops=w["iops"],
        clat_p50_us=pct.get("50.000000", 0) / 1000,
        clat_p99_us=pct.get("99.000000", 0) / 1000,
        io_mib=w["io_bytes"] / MIB,
        runtime_s=w["runtime"] / 1000,
    )


FIRST_WRITE_TIMEOUT = 3600.0  # a first-write pass runs uncapped; this only catches a hung guest


def on_volume(job: Job, mountpoint: str) -> Job:
    return replace(job, filename=job.filename.replace(MNT, mountpoint, 1))


def fio_once(g: Guest, job: Job, runtime: int, label: str, timed: bool = False) -> FioResult:
    run(g, "sync")
    r = run(g, fio_cmd(job, runtime, timed), timeout=runtime + 120 if runtime else FIRST_WRITE_TIMEOUT)
    res = parse_fio(r.stdout, job.name, label)
    print(
        f"  {label:<22} {job.name:<13} {res.bw_mib_s:8.2f} MiB/s  p50 {res.clat_p50_us:9.1f} us  "
        f"p99 {res.clat_p99_us:9.1f} us  ({res.io_mib:.0f} MiB in {res.runtime_s:.1f} s)",
        flush=True,
    )
    return res


def pair_ratio(a: float, refs: list[float]) -> float:
    """a over the mean of its reference runs; NaN where fio reported 0 (no such percentile)."""
    b = statistics.fmean(refs) if refs else 0.0
    return a / b if a and b else float("nan")


def run_jobs(
    g: Guest,
    phase: str,
    jobs: tuple[Job, ...],
    runtime: int,
    repeat: int,
    paired: bool = False,
    timed: bool = False,
) -> list[FioResult]:
    """Each job `repeat` times in a row; the run with the median bandwidth stands for the phase.
    runtime 0: no runtime cap, for first-write passes (a capped pass would leave blocks uncopied,
    and the rewrite phase after it would then pay for their first writes).
    paired: each run is paired with the same job on the untracked reference volume (REF_MNT), run
    right after it (odd repeats: right before it), so that host drift cancels in the ratio; a phase
    of one run (first writes) is sandwiched between two reference runs and compared with their mean.
    timed: every run lasts `runtime` seconds (fio --time_based), for phases that may rewrite blocks."""
    out = []
    for job in jobs:
        runs: list[FioResult] = []
        pairs: list[tuple[FioResult, list[FioResult]]] = []
        ref_job = on_volume(job, REF_MNT)
        label = "  (untracked reference)"
        for i in range(repeat):
            if not paired:
                runs.append(fio_once(g, job, runtime, phase, timed))
                continue
            if repeat == 1:
                before = fio_once(g, ref_job, runtime, label, timed)
                tracked = fio_once(g, job, runtime, phase, timed)
                refs = [before, fio_once(g, ref_job, runtime, label, timed)]
            elif i % 2 == 0:
                tracked = fio_once(g, job, runtime, phase, timed)
                refs = [fio_once(g, ref_job, runtime, label, timed)]
            else:
                refs = [fio_once(g, ref_job, runtime, label, timed)]
                tracked = fio_once(g, job, runtime, phase, timed)
            runs.append(tracked)
            pairs.append((tracked, refs))
        ranked = sorted(runs, key=lambda x: x.bw_mib_s)
        mid = ranked[(len(ranked) - 1) // 2]
        out.append(
            replace(
                mid,
                runs_mib_s=tuple(x.bw_mib_s for x in runs),
                paired_bw=tuple(pair_ratio(a.bw_mib_s, [b.bw_mib_s for b in bs]) for a, bs in pairs),
                paired_p50=tuple(pair_ratio(a.clat_p50_us, [b.clat_p50_us for b in bs]) for a, bs in pairs),
                paired_p99=tuple(pair_ratio(a.clat_p99_us, [b.clat_p99_us for b in bs]) for a, bs in pairs),
                ref_mib_s=tuple(statistics.fmean(b.bw_mib_s for b in bs) for _, bs in pairs),
                ref_runs_mib_s=tuple(b.bw_mib_s for _, bs in pairs for b in bs),
            )
        )
    return out


def ms_now_cmd(cmd: str) -> str:
    """Shell: run cmd, print its wall time in microseconds on stdout's last line; keep its exit status."""
    return (
        f's=$(date +%s%N); {cmd} >/dev/null; rc=$?; e=$(date +%s%N); echo "$(( (e - s) / 1000 ))"; exit $rc'
    )


def last_ms(r: CommandResult) -> float:
    return int(r.stdout.strip().splitlines()[-1]) / 1000


IOCTL_TIMER = """
import os, time
from pydbd.control import Control
os.sync()
with Control() as c:
    t = time.perf_counter()
    c.setup_snapshot({dev!r}, {cow!r}, {minor}, fallocated_mib={f})
    dt = time.perf_counter() - t
    c.destroy({minor})
result = dt * 1000
"""


def measure_setup(g: Guest, fallocate_mib: int, rounds: int) -> SetupLatency:
    lat = SetupLatency(fallocate_mib, 0)
    for _ in range(rounds):
        lat.python_startup_ms.append(last_ms(run(g, ms_now_cmd(f"{DBDCTL} get-free"))))
        run(g, "sync")
        r = run(g, ms_now_cmd(f"{DBDCTL} setup-snapshot -f {fallocate_mib} {DEV} {COW} {MINOR}"))
        lat.dbdctl_ms.append(last_ms(r))
        lat.falloc_size_bytes = tracer_info(g, "setup").falloc_size
        run(g, f"{DBDCTL} destroy {MINOR}")
        ref = f"{MNT}/prealloc.ref"
        fill = f"fallocate -l {fallocate_mib}M {ref} && dd if=/dev/zero of={ref} bs=1M count={fallocate_mib} "
        r = run(g, ms_now_cmd(f"{{ sync; {fill} conv=notrunc,fsync status=none; }}"))
        lat.prealloc_ref_ms.append(last_ms(r))
        run(g, f"rm -f {ref} && sync")
    for _ in range(rounds):
        code = IOCTL_TIMER.format(dev=DEV, cow=COW, minor=MINOR, f=fallocate_mib)
        try:
            lat.ioctl_ms.append(float(g.py(code)))
        except GuestError as e:
            raise BenchError(f"ioctl setup/destroy timing failed: {e}") from e
    return lat


# ---------------------------------------------------------------- device-mapper snapshot (the peer)


def dm_status(g: Guest, phase: str) -> DmState:
    """Parse `dmsetup status` of the snapshot: `0 LEN snapshot USED/TOTAL META`, or `Invalid`/`Overflow`
    when the COW device filled up (then every later write goes uncopied and the numbers mean nothing)."""
    line = run(g, f"dmsetup status {DM_SNAP}").stdout.strip()
    fields = line.split()
    if len(fields) < 5 or fields[2] != "snapshot" or "/" not in fields[3]:
        raise BenchError(
            f"dm-snapshot {DM_SNAP} is not valid {phase} (dmsetup status: {line!r}); its COW device "
            f"{DM_COW_DEV} is probably too small for the data written: raise --dm-cow"
        )
    used, total = fields[3].split("/")
    return DmState(phase, line, int(used), int(total), int(fields[4]))


def dm_mount_origin(g: Guest) -> None:
    """Mount the volume again through a snapshot-origin target over the same disk (no snapshot yet)."""
    run(g, "modprobe dm-snapshot")
    run(g, f"umount {MNT}")
    table = f"0 $(blockdev --getsz {DEV}) snapshot-origin {DEV}"
    run(g, f'dmsetup create {DM_ORIGIN} --table "{table}"')
    run(g, f"mount /dev/mapper/{DM_ORIGIN} {MNT}")


def dm_create_snapshot(g: Guest) -> float:
    """Take the snapshot as LVM does: suspend the origin (flushes and freezes the file system), create
    the snapshot target, resume the origin. Returns the wall time of the three commands, in ms."""
    table = f"0 $(blockdev --getsz {DEV}) snapshot {DEV} {DM_COW_DEV} P {DM_CHUNK_SECTORS}"
    create = f'dmsetup create {DM_SNAP} --table "{table}"'
    cmd = f"dmsetup suspend {DM_ORIGIN} && {create} && dmsetup resume {DM_ORIGIN}"
    r = run(g, ms_now_cmd(f"{{ {cmd}; }}"), timeout=300)
    return last_ms(r)


def dm_teardown(g: Guest) -> None:
    """Remove the snapshot and the origin and mount the disk directly again."""
    run(g, f"umount {MNT}")
    run(g, f"dmsetup remove {DM_SNAP} && dmsetup remove {DM_ORIGIN}", timeout=300)
    run(g, f"mount {DEV} {MNT}")


PeerState = TypeVar("PeerState")


@dataclass(frozen=True)
class PeerPhases(Generic[PeerState]):
    """How one peer is driven through the phases every peer goes through alike."""

    untracked: str  # fio label of the runs before the snapshot
    created: str  # status phase right after the snapshot is taken
    first_write: str  # fio label of the first (copying) pass
    rewrite: str  # fio label of the passes after it
    take_snapshot: Callable[[Guest], float]  # returns its wall time in ms
    status: Callable[[Guest, str], PeerState]


def fio_runtime(args: argparse.Namespace) -> tuple[int, bool]:
    """(seconds, time_based) of a timed fio pass: --time-based wins over --runtime."""
    return (args.time_based, True) if args.time_based else (args.runtime, False)


def run_peer(
    g: Guest, args: argparse.Namespace, jobs: tuple[Job, ...], fio: list[FioResult],
    states: list[PeerState], peer: PeerPhases[PeerState],
) -> float:  # fmt: skip
    """Untracked passes, the snapshot (timed, after a sync), one uncapped first-write pass (only the
    first pass copies), then the rewrite passes; the peer's status after each. Returns the ms the
    snapshot took."""
    rep, pair = args.repeat, args.paired
    rt, timed = fio_runtime(args)
    fio += run_jobs(g, peer.untracked, jobs, rt, rep, pair, timed)
    run(g, "sync")
    create_ms = peer.take_snapshot(g)
    states.append(peer.status(g, peer.created))
    fio += run_jobs(g, peer.first_write, jobs, 0, 1, pair)
    states.append(peer.status(g, "after first writes"))
    fio += run_jobs(g, peer.rewrite, jobs, rt, rep, pair, timed)
    states.append(peer.status(g, "after rewrites"))
    return create_ms


DM_PHASES = PeerPhases(
    "dm-origin, no snapshot",
    "after create",
    PEER_FIRST_WRITE,
    "dm-snapshot rewrite",
    dm_create_snapshot,
    dm_status,
)


def bench_dm(g: Guest, args: argparse.Namespace, jobs: tuple[Job, ...], results: dict[str, Any]) -> None:
    dm: list[DmState] = []
    results["dm"] = dm
    print(f"dm-snapshot: origin over {DEV}, COW device {DM_COW_DEV} ({args.dm_cow} MiB) ...", flush=True)
    run(g, "sync")
    dm_mount_origin(g)
    results["dm_create_ms"] = run_peer(g, args, jobs, results["fio"], dm, DM_PHASES)
    dm_teardown(g)


# ---------------------------------------------------------------- dm-thin snapshot (the second peer)


def sectors(mib: int) -> int:
    return mib * MIB // 512


def thin_status(g: Guest, phase: str) -> ThinState:
    """Parse the pool's `0 LEN thin-pool TID META_USED/TOTAL DATA_USED/TOTAL ROOT MODE ...`; a failed
    pool prints `Fail`, a full one `out_of_data_space` (its writes queue, then fail): stop then."""
    line = run(g, f"dmsetup status {THIN_POOL}").stdout.strip()
    f = line.split()
    if len(f) < 8 or f[2] != "thin-pool" or "/" not in f[4] or "/" not in f[5] or f[7] != "rw":
        raise BenchError(
            f"thin pool {THIN_POOL} is not read-write {phase} (dmsetup status: {line!r}); its data "
            "is probably too small for the data written: raise --thin-data"
        )
    meta_used, meta_total = f[4].split("/")
    data_used, data_total = f[5].split("/")
    return ThinState(phase, line, int(data_used), int(data_total), int(meta_used), int(meta_total), f[7])


def thin_pool_create(g: Guest, disk: str, data_mib: int) -> None:
    """The pool as LVM builds it: metadata and data on one disk (two linear targets), metadata
    zeroed first so that the kernel formats it (no thin-provisioning-tools involved)."""
    run(g, "modprobe dm-thin-pool")
    meta, data = f"/dev/mapper/{THIN_META}", f"/dev/mapper/{THIN_DATA}"
    run(g, f'dmsetup create {THIN_META} --table "0 {sectors(THIN_META_MIB)} linear {disk} 0"')
    run(
        g,
        f'dmsetup create {THIN_DATA} --table "0 {sectors(data_mib)} linear {disk} {sectors(THIN_META_MIB)}"',
    )
    run(g, f"dd if=/dev/zero of={meta} bs=1M count={THIN_META_MIB} oflag=direct status=none")
    # low water mark 0: it only raises a dm event for an autoextend daemon, and none runs here
    table = f"0 {sectors(data_mib)} thin-pool {meta} {data} {THIN_BLOCK_SECTORS} 0"
    run(g, f'dmsetup create {THIN_POOL} --table "{table}"')


def thin_volume_create(g: Guest, size_mib: int) -> str:
    """A thin volume of the tracked volume's size in the pool; returns its device."""
    run(g, f'dmsetup message {THIN_POOL} 0 "create_thin {THIN_ORIGIN_ID}"')
    table = f"0 {sectors(size_mib)} thin /dev/mapper/{THIN_POOL} {THIN_ORIGIN_ID}"
    run(g, f'dmsetup create {THIN_VOL} --table "{table}"')
    return f"/dev/mapper/{THIN_VOL}"


def thin_create_snapshot(g: Guest) -> float:
    """An internal snapshot as lvcreate takes one: suspend the origin (flushes and freezes the file
    system), send create_snap to the pool, resume. Returns the wall time of the three commands, in ms."""
    msg = f'dmsetup message {THIN_POOL} 0 "create_snap {THIN_SNAP_ID} {THIN_ORIGIN_ID}"'
    cmd = f"dmsetup suspend {THIN_VOL} && {msg} && dmsetup resume {THIN_VOL}"
    return last_ms(run(g, ms_now_cmd(f"{{ {cmd}; }}"), timeout=300))


def thin_teardown(g: Guest) -> None:
    run(g, f"umount {THIN_MNT}")
    names = (THIN_VOL, THIN_POOL, THIN_DATA, THIN_META)
    run(g, " && ".join(f"dmsetup remove {n}" for n in names), timeout=300)


THIN_PHASES = PeerPhases(
    "dm-thin, no snapshot",
    "after create_snap",
    THIN_FIRST_WRITE,
    "dm-thin rewrite",
    thin_create_snapshot,
    thin_status,
)


def bench_thin(g: Guest, args: argparse.Namespace, jobs: tuple[Job, ...], results: dict[str, Any]) -> None:
    thin: list[ThinState] = []
    results["thin"] = thin
    print(
        f"dm-thin: pool on {args.thin_dev} ({THIN_META_MIB} MiB metadata, {args.thin_data} MiB data, "
        f"{THIN_BLOCK_SECTORS // 2} KiB blocks), thin volume of {args.disk} MiB ...",
        flush=True,
    )
    thin_pool_create(g, args.thin_dev, args.thin_data)
    make_volume(g, thin_volume_create(g, args.disk), THIN_MNT, jobs, args.runtime)
    thin.append(thin_status(g, "after layout"))
    thin_jobs = tuple(on_volume(j, THIN_MNT) for j in jobs)
    # like the tracked volume, the first passes after the layout are not reported
    rt, timed = fio_runtime(args)
    run_jobs(g, "dm-thin warm-up (not reported)", thin_jobs, rt, 1, args.paired, timed)
    results["thin_create_ms"] = run_peer(g, args, thin_jobs, results["fio"], thin, THIN_PHASES)
    thin_teardown(g)


# ---------------------------------------------------------------- the benchmark


def cow_mib_needed(jobs: tuple[Job, ...], disk_mib: int) -> int:
    """COW preallocation for one first-write pass over both files: data, index (8 bytes per 4 KiB
    block of the device, plus a header), journal/metadata blocks, and slack."""
    index_mib = disk_mib * 256 * 8 // MIB + 1
    return sum(j.size_mib for j in jobs) + index_mib + 64


def make_volume(g: Guest, dev: str, mnt: str, jobs: tuple[Job, ...], runtime: int) -> None:
    """ext4 without lazy init (no background writes), mounted at mnt, the jobs' files laid out with
    data; every volume of the benchmark is made by this, so they hold the same files the same way."""
    run(g, f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {dev}", timeout=300)
    run(g, f"mkdir -p {mnt} && mount {dev} {mnt}")
    print("laying out " + ", ".join(f"{on_volume(j, mnt).filename} ({j.size_mib} MiB)" for j in jobs))
    for job in jobs:
        layout = f"--rw=write --bs=1M --size={job.size_mib}M --direct=1 --output-format=json"
        run(g, f"fio --name=layout --filename={on_volume(job, mnt).filename} {layout}", timeout=runtime + 300)
    run(g, "sync")


def bench(g: Guest, args: argparse.Namespace, results: dict[str, Any]) -> None:
    jobs, runtime, rep = make_jobs(args.seq_size, args.rand_size), args.runtime, args.repeat
    results["jobs"] = [asdict(j) for j in jobs]
    volumes = [(DEV, MNT)] + ([(args.ref_dev, REF_MNT)] if args.paired else [])
    for dev, mnt in volumes:
        make_volume(g, dev, mnt, jobs, runtime)
    fio: list[FioResult] = []
    tracer: list[TracerState] = []
    results["fio"], results["tracer"] = fio, tracer

    pair = args.paired
    rt, timed = (args.time_based, True) if args.time_based else (runtime, False)
    run_jobs(g, "warm-up (not reported)", jobs, rt, 1, pair, timed)  # first passes after layout run slower
    fio += run_jobs(g, "baseline", jobs, rt, rep, pair, timed)

    cow_mib = cow_mib_needed(jobs, args.disk)
    results["bench_cow_fallocate_mib"] = cow_mib
    run(g, "sync")
    run(g, f"{DBDCTL} setup-snapshot -f {cow_mib} {DEV} {COW} {MINOR}", timeout=300)
    tracer.append(tracer_info(g, "after setup"))
    # uncapped: only the first pass is a first write
    fio += run_jobs(g, "snapshot first write", jobs, 0, 1, pair)
    tracer.append(tracer_info(g, "after first writes"))
    fio += run_jobs(g, "snapshot rewrite", jobs, rt, rep, pair, timed)
    tracer.append(tracer_info(g, "after rewrites"))
    run(g, f"{DBDCTL} transition-to-incremental {MINOR}", timeout=300)
    fio += run_jobs(g, "incremental", jobs, rt, rep, pair, timed)
    tracer.append(tracer_info(g, "after incremental"))
    run(g, f"{DBDCTL} destroy {MINOR}", timeout=300)
    fio += run_jobs(g, "baseline after destroy", jobs, rt, rep, pair, timed)

    print(f"setup-snapshot latency ({args.setup_rounds} rounds, -f {args.setup_falloc}) ...", flush=True)
    results["setup"] = measure_setup(g, args.setup_falloc, args.setup_rounds)

    if args.dm:
        bench_dm(g, args, jobs, results)
    if args.thin:
        bench_thin(g, args, jobs, results)
    if args.dm or args.thin:
        fio += run_jobs(g, "baseline at end", jobs, rt, rep, pair, timed)


# ---------------------------------------------------------------- report


def ratio(value: float, base: float) -> float | None:
    """value / base; None when either is 0 (fio reports 0 for percentiles it did not compute)."""
    return value / base if base and value else None


UNTRACKED = ("baseline", "baseline after destroy", "baseline at end")


def paired_median(values: tuple[float, ...]) -> float | None:
    """Median of the paired ratios (None without pairs or when fio gave no such value)."""
    good = [v for v in values if v == v]  # NaN: a percentile fio did not report
    return statistics.median(good) if good else None


@dataclass(frozen=True)
class Reference:
    """The untracked baseline of one job: every untracked run of the whole benchmark pooled (the
    host's speed drifts during a run, so one series at the start would bias every ratio)."""

    bw_mib_s: float
    clat_p50_us: float
    clat_p99_us: float
    runs: int
    noise: float  # largest distance from 1 of an untracked series' median run against bw_mib_s


def references(fio: list[FioResult]) -> dict[str, Reference]:
    out = {}
    for job in dict.fromkeys(r.job for r in fio):
        series = [r for r in fio if r.job == job and r.phase in UNTRACKED]
        if not series:
            continue
        runs = [bw for r in series for bw in (r.runs_mib_s or (r.bw_mib_s,))]
        bw = statistics.median(runs)
        if all(r.paired_bw for r in series):  # paired: how far untracked/untracked pairs stray from 1
            noise = max(abs(1 - statistics.median(r.paired_bw)) for r in series)
        else:
            noise = max(abs(1 - r.bw_mib_s / bw) for r in series) if bw else 0.0
        p50 = statistics.median(r.clat_p50_us for r in series)
        p99 = statistics.median(r.clat_p99_us for r in series)
        out[job] = Reference(bw, p50, p99, len(runs), noise)
    return out


def case_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every fio row with its ratios to the untracked reference of the same job (None where fio
    gave no latency percentiles or there is no reference)."""
    fio: list[FioResult] = results.get("fio", [])
    refs = references(fio)
    rows = []
    for r in fio:
        b = refs.get(r.job)
        rows.append(
            {
                "phase": r.phase,
                "job": r.job,
                "bw_mib_s": r.bw_mib_s,
                "iops": r.iops,
                "clat_p50_us": r.clat_p50_us,
                "clat_p99_us": r.clat_p99_us,
                "io_mib": r.io_mib,
                "runs_mib_s": list(r.runs_mib_s),
                "bw_ratio": paired_median(r.paired_bw) or (ratio(r.bw_mib_s, b.bw_mib_s) if b else None),
                "p50_ratio": paired_median(r.paired_p50)
                or (ratio(r.clat_p50_us, b.clat_p50_us) if b else None),
                "p99_ratio": paired_median(r.paired_p99)
                or (ratio(r.clat_p99_us, b.clat_p99_us) if b else None),
                "paired_bw": list(r.paired_bw),
                "ref_mib_s": list(r.ref_mib_s),
                "ref_runs_mib_s": list(r.ref_runs_mib_s),
                "target": TARGETS.get(r.phase),
            }
        )
    return rows


def first_write_vs_peer(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per job: our first-write bandwidth ratio and each peer's (None: not run), in the same run,
    and whether ours is above it (better_than_<peer>)."""
    ratios = {(r["phase"], r["job"]): r["bw_ratio"] for r in case_rows(results)}
    out: dict[str, dict[str, Any]] = {}
    for (phase, job), mine in ratios.items():
        if phase != "snapshot first write":
            continue
        out[job] = {"ours": mine}
        for key, peer_phase in PEERS.items():
            theirs = ratios.get((peer_phase, job))
            out[job][key] = theirs
            out[job][f"better_than_{key}"] = None if mine is None or theirs is None else mine > theirs
    return out


def print_report(results: dict[str, Any]) -> None:
    print()
    hdr = f"{'phase':<24}{'job':<14}{'MiB/s':>9}{'IOPS':>9}{'p50 us':>10}{'p99 us':>10}{'MiB':>7}"
    print(hdr + f"{'bw ratio':>10}{'target':>9}{'p50 x':>8}{'p99 x':>8}")
    print("-" * (len(hdr) + 35))

    def num(x: float | None) -> float:
        return float("nan") if x is None else x

    for c in case_rows(results):
        bw, target = num(c["bw_ratio"]), c["target"]
        tgt = f">={target:.2f}" if target is not None else "-"
        flag = " " if target is None or bw >= target else "!"
        print(
            f"{c['phase']:<24}{c['job']:<14}{c['bw_mib_s']:>9.2f}{c['iops']:>9.0f}{c['clat_p50_us']:>10.1f}"
            f"{c['clat_p99_us']:>10.1f}{c['io_mib']:>7.0f}{bw:>9.2f}{flag}{tgt:>9}"
            f"{num(c['p50_ratio']):>8.2f}{num(c['p99_ratio']):>8.2f}"
        )
    print(
        "('!' = below target; ratios: median of the phase's tracked/untracked run pairs, or without "
        "pairs to the median of the job's untracked runs:"
    )
    for job, ref in references(results.get("fio", [])).items():
        print(
            f"  {job}: median of {ref.runs} untracked runs {ref.bw_mib_s:.2f} MiB/s, "
            f"p50 {ref.clat_p50_us:.1f} us, p99 {ref.clat_p99_us:.1f} us; "
            f"noise (untracked phases' ratios from 1) {ref.noise:.0%})"
        )
    for job, cmp in first_write_vs_peer(results).items():
        for key, phase in PEERS.items():
            if cmp[key] is not None:
                verdict = "better" if cmp[f"better_than_{key}"] else "NOT better"
                print(
                    f"first writes, {job}: ours {cmp['ours']:.2f} vs {phase.split()[0]} {cmp[key]:.2f} "
                    f"of baseline: {verdict}"
                )
    for d in results.get("dm", []):
        print(
            f"dm-snapshot {d.phase}: COW {d.used_sectors * 512 / MIB:.1f} of "
            f"{d.total_sectors * 512 / MIB:.1f} MiB used, metadata {d.metadata_sectors * 512 / MIB:.2f} MiB"
        )
    if "dm_create_ms" in results:
        print(f"dm-snapshot suspend + create + resume: {results['dm_create_ms']:.0f} ms")
    block = THIN_BLOCK_SECTORS * 512
    for t in results.get("thin", []):
        print(
            f"dm-thin pool {t.phase}: data {t.data_used_blocks * block / MIB:.1f} of "
            f"{t.data_total_blocks * block / MIB:.1f} MiB used, metadata "
            f"{t.metadata_used_blocks * METADATA_BLOCK / MIB:.2f} of "
            f"{t.metadata_total_blocks * METADATA_BLOCK / MIB:.1f} MiB, {t.mode}"
        )
    if "thin_create_ms" in results:
        print(f"dm-thin suspend + create_snap + resume: {results['thin_create_ms']:.0f} ms")
    for t in results.get("tracer", []):
        print(
            f"tracer {t.phase}: state {t.state} error {t.error} nr_changed_blocks {t.nr_changed_blocks} "
            f"cow size {t.falloc_size / MIB:.1f} MiB"
        )
    setup: SetupLatency | None = results.get("setup")
    if setup is not None:
        falloc_mib = setup.falloc_size_bytes / MIB
        med = statistics.median
        print(
            f"\nsetup-snapshot -f {setup.fallocate_mib}: COW preallocation {falloc_mib:.1f} MiB "
            f"({setup.falloc_size_bytes} bytes)"
        )
        print(f"  dbdctl wall (incl. python start) median {med(setup.dbdctl_ms):.1f} ms  "
              f"{[round(x, 1) for x in setup.dbdctl_ms]}")  # fmt: skip
        print(
            f"  dbdctl get-free wall (python start-up reference) median {med(setup.python_startup_ms):.1f} ms"
        )
        print(
            f"  reference: fallocate + zero-fill + fsync of {setup.fallocate_mib} MiB median "
            f"{med(setup.prealloc_ref_ms):.1f} ms  {[round(x, 1) for x in setup.prealloc_ref_ms]}"
        )
        print(f"  ioctl alone median {med(setup.ioctl_ms):.1f} ms  {[round(x, 1) for x in setup.ioctl_ms]}")
        budget = SETUP_TARGET_MS + med(setup.prealloc_ref_ms)
        print(
            f"  target: < {SETUP_TARGET_MS:.0f} ms plus the preallocation of {falloc_mib:.1f} MiB "
            f"(= {budget:.0f} ms with the reference above); ioctl median {med(setup.ioctl_ms):.0f} ms"
        )


def without_nan(value: Any) -> Any:
    """NaN (a ratio fio gave no number for) as null, so that the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(v) for v in value]
    return value


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in results.items():
        if isinstance(v, list):
            out[k] = [asdict(x) if hasattr(x, "__dataclass_fields__") else x for x in v]
        elif hasattr(v, "__dataclass_fields__"):
            out[k] = asdict(v)
        else:
            out[k] = v
    refs = references(results.get("fio", []))
    out["reference"] = {job: asdict(ref) for job, ref in refs.items()}
    out["ratios"] = {
        f"{r.phase} / {r.job}": r.bw_mib_s / refs[r.job].bw_mib_s
        for r in results.get("fio", [])
        if r.job in refs and refs[r.job].bw_mib_s
    }
    out["targets"] = {**TARGETS, "setup_ms": SETUP_TARGET_MS, "first write above": PEER_FIRST_WRITE}
    out["reported_beside"] = list(PEERS.values())
    out["cases"] = case_rows(results)
    out["first_write_vs_dm"] = first_write_vs_peer(results)
    return out


def data_disks(args: argparse.Namespace) -> list[DiskSpec]:
    """The data disks in guest order (/dev/vdb, /dev/vdc, ...): the tracked volume, the dm-snapshot
    COW disk, the thin pool's disk, the reference volume; sets args.thin_dev and args.ref_dev."""
    disks: list[DiskSpec] = []

    def add(size_mib: int) -> str:
        disks.append(DiskSpec(size_mib))
        return f"/dev/vd{chr(ord('a') + len(disks))}"

    add(args.disk)
    if args.dm and add(args.dm_cow) != DM_COW_DEV:
        raise AssertionError(f"the dm-snapshot COW disk must be {DM_COW_DEV}")
    if args.thin:
        args.thin_dev = add(THIN_META_MIB + args.thin_data)
    if args.paired:
        args.ref_dev = add(args.disk)
    return disks


def module_messages(g: Guest) -> list[str]:
    r = g.run("dmesg", timeout=60)
    return [ln for ln in r.stdout.splitlines() if "datto" in ln.lower()]


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default="debian-6.1")
    p.add_argument("--seq-size", type=int, default=256, help="MiB written by the 1M job (default 256)")
    p.add_argument("--rand-size", type=int, default=128, help="MiB written by the 4k job (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs per job in repeatable phases (median)")
    p.add_argument("--runtime", type=int, default=120, help="runtime cap per fio job, seconds")
    p.add_argument("--disk", type=int, default=2048, help="scratch disk MiB (default 2048, sparse)")
    p.add_argument("--setup-falloc", type=int, default=16, help="-f MiB for the setup latency rounds")
    p.add_argument("--setup-rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--time-based",
        type=int,
        default=0,
        metavar="S",
        help="repeatable phases: every run lasts S seconds, looping over its file (default: one pass)",
    )
    p.add_argument("--no-dm", dest="dm", action="store_false", help="skip the dm-snapshot phases")
    p.add_argument("--no-thin", dest="thin", action="store_false", help="skip the dm-thin phases")
    p.add_argument(
        "--thin-data", type=int, default=None, help="dm-thin pool data MiB (default: twice --disk)"
    )
    p.add_argument(
        "--no-pair",
        dest="paired",
        action="store_false",
        help="no untracked reference volume: ratios to the pooled untracked series instead of run pairs",
    )
    p.add_argument(
        "--dm-cow", type=int, default=None, help="dm-snapshot COW disk MiB (default: our COW preallocation)"
    )
    args = p.parse_args()
    if args.dm_cow is None:
        args.dm_cow = cow_mib_needed(make_jobs(args.seq_size, args.rand_size), args.disk)
    if args.thin_data is None:
        args.thin_data = 2 * args.disk

    results: dict[str, Any] = {"target": args.target, "repeat": args.repeat, "runtime_cap_s": args.runtime}
    results["sizes_mib"] = {"seq": args.seq_size, "rand": args.rand_size, "disk": args.disk}
    results["paired"] = args.paired
    results["time_based_s"] = args.time_based
    if args.dm:
        results["sizes_mib"]["dm_cow"] = args.dm_cow
    if args.thin:
        results["sizes_mib"]["thin_data"] = args.thin_data
        results["sizes_mib"]["thin_metadata"] = THIN_META_MIB
        results["thin_block_kib"] = THIN_BLOCK_SECTORS // 2
        results["thin_block_zeroing"] = True
    load_before = Path("/proc/loadavg").read_text().strip()
    print(f"host: nproc {os.cpu_count()}, loadavg before: {load_before}")
    disks = data_disks(args)
    g = Guest(target=args.target, disks=disks, module=False, name="bench-cow-overhead")
    failed = True
    try:
        boot_and_describe(g, results)
        results["fio_version"] = run(g, "fio --version").stdout.strip()
        print(
            f"accelerator: {results['accel'].upper()}; guest kernel {results['guest_kernel']}, "
            f"guest nproc {results['guest_nproc']}, {results['fio_version']}; boot {g.boot_seconds:.1f} s"
        )
        g.load_module(debug=0)
        bench(g, args, results)
        results["dmesg_module_lines"] = module_messages(g)
        failed = False
    except (BenchError, GuestCommandError, GuestError) as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        try:
            msgs = module_messages(g)
            print("module lines in dmesg:\n" + "\n".join(msgs[-40:]), file=sys.stderr)
        except Exception:  # the guest may be gone
            pass
    finally:
        failed = finish_guest(g, failed, results)
    load_after = Path("/proc/loadavg").read_text().strip()
    results["loadavg_before"], results["loadavg_after"] = load_before, load_after
    print_report(results)
    lines = results.get("dmesg_module_lines", [])
    print(f"\nmodule lines in dmesg: {len(lines)}")
    for ln in lines[-10:]:
        print(f"  {ln}")
    print(f"host loadavg before: {load_before}; after: {load_after}")
    if args.json is not None:
        args.json.write_text(json.dumps(without_nan(to_json(results)), indent=2, allow_nan=False) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
