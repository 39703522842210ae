"""Guest boot benchmark: per target, boot-to-ready and warm start, median of N runs (no assertions).

    .venv/bin/python benchmarks/guest_boot.py [--targets debian-6.1,debian-6.12|stock|all] [--runs 5]
        [--throughput 8] [--cold] [--json out.json]

* build (warm): `python -m vmimages build --target T` with every cache warm.
* build (cold, with --cold): the same into a fresh temporary cache (downloads kernels, debootstraps
  the root file systems and build chroots: about 10 minutes for all four targets; opt-in).
* throughput: guests per minute that 1 and 2 parallel workers sustain, each guest booting, running
  `uname -r` and powering off (`python -m harness run`), the cost floor of one guest test.

* boot-to-ready: QEMU start -> shell usable (TESTINIT-START seen, shell initialized), Guest.boot_seconds.
* warm start: `Guest(...).boot()` wall time with every cache warm (image lookup, accel verdict,
  overlay, data disk, QMP connect, boot); what a test pays before its first command.
* shell init: TESTINIT-START -> shell usable (the harness's own part of boot-to-ready).
* first command: `true` round trip right after boot; close: clean shutdown until QEMU exits.
The host load average is printed too: TCG boot times scale with it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import Guest
from harness.images import all_targets, default_target, guest_image, is_debug_target


def bench_target(target: str, runs: int) -> dict[str, list[float]]:
    t = time.monotonic()
    guest_image(target)  # builds it if needed; timed: a cache hit is the warm case
    image_s = time.monotonic() - t
    out: dict[str, list[float]] = {"image lookup": [image_s], "boot-to-ready": [], "warm start": []}
    out["shell init"], out["first command"], out["close"] = [], [], []
    for i in range(runs):
        t0 = time.monotonic()
        g = Guest(target, module=False, name=f"bench-{target}")
        g.boot()
        out["warm start"].append(time.monotonic() - t0)
        out["boot-to-ready"].append(g.boot_seconds or 0.0)
        out["shell init"].append(g.init_seconds or 0.0)
        t1 = time.monotonic()
        g.run("true")
        out["first command"].append(time.monotonic() - t1)
        t2 = time.monotonic()
        g.finish(test_failed=False, artifact_dir=None)
        out["close"].append(time.monotonic() - t2)
        ready, warm = out["boot-to-ready"][-1], out["warm start"][-1]
        load = os.getloadavg()[0]
        print(f"  {target} run {i + 1}: boot-to-ready {ready:.2f}s, warm start {warm:.2f}s, load {load:.2f}")
    return out


def timed_build(target: str, env: dict[str, str] | None = None) -> float:
    t = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "vmimages", "build", "--target", target],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - t


def throughput(target: str, guests: int, workers: int = 2) -> float:
    """Guests per minute: `guests` boot/uname/poweroff cycles, `workers` at a time."""
    cmd = [sys.executable, "-m", "harness", "run", "--target", target, "--", "uname", "-r"]
    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(lambda _: subprocess.run(cmd, capture_output=True).returncode, range(guests)))
    took = time.monotonic() - t
    if any(codes):
        raise RuntimeError(f"{codes.count(0)} of {guests} guest runs succeeded (exit codes {codes})")
    return guests * 60 / took


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=None, help="comma list, 'stock' (no debug kernel) or 'all'")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--throughput", type=int, default=8, metavar="N", help="guests per target for throughput (0: skip)"
    )
    p.add_argument("--cold", action="store_true", help="also time a cold build of the targets (slow)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    doc: dict[str, Any] = {"host_cpus": os.cpu_count(), "load_before": os.getloadavg(), "targets": {}}
    doc["default_target"] = default_target()
    if args.targets in ("all", "stock"):  # stock: the matrix without the debug kernels (built from source)
        targets = [t for t in all_targets() if args.targets == "all" or not is_debug_target(t)]
    else:
        targets = (args.targets or default_target()).split(",")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="dbd-cold-") as tmp:
            cold = timed_build(",".join(targets), env={**os.environ, "DBD_CACHE_DIR": tmp})
        print(f"cold build of {', '.join(targets)} (fresh cache): {cold:.1f}s")
        doc["cold_build_s"] = cold
    for target in targets:
        warm = timed_build(target)
        print(f"{target}: build (warm): {warm:.2f}s")
        entry: dict[str, Any] = {"build_warm_s": warm}
        doc["targets"][target] = entry
        try:
            res = bench_target(target, args.runs)
        except Exception as e:  # a target whose image cannot be built: say so and go on
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{target}: FAILED: {reason}")
            entry["failed"] = reason
            continue
        entry["runs"] = res
        entry["median_s"] = {name: statistics.median(values) for name, values in res.items()}
        for name, values in res.items():
            n = len(values)
            spread = f" (min {min(values):.2f}, max {max(values):.2f}, n={n})" if n > 1 else ""
            print(f"{target}: {name}: median {statistics.median(values):.2f}s{spread}")
        if args.throughput:
            # one worker shows the cost of a guest alone; two, what `pytest -n 2` gets on 2 cores
            per_workers = {}
            for workers in (1, 2):
                gpm = throughput(target, args.throughput, workers)
                per_workers[str(workers)] = gpm
                plural = "s" if workers > 1 else ""
                print(f"{target}: throughput: {gpm:.1f} guests/min with {workers} worker{plural}")
            entry["guests_per_min"] = per_workers
            entry["guests_per_min_2_workers"] = per_workers["2"]  # the key of earlier results
    if args.json is not None:
        doc["load_after"] = os.getloadavg()
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
