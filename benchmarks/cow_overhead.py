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
8. dm-snapshot, rewrites: the same jobs again (every chunk already copied);
9. baseline at end: snapshot and origin removed, the disk mounted directly again (second drift check).

``--no-dm`` skips phases 6 to 9. The dm COW disk gets as much room as our COW preallocation, and
its fill (``dmsetup status``) is recorded; an overflowed (invalid) snapshot stops the benchmark,
because its later writes would no longer be copied.

Then setup-snapshot latency: median of ``--setup-rounds`` setup/destroy cycles with a small fixed
``-f`` (timed around the dbdctl command in the guest, which includes the guest Python start-up, and
around the ioctl alone), with the preallocation the module reports (info falloc_size).

Targets reported against (nothing is asserted): bandwidth ratio to the baseline for first writes
>= 0.3 and above dm-snapshot's first-write ratio, rewrites >= 0.9, incremental >= 0.95;
setup-snapshot < 200 ms plus the COW preallocation. Every ratio, dm-snapshot's included, is the
median of the phase's paired ratios (see above); with ``--no-pair``, the ratio to the median of all
runs of the three untracked series (at the start, after destroy, at the end). The noise reported is
how far the untracked phases' ratios stray from 1.

    .venv/bin/python benchmarks/cow_overhead.py [--target debian-6.1] [--repeat 3] [--no-dm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestcmd import BenchError, run
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


def bench_dm(g: Guest, args: argparse.Namespace, jobs: tuple[Job, ...], results: dict[str, Any]) -> None:
    fio: list[FioResult] = results["fio"]
    dm: list[DmState] = []
    results["dm"] = dm
    rep, pair = args.repeat, args.paired
    rt, timed = (args.time_based, True) if args.time_based else (args.runtime, False)
    print(f"dm-snapshot: origin over {DEV}, COW device {DM_COW_DEV} ({args.dm_cow} MiB) ...", flush=True)
    run(g, "sync")
    dm_mount_origin(g)
    fio += run_jobs(g, "dm-origin, no snapshot", jobs, rt, rep, pair, timed)
    run(g, "sync")
    results["dm_create_ms"] = dm_create_snapshot(g)
    dm.append(dm_status(g, "after create"))
    fio += run_jobs(g, PEER_FIRST_WRITE, jobs, 0, 1, pair)  # uncapped: only the first pass copies
    dm.append(dm_status(g, "after first writes"))
    fio += run_jobs(g, "dm-snapshot rewrite", jobs, rt, rep, pair, timed)
    dm.append(dm_status(g, "after rewrites"))
    dm_teardown(g)
    fio += run_jobs(g, "baseline at end", jobs, rt, rep, pair, timed)


# ---------------------------------------------------------------- the benchmark


def cow_mib_needed(jobs: tuple[Job, ...], disk_mib: int) -> int:
    """COW preallocation for one first-write pass over both files: data, index (8 bytes per 4 KiB
    block of the device, plus a header), journal/metadata blocks, and slack."""
    index_mib = disk_mib * 256 * 8 // MIB + 1
    return sum(j.size_mib for j in jobs) + index_mib + 64


def bench(g: Guest, args: argparse.Namespace, results: dict[str, Any]) -> None:
    jobs, runtime, rep = make_jobs(args.seq_size, args.rand_size), args.runtime, args.repeat
    results["jobs"] = [asdict(j) for j in jobs]
    volumes = [(DEV, MNT)] + ([(args.ref_dev, REF_MNT)] if args.paired else [])
    for dev, mnt in volumes:
        run(g, f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {dev}", timeout=300)
        run(g, f"mkdir -p {mnt} && mount {dev} {mnt}")
        print("laying out " + ", ".join(f"{on_volume(j, mnt).filename} ({j.size_mib} MiB)" for j in jobs))
        for job in jobs:
            layout = f"--rw=write --bs=1M --size={job.size_mib}M --direct=1 --output-format=json"
            run(
                g,
                f"fio --name=layout --filename={on_volume(job, mnt).filename} {layout}",
                timeout=runtime + 300,
            )
    run(g, "sync")
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
                "target": TARGETS.get(r.phase),
            }
        )
    return rows


def first_write_vs_peer(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per job: our first-write bandwidth ratio against dm-snapshot's, in the same run."""
    rows = case_rows(results)
    ours = {r["job"]: r["bw_ratio"] for r in rows if r["phase"] == "snapshot first write"}
    peer = {r["job"]: r["bw_ratio"] for r in rows if r["phase"] == PEER_FIRST_WRITE}
    out = {}
    for job, mine in ours.items():
        theirs = peer.get(job)
        better = None if mine is None or theirs is None else mine > theirs
        out[job] = {"ours": mine, "dm_snapshot": theirs, "better": better}
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
        if cmp["dm_snapshot"] is not None:
            verdict = "better" if cmp["better"] else "NOT better"
            print(
                f"first writes, {job}: ours {cmp['ours']:.2f} vs dm-snapshot {cmp['dm_snapshot']:.2f} "
                f"of baseline: {verdict}"
            )
    for d in results.get("dm", []):
        print(
            f"dm-snapshot {d.phase}: COW {d.used_sectors * 512 / MIB:.1f} of "
            f"{d.total_sectors * 512 / MIB:.1f} MiB used, metadata {d.metadata_sectors * 512 / MIB:.2f} MiB"
        )
    if "dm_create_ms" in results:
        print(f"dm-snapshot suspend + create + resume: {results['dm_create_ms']:.0f} ms")
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
    out["cases"] = case_rows(results)
    out["first_write_vs_dm"] = first_write_vs_peer(results)
    return out


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

    results: dict[str, Any] = {"target": args.target, "repeat": args.repeat, "runtime_cap_s": args.runtime}
    results["sizes_mib"] = {"seq": args.seq_size, "rand": args.rand_size, "disk": args.disk}
    results["paired"] = args.paired
    results["time_based_s"] = args.time_based
    if args.dm:
        results["sizes_mib"]["dm_cow"] = args.dm_cow
    load_before = Path("/proc/loadavg").read_text().strip()
    print(f"host: nproc {os.cpu_count()}, loadavg before: {load_before}")
    disks = [DiskSpec(args.disk)] + ([DiskSpec(args.dm_cow)] if args.dm else [])
    args.ref_dev = f"/dev/vd{chr(ord('b') + len(disks))}"  # the reference volume's disk comes last
    if args.paired:
        disks.append(DiskSpec(args.disk))
    g = Guest(target=args.target, disks=disks, module=False, name="bench-cow-overhead")
    failed = True
    try:
        g.boot()
        argv = g.command_line
        results["accel"] = argv[argv.index("-accel") + 1] if "-accel" in argv else "?"
        results["guest_kernel"] = run(g, "uname -r").stdout.strip()
        results["guest_nproc"] = run(g, "nproc").stdout.strip()
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
        try:
            g.finish(test_failed=failed, artifact_dir=None)
        except GuestError as e:  # KernelWarningError: kernel findings on the console
            print(f"\nkernel findings: {e}", file=sys.stderr)
            results["kernel_findings"] = str(e)
            failed = True
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
