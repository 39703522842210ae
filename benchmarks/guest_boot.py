"""Guest boot benchmark: per target, boot-to-ready and warm start, median of N runs (no assertions).

    .venv/bin/python benchmarks/guest_boot.py [--targets debian-6.1,debian-6.12|all] [--runs 5]

* boot-to-ready: QEMU start -> shell usable (TESTINIT-START seen, shell initialized), Guest.boot_seconds.
* warm start: `Guest(...).boot()` wall time with every cache warm (image lookup, accel verdict,
  overlay, data disk, QMP connect, boot); what a test pays before its first command.
* shell init: TESTINIT-START -> shell usable (the harness's own part of boot-to-ready).
* first command: `true` round trip right after boot; close: clean shutdown until QEMU exits.
The host load average is printed too: TCG boot times scale with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from harness import Guest
from harness.images import all_targets, default_target, guest_image


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


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=None, help="comma list or 'all' (default: the default target)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    targets = all_targets() if args.targets == "all" else (args.targets or default_target()).split(",")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    for target in targets:
        try:
            res = bench_target(target, args.runs)
        except Exception as e:  # a target whose image cannot be built: say so and go on
            print(f"{target}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        for name, values in res.items():
            n = len(values)
            spread = f" (min {min(values):.2f}, max {max(values):.2f}, n={n})" if n > 1 else ""
            print(f"{target}: {name}: median {statistics.median(values):.2f}s{spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
