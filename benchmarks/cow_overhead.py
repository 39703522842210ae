#!/usr/bin/env python3
"""Write overhead of tracking: fio in ONE guest, untracked vs active snapshot vs incremental.

One guest boots with a raw scratch disk (/dev/vdb), made ext4 without lazy init (no background
writes) and mounted at /mnt/vol. The module is loaded with debug=0. Up to eight fio jobs (``--jobs``,
default all), iodepth 1, psync, fixed size (``--seq-size`` for the sequential ones, ``--rand-size`` for
the random ones) with a runtime cap (``--runtime``; none for first-write passes, which must cover
every block); repeatable phases run each job ``--repeat`` times and report the median run. With
``--time-based S`` every run of a repeatable phase lasts S seconds instead, looping over its file
(short passes are noisy under TCG). Every job writes its own file (``<key>.dat``), laid out before
the snapshot, so that one job's first-write pass never meets blocks another job already wrote after
the snapshot:

* ``seq``, "seqwrite 1M": sequential 1 MiB writes, direct I/O, one process (``seq.dat``);
* ``rand``, "randwrite 4k": random 4 KiB writes, direct I/O, one process (``rand.dat``; fio's random
  map: every block once per pass, and the same order in every pass, so a rewrite pass touches
  exactly the blocks of the first one);
* ``-buffered`` ("... buffered"): the same through the page cache (``direct=0``) with an fsync at the
  end of the run (``end_fsync``), so that the data reaches the disk (and, tracked, is copied) within
  the measured run; else a first-write pass would measure the page cache only. fio's bandwidth and
  runtime count that fsync: fio issues it inside its I/O loop, before the runtime is taken (and a
  smoke run agrees: buffered first writes show the COW cost, which is paid at writeback);
* ``-x4`` ("... 4 jobs"): four fio processes (``numjobs=4``) on the same file, each over its own
  quarter (``size`` = file / 4, ``offset_increment`` = file / 4), so that a first-write pass still
  writes every block once; ``group_reporting``: one result for the four (bandwidth: all their bytes
  over the longest runtime; latency percentiles over all their writes).

So: seq, rand, seq-buffered, rand-buffered, seq-x4, rand-x4, seq-buffered-x4, rand-buffered-x4. The
tracked volume holds every selected job's file and our COW file (preallocated for a first-write pass
over all of them), so ``--disk`` defaults to 2048 MiB or, with more or larger files, to what they
need (3328 MiB for all eight at the default sizes); the reference volume, the dm-snapshot COW disk and
the thin pool follow from it.

Guest CPU: every fio run (tracked and reference) is wrapped, in the same guest command, between two
reads of /proc/stat's first line; busy time = user + nice + system + irq + softirq + steal (USER_HZ =
100 per second; the guest has one vCPU), so that our module's COW work in its kernel thread and the
writeback of buffered jobs count (fio's own usr/sys would miss them). Each row reports busy seconds
per GiB written and, like the throughput, the median over its pairs of tracked / reference ratios
(higher is worse); the untracked speed lines report the absolute value. The window includes fio's own
start-up and exit, measured alone once (a 4 KiB fio run, ``fio_startup_cpu`` in the JSON) and
identical in a pair: it pulls the CPU ratio of a short run towards 1.

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

Duration under TCG on a 2-core shared host: a run costs its length plus about 1.2 s (sync, fio
start-up); a job takes about 58 timed runs with every peer (warm-ups, nine repeatable phases of
``--repeat`` 3, each paired), plus its first-write passes (three, each between two reference runs).
``benchmarks/run --quick`` (four jobs, small files, 2 s runs) took 14.5 minutes; the full run
(all eight jobs at the default sizes, ``--time-based 4``) about an hour, most of it the timed runs
(8 x 58 x 5 s) and the random first writes through dm-snapshot.

    .venv/bin/python benchmarks/cow_overhead.py [--target debian-6.1] [--repeat 3] [--no-dm] [--no-thin]
        [--jobs seq,rand,...] [--json out.json]
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

from benchmarks.guestcmd import (
    STALL_RC,
    BenchError,
    boot_and_describe,
    diagnose_stall,
    finish_guest,
    run,
    watched,
)
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
    direct: bool = True  # False: buffered writes, fsync'ed at the end of the run (end_fsync)
    numjobs: int = 1  # fio processes, each writing its own 1/numjobs of the file


@dataclass(frozen=True)
class Variant:
    """One selectable job: access pattern, buffered or direct, how many fio processes."""

    pattern: str  # "seq" or "rand"
    direct: bool
    numjobs: int

    @property
    def key(self) -> str:
        procs = f"-x{self.numjobs}" if self.numjobs > 1 else ""
        return self.pattern + ("" if self.direct else "-buffered") + procs


# pattern: (rw, bs, display name of the direct one-job variant; kept as older runs' JSON names it)
PATTERNS = {"seq": ("write", "1M", "seqwrite 1M"), "rand": ("randwrite", "4k", "randwrite 4k")}
VARIANTS = {
    v.key: v
    for v in (
        Variant(pattern, direct, numjobs)
        for numjobs in (1, 4)
        for direct in (True, False)
        for pattern in PATTERNS
    )
}
ALL_JOBS = tuple(VARIANTS)  # seq, rand, seq-buffered, rand-buffered, seq-x4, rand-x4, ...


def job_name(v: Variant) -> str:
    """The display name: seqwrite 1M, randwrite 4k buffered, seqwrite 1M buffered 4 jobs, ..."""
    base = PATTERNS[v.pattern][2]
    return base + ("" if v.direct else " buffered") + (f" {v.numjobs} jobs" if v.numjobs > 1 else "")


def job_file(v: Variant) -> str:
    """Every variant writes its own file, so that one variant's first-write pass never finds blocks
    that another variant already wrote (and copied) after the snapshot."""
    return f"{MNT}/{v.key}.dat"  # seq.dat and rand.dat for the original two, as before


def bs_kib(bs: str) -> int:
    return {"k": 1, "M": 1024}[bs[-1]] * int(bs[:-1])


def make_jobs(seq_mib: int, rand_mib: int, keys: tuple[str, ...] = ("seq", "rand")) -> tuple[Job, ...]:
    """The selected variants (keys of VARIANTS), each over its own file: seq ones of seq_mib, rand ones
    of rand_mib. A file must split into numjobs equal parts of whole blocks (each fio process writes
    one part, so that a first-write pass still writes every block once)."""
    jobs = []
    for key in keys:
        if key not in VARIANTS:
            raise ValueError(f"unknown job {key!r}; choose from {', '.join(ALL_JOBS)}")
        v = VARIANTS[key]
        rw, bs, _ = PATTERNS[v.pattern]
        size = seq_mib if v.pattern == "seq" else rand_mib
        if (size * 1024) % (v.numjobs * bs_kib(bs)):
            raise ValueError(f"job {key}: {size} MiB does not split into {v.numjobs} parts of whole {bs}s")
        jobs.append(Job(job_name(v), rw, bs, job_file(v), size, v.direct, v.numjobs))
    return tuple(jobs)


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
    # Guest CPU (whole guest, /proc/stat, read right before and after fio in the same command): busy
    # seconds (user, nice, system, irq, softirq, steal), elapsed seconds by the same clock, and busy
    # seconds per GiB written; 0 in results from before they were measured.
    cpu_busy_s: float = 0.0
    cpu_elapsed_s: float = 0.0
    cpu_s_per_gib: float = 0.0
    runs_cpu_s_per_gib: tuple[float, ...] = ()  # every repeat's, like runs_mib_s
    paired_cpu: tuple[float, ...] = ()  # per pair: tracked / reference CPU seconds per GiB


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


def size_arg(kib: int) -> str:
    return f"{kib // 1024}M" if kib % 1024 == 0 else f"{kib}k"


def fio_cmd(job: Job, runtime: int, timed: bool = False) -> str:
    """The fio command of a job; runtime 0: no cap (the whole file is written once); timed: run
    for `runtime` seconds, looping over the file (only for phases where a block may be rewritten).
    numjobs > 1: each fio process writes its own part of the file (offset_increment), so together
    they cover it once, and one group result is reported. Buffered: the run ends with an fsync, so
    that the data reached the disk (and was copied where it must be) within the measured run."""
    cap = f"--runtime={runtime} " if runtime else ""
    if timed:
        cap = f"--time_based --runtime={runtime} "
    part = size_arg(job.size_mib * 1024 // job.numjobs)
    procs = f"--numjobs={job.numjobs} "
    if job.numjobs > 1:
        procs += f"--offset_increment={part} --group_reporting "
    io = "--direct=1 " if job.direct else "--direct=0 --end_fsync=1 "
    return (
        f"fio --name=bench --filename={job.filename} --rw={job.rw} --bs={job.bs} --size={part} "
        f"{io}--ioengine=psync --iodepth=1 {procs}--randrepeat=1 {cap}--output-format=json"
    )


# ---- guest CPU from /proc/stat: `cpu  user nice system idle iowait irq softirq steal guest guest_nice`
USER_HZ = 100  # the unit of /proc/stat on every Linux architecture this runs on
STAT_BUSY = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest* are inside user/nice)
STAT_CMD = "head -n 1 /proc/stat"
GIB = 1024 * MIB


@dataclass(frozen=True)
class CpuSample:
    busy: int  # jiffies (1/USER_HZ s), all CPUs
    total: int  # busy + idle + iowait


def parse_stat(line: str) -> CpuSample:
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise BenchError(f"not the first line of /proc/stat: {line!r}")
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks[i] for i in STAT_BUSY)
    return CpuSample(busy, busy + ticks[3] + ticks[4])


def cpu_seconds(before: CpuSample, after: CpuSample) -> tuple[float, float]:
    """(busy, elapsed) seconds between two samples, for a guest of one vCPU (with more, both are
    CPU seconds summed over the CPUs)."""
    return (after.busy - before.busy) / USER_HZ, (after.total - before.total) / USER_HZ


def with_cpu(cmd: str) -> str:
    """cmd between two reads of /proc/stat, in one guest command (no round trip inside the window)."""
    return f"{STAT_CMD} && {cmd} && {STAT_CMD}"


def split_cpu(text: str) -> tuple[CpuSample, CpuSample, str]:
    """The output of with_cpu(): (sample before, sample after, the command's own output)."""
    lines = text.splitlines()
    stat = [i for i, ln in enumerate(lines) if ln.startswith("cpu ")]
    if len(stat) < 2:
        raise BenchError(f"no /proc/stat lines around the fio output:\n{text[-2000:]}")
    first, last = stat[0], stat[-1]
    return parse_stat(lines[first]), parse_stat(lines[last]), "\n".join(lines[first + 1 : last])


def parse_fio(text: str, job: str, phase: str) -> FioResult:
    """fio's JSON (with group_reporting, jobs[0] is the group of all the job's processes: bandwidth
    over all of them, latency percentiles of all their I/Os). The bandwidth is fio's: io_bytes over
    the runtime, which counts the end_fsync of a buffered run (fio syncs inside its I/O loop)."""
    start = text.find("{")  # fio may print notes before the JSON document
    if start < 0:
        raise BenchError(f"no JSON in fio output for {job} / {phase}:\n{text[-2000:]}")
    doc, _ = json.JSONDecoder().raw_decode(text[start:])
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


def with_cpu_result(res: FioResult, before: CpuSample, after: CpuSample) -> FioResult:
    busy, elapsed = cpu_seconds(before, after)
    per_gib = busy / (res.io_mib * MIB / GIB) if res.io_mib else 0.0
    return replace(res, cpu_busy_s=busy, cpu_elapsed_s=elapsed, cpu_s_per_gib=per_gib)


FIRST_WRITE_TIMEOUT = 3600.0  # a first-write pass runs uncapped; this only catches a hung guest


def on_volume(job: Job, mountpoint: str) -> Job:
    return replace(job, filename=job.filename.replace(MNT, mountpoint, 1))


def fio_once(g: Guest, job: Job, runtime: int, label: str, timed: bool = False) -> FioResult:
    run(g, "sync")
    cmd = watched(with_cpu(fio_cmd(job, runtime, timed)))
    r = g.run(cmd, timeout=runtime + 300 if runtime else FIRST_WRITE_TIMEOUT)
    if r.rc == STALL_RC:
        what = f"{label.strip()} {job.name}: the guest stopped completing I/O"
        print(f"{what}\n{r.stdout[-30000:]}", flush=True)
        raise BenchError(f"{what}\n{diagnose_stall(g)}")
    if r.rc != 0:
        raise BenchError(f"guest command failed (rc {r.rc}): {cmd}\n{r.stdout[-2000:]}\n{r.stderr}")
    before, after, out = split_cpu(r.stdout)
    res = with_cpu_result(parse_fio(out, job.name, label), before, after)
    print(
        f"  {label:<22} {job.name:<29} {res.bw_mib_s:8.2f} MiB/s  p50 {res.clat_p50_us:9.1f} us  "
        f"p99 {res.clat_p99_us:9.1f} us  ({res.io_mib:.0f} MiB in {res.runtime_s:.2f} s; guest CPU "
        f"{res.cpu_busy_s:.2f} of {res.cpu_elapsed_s:.2f} s, {res.cpu_s_per_gib:.2f} s/GiB)",
        flush=True,
    )
    return res


FIO_STARTUP_RUNS = 3


def measure_fio_startup(g: Guest) -> dict[str, float]:
    """Guest CPU of fio's own start-up and exit, as with_cpu() sees it around one 4 KiB write (median
    of FIO_STARTUP_RUNS): it is inside every run's CPU window, the same in a tracked run and its
    reference, so it pulls the CPU ratio of a short run (a small first-write pass) towards 1."""
    path = f"{MNT}/fio-startup.dat"
    cmd = with_cpu(f"fio --name=startup --filename={path} --rw=write --bs=4k --size=4k --direct=1 "
                   "--output-format=json")  # fmt: skip
    busy, elapsed = [], []
    for _ in range(FIO_STARTUP_RUNS):
        run(g, "sync")
        before, after, _ = split_cpu(run(g, cmd).stdout)
        b, e = cpu_seconds(before, after)
        busy.append(b)
        elapsed.append(e)
    run(g, f"rm -f {path} && sync")
    out = {"busy_s": statistics.median(busy), "elapsed_s": statistics.median(elapsed)}
    print(f"fio start-up and exit: guest CPU {out['busy_s']:.2f} of {out['elapsed_s']:.2f} s (median)")
    return out


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
                runs_cpu_s_per_gib=tuple(x.cpu_s_per_gib for x in runs),
                paired_cpu=tuple(
                    pair_ratio(a.cpu_s_per_gib, [b.cpu_s_per_gib for b in bs]) for a, bs in pairs
                ),
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
    """COW preallocation for one first-write pass over every job's file: data, index (8 bytes per
    4 KiB block of the device, plus a header), journal/metadata blocks, and slack."""
    index_mib = disk_mib * 256 * 8 // MIB + 1
    return sum(j.size_mib for j in jobs) + index_mib + 64


DEFAULT_DISK_MIB = 2048  # the volume of earlier runs; larger only when the jobs' files need it


def disk_mib_needed(jobs: tuple[Job, ...]) -> int:
    """The smallest volume that holds every job's file and our COW file beside them (on the same file
    system) with room for ext4's journal and inode tables (no lazy init: written at mkfs), in
    multiples of 256 MiB."""
    disk = 2 * sum(j.size_mib for j in jobs) + 64  # the files, and the COW file of the same size
    while True:
        need = sum(j.size_mib for j in jobs) + cow_mib_needed(jobs, disk) + 64 + disk // 32
        if need <= disk:
            return disk
        disk = -(-need // 256) * 256


def default_disk_mib(jobs: tuple[Job, ...]) -> int:
    return max(DEFAULT_DISK_MIB, disk_mib_needed(jobs))


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
    jobs, runtime, rep = make_jobs(args.seq_size, args.rand_size, args.jobs), args.runtime, args.repeat
    results["jobs"] = [asdict(j) for j in jobs]
    volumes = [(DEV, MNT)] + ([(args.ref_dev, REF_MNT)] if args.paired else [])
    for dev, mnt in volumes:
        make_volume(g, dev, mnt, jobs, runtime)
    fio: list[FioResult] = []
    tracer: list[TracerState] = []
    results["fio"], results["tracer"] = fio, tracer

    pair = args.paired
    rt, timed = (args.time_based, True) if args.time_based else (runtime, False)
    results["fio_startup_cpu"] = measure_fio_startup(g)
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
    cpu_s_per_gib: float = 0.0  # median of the untracked runs' guest CPU seconds per GiB (0: not measured)


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
        cpu = [c for r in series for c in (r.runs_cpu_s_per_gib or (r.cpu_s_per_gib,)) if c]
        out[job] = Reference(bw, p50, p99, len(runs), noise, statistics.median(cpu) if cpu else 0.0)
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
                "cpu_s_per_gib": r.cpu_s_per_gib or None,
                "cpu_ratio": paired_median(r.paired_cpu)
                or (ratio(r.cpu_s_per_gib, b.cpu_s_per_gib) if b else None),
                "paired_bw": list(r.paired_bw),
                "paired_cpu": list(r.paired_cpu),
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
    hdr = f"{'phase':<24}{'job':<30}{'MiB/s':>9}{'IOPS':>9}{'p50 us':>10}{'p99 us':>10}{'MiB':>7}"
    print(hdr + f"{'bw ratio':>10}{'target':>9}{'p50 x':>8}{'p99 x':>8}{'CPU s/GiB':>10}{'CPU x':>7}")
    print("-" * (len(hdr) + 52))

    def num(x: float | None) -> float:
        return float("nan") if x is None else x

    for c in case_rows(results):
        bw, target = num(c["bw_ratio"]), c["target"]
        tgt = f">={target:.2f}" if target is not None else "-"
        flag = " " if target is None or bw >= target else "!"
        print(
            f"{c['phase']:<24}{c['job']:<30}{c['bw_mib_s']:>9.2f}{c['iops']:>9.0f}{c['clat_p50_us']:>10.1f}"
            f"{c['clat_p99_us']:>10.1f}{c['io_mib']:>7.0f}{bw:>9.2f}{flag}{tgt:>9}"
            f"{num(c['p50_ratio']):>8.2f}{num(c['p99_ratio']):>8.2f}"
            f"{num(c['cpu_s_per_gib']):>10.2f}{num(c['cpu_ratio']):>7.2f}"
        )
    print(
        "('!' = below target; ratios: median of the phase's tracked/untracked run pairs, or without "
        "pairs to the median of the job's untracked runs; CPU: guest busy seconds per GiB written, "
        "CPU x its ratio (higher is worse):"
    )
    for job, ref in references(results.get("fio", [])).items():
        print(
            f"  {job}: median of {ref.runs} untracked runs {ref.bw_mib_s:.2f} MiB/s, "
            f"p50 {ref.clat_p50_us:.1f} us, p99 {ref.clat_p99_us:.1f} us, guest CPU "
            f"{ref.cpu_s_per_gib:.2f} s/GiB; noise (untracked phases' ratios from 1) {ref.noise:.0%})"
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
    startup = results.get("fio_startup_cpu")
    if startup:
        print(
            f"guest CPU of fio's start-up and exit (in every run's CPU window): {startup['busy_s']:.2f} s "
            f"busy of {startup['elapsed_s']:.2f} s"
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
    p.add_argument(
        "--jobs",
        default=",".join(ALL_JOBS),
        help=f"comma list of fio jobs (default: all of {','.join(ALL_JOBS)}): seq = 1M sequential, rand = "
        "4k random; -buffered: page cache, fsync at the end; -x4: 4 processes, each its quarter of the file",
    )
    p.add_argument(
        "--disk",
        type=int,
        default=None,
        help=f"scratch disk MiB (sparse; default {DEFAULT_DISK_MIB}, or more when the jobs' files and the "
        "COW file need it)",
    )
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
    args.jobs = tuple(k.strip() for k in args.jobs.split(",") if k.strip())
    try:
        jobs = make_jobs(args.seq_size, args.rand_size, args.jobs)
    except ValueError as e:
        p.error(f"--jobs: {e}")
    if args.disk is None:
        args.disk = default_disk_mib(jobs)
    files_and_cow = sum(j.size_mib for j in jobs) + cow_mib_needed(jobs, args.disk)
    if files_and_cow >= args.disk:
        p.error(f"--disk {args.disk}: the files and the COW file alone take {files_and_cow} MiB")
    if args.dm_cow is None:
        args.dm_cow = cow_mib_needed(jobs, args.disk)
    if args.thin_data is None:
        args.thin_data = 2 * args.disk

    results: dict[str, Any] = {"target": args.target, "repeat": args.repeat, "runtime_cap_s": args.runtime}
    results["sizes_mib"] = {"seq": args.seq_size, "rand": args.rand_size, "disk": args.disk}
    results["job_keys"] = list(args.jobs)
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
