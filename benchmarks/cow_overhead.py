#!/usr/bin/env python3
"""Write overhead of tracking: fio in ONE guest, untracked vs active snapshot vs incremental.

One guest boots with a raw scratch disk (/dev/vdb), made ext4 without lazy init (no background
writes) and mounted at /mnt/vol. The module is loaded with debug=0. Two fio jobs, one job each,
iodepth 1, direct=1, psync, fixed size (``--seq-size``, ``--rand-size``) with a runtime cap
(``--runtime``); repeatable phases run each job ``--repeat`` times and report the median run:

* seqwrite: sequential 1 MiB writes over ``seq.dat``;
* randwrite: random 4 KiB writes over ``rand.dat`` (fio's random map: every block once per pass,
  and the same order in every pass, so a rewrite pass touches exactly the blocks of the first one).

Both files are laid out with data (a sequential fio write pass, then sync) before anything is
measured, so no phase pays for block allocation or unwritten-extent conversion. The phases, in order:

1. baseline: nothing tracked (module loaded);
2. snapshot, first writes: setup-snapshot (with a COW preallocation large enough for all the data),
   then each job once: every block written is written for the first time since the snapshot (COW);
3. snapshot, rewrites: the same jobs again: every block is already preserved;
4. incremental: transition-to-incremental, the same jobs again;
5. baseline again after destroy (drift check: the host is shared and TCG speed follows its load).

Then setup-snapshot latency: median of ``--setup-rounds`` setup/destroy cycles with a small fixed
``-f`` (timed around the dbdctl command in the guest, which includes the guest Python start-up, and
around the ioctl alone), with the preallocation the module reports (info falloc_size).

Targets reported against (nothing is asserted): bandwidth ratio to the baseline for first writes
>= 0.3, rewrites >= 0.9, incremental >= 0.95; setup-snapshot < 200 ms plus the COW preallocation.

    .venv/bin/python benchmarks/cow_overhead.py [--target debian-6.1] [--repeat 3] [--json out.json]
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

from harness.errors import GuestCommandError, GuestError
from harness.guest import CommandResult, Guest
from harness.qemu import DiskSpec

MNT = "/mnt/vol"
DEV = "/dev/vdb"
COW = f"{MNT}/.datto"
MINOR = 0
DBDCTL = "PYTHONPATH=/src python3 -m pydbd.dbdctl"
MIB = 1024 * 1024

TARGETS = {"snapshot first write": 0.3, "snapshot rewrite": 0.9, "incremental": 0.95}
SETUP_TARGET_MS = 200.0


class BenchError(Exception):
    """A guest command failed; the message carries its stderr."""


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


@dataclass
class TracerState:
    phase: str
    state: int
    error: int
    nr_changed_blocks: int
    falloc_size: int


@dataclass
class SetupLatency:
    fallocate_mib: int
    falloc_size_bytes: int
    dbdctl_ms: list[float] = field(default_factory=list)
    ioctl_ms: list[float] = field(default_factory=list)
    python_startup_ms: list[float] = field(default_factory=list)
    prealloc_ref_ms: list[float] = field(default_factory=list)  # fallocate + zero-fill + fsync, same size


# ---------------------------------------------------------------- guest commands


def run(g: Guest, cmd: str, timeout: float = 120.0) -> CommandResult:
    """Run a guest command; on failure raise BenchError with its rc, stdout tail and stderr."""
    r = g.run(cmd, timeout=timeout)
    if r.rc != 0:
        raise BenchError(
            f"guest command failed (rc {r.rc}): {cmd}\n--- stdout (tail) ---\n{r.stdout[-2000:]}"
            f"\n--- stderr ---\n{r.stderr}"
        )
    return r


def tracer_info(g: Guest, phase: str) -> TracerState:
    r = run(g, f"{DBDCTL} info {MINOR} --json")
    d = json.loads(r.stdout)
    return TracerState(phase, int(d["state"]), int(d["error"]), int(d["nr_changed_blocks"]),
                       int(d["falloc_size"]))  # fmt: skip


def fio_cmd(job: Job, runtime: int) -> str:
    return (
        f"fio --name=bench --filename={job.filename} --rw={job.rw} --bs={job.bs} --size={job.size_mib}M "
        f"--direct=1 --ioengine=psync --iodepth=1 --numjobs=1 --randrepeat=1 --runtime={runtime} "
        "--output-format=json"
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


def run_jobs(g: Guest, phase: str, jobs: tuple[Job, ...], runtime: int, repeat: int) -> list[FioResult]:
    """Each job `repeat` times in a row; the run with the median bandwidth stands for the phase."""
    out = []
    for job in jobs:
        runs = []
        for _ in range(repeat):
            run(g, "sync")
            r = run(g, fio_cmd(job, runtime), timeout=runtime + 120)
            res = parse_fio(r.stdout, job.name, phase)
            print(
                f"  {phase:<22} {job.name:<13} {res.bw_mib_s:8.2f} MiB/s  p50 {res.clat_p50_us:9.1f} us  "
                f"p99 {res.clat_p99_us:9.1f} us  ({res.io_mib:.0f} MiB in {res.runtime_s:.1f} s)",
                flush=True,
            )
            runs.append(res)
        ranked = sorted(runs, key=lambda x: x.bw_mib_s)
        mid = ranked[(len(ranked) - 1) // 2]
        out.append(replace(mid, runs_mib_s=tuple(x.bw_mib_s for x in runs)))
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


# ---------------------------------------------------------------- the benchmark


def cow_mib_needed(jobs: tuple[Job, ...], disk_mib: int) -> int:
    """COW preallocation for one first-write pass over both files: data, index (8 bytes per 4 KiB
    block of the device, plus a header), journal/metadata blocks, and slack."""
    index_mib = disk_mib * 256 * 8 // MIB + 1
    return sum(j.size_mib for j in jobs) + index_mib + 64


def bench(g: Guest, args: argparse.Namespace, results: dict[str, Any]) -> None:
    jobs, runtime, rep = make_jobs(args.seq_size, args.rand_size), args.runtime, args.repeat
    results["jobs"] = [asdict(j) for j in jobs]
    run(g, f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {DEV}", timeout=300)
    run(g, f"mkdir -p {MNT} && mount {DEV} {MNT}")
    print("laying out " + ", ".join(f"{j.filename} ({j.size_mib} MiB)" for j in jobs) + " ...", flush=True)
    for job in jobs:
        layout = f"--rw=write --bs=1M --size={job.size_mib}M --direct=1 --output-format=json"
        run(g, f"fio --name=layout --filename={job.filename} {layout}", timeout=runtime + 300)
    run(g, "sync")
    fio: list[FioResult] = []
    tracer: list[TracerState] = []
    results["fio"], results["tracer"] = fio, tracer

    fio += run_jobs(g, "baseline", jobs, runtime, rep)

    cow_mib = cow_mib_needed(jobs, args.disk)
    results["bench_cow_fallocate_mib"] = cow_mib
    run(g, "sync")
    run(g, f"{DBDCTL} setup-snapshot -f {cow_mib} {DEV} {COW} {MINOR}", timeout=300)
    tracer.append(tracer_info(g, "after setup"))
    fio += run_jobs(g, "snapshot first write", jobs, runtime, 1)  # only the first pass is a first write
    tracer.append(tracer_info(g, "after first writes"))
    fio += run_jobs(g, "snapshot rewrite", jobs, runtime, rep)
    tracer.append(tracer_info(g, "after rewrites"))
    run(g, f"{DBDCTL} transition-to-incremental {MINOR}", timeout=300)
    fio += run_jobs(g, "incremental", jobs, runtime, rep)
    tracer.append(tracer_info(g, "after incremental"))
    run(g, f"{DBDCTL} destroy {MINOR}", timeout=300)
    fio += run_jobs(g, "baseline after destroy", jobs, runtime, rep)

    print(f"setup-snapshot latency ({args.setup_rounds} rounds, -f {args.setup_falloc}) ...", flush=True)
    results["setup"] = measure_setup(g, args.setup_falloc, args.setup_rounds)


# ---------------------------------------------------------------- report


def print_report(results: dict[str, Any]) -> None:
    fio: list[FioResult] = results.get("fio", [])
    base = {r.job: r for r in fio if r.phase == "baseline"}
    print()
    hdr = f"{'phase':<24}{'job':<14}{'MiB/s':>9}{'IOPS':>9}{'p50 us':>10}{'p99 us':>10}{'MiB':>7}"
    print(hdr + f"{'bw ratio':>10}{'target':>9}{'p50 x':>8}{'p99 x':>8}")
    print("-" * (len(hdr) + 35))
    for r in fio:
        b = base.get(r.job)
        ratio = r.bw_mib_s / b.bw_mib_s if b and b.bw_mib_s else float("nan")
        p50x = r.clat_p50_us / b.clat_p50_us if b and b.clat_p50_us else float("nan")
        p99x = r.clat_p99_us / b.clat_p99_us if b and b.clat_p99_us else float("nan")
        target = TARGETS.get(r.phase)
        tgt = f">={target:.2f}" if target is not None else "-"
        flag = " " if target is None or ratio >= target else "!"
        print(
            f"{r.phase:<24}{r.job:<14}{r.bw_mib_s:>9.2f}{r.iops:>9.0f}{r.clat_p50_us:>10.1f}"
            f"{r.clat_p99_us:>10.1f}{r.io_mib:>7.0f}{ratio:>9.2f}{flag}{tgt:>9}{p50x:>8.2f}{p99x:>8.2f}"
        )
    print("('!' = below target; ratios are bandwidth and latency relative to the first baseline)")
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


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in results.items():
        if isinstance(v, list):
            out[k] = [asdict(x) if hasattr(x, "__dataclass_fields__") else x for x in v]
        elif hasattr(v, "__dataclass_fields__"):
            out[k] = asdict(v)
        else:
            out[k] = v
    base = {r.job: r for r in results.get("fio", []) if r.phase == "baseline"}
    out["ratios"] = {
        f"{r.phase} / {r.job}": r.bw_mib_s / base[r.job].bw_mib_s
        for r in results.get("fio", [])
        if r.job in base and base[r.job].bw_mib_s
    }
    out["targets"] = {**TARGETS, "setup_ms": SETUP_TARGET_MS}
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
    args = p.parse_args()

    results: dict[str, Any] = {"target": args.target, "repeat": args.repeat, "runtime_cap_s": args.runtime}
    load_before = Path("/proc/loadavg").read_text().strip()
    print(f"host: nproc {os.cpu_count()}, loadavg before: {load_before}")
    g = Guest(target=args.target, disks=[DiskSpec(args.disk)], module=False, name="bench-cow-overhead")
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
        args.json.write_text(json.dumps(to_json(results), indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
