"""The kernel matrix in one command: build every target, run the guest suite on each, summarize.

    python -m ci.matrix [--kernel all|T,T] [-n 2] [--deep-on auto|all|T,T] [--junit PATH] [-- PYTEST ARGS]

Steps: `python -m vmimages build --target ...`, then `pytest tests/guest --kernel ... -n N --junitxml`,
then a summary table (target x suite: passed, failed, skipped, duration, kernel warnings) printed
and written next to the JUnit file as `matrix-summary.md`. Exit status: non-zero when the build or
pytest failed, pytest ran nothing, or any test failed or reported a kernel warning.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import module_under_test

REPO = Path(__file__).resolve().parent.parent
PYTEST_NO_TESTS = 5
TARGET_RE = re.compile(r"debian-[0-9][0-9.]*(?:-[a-z][a-z0-9]*)?")
# Exceptions the harness raises when the console showed BUG/WARNING/oops/lockdep/KASAN/...
WARNING_MARKERS = ("KernelWarningError", "GuestCrashError")


@dataclass
class Cell:
    """One target x suite: counts and summed durations of its test cases."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    warnings: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped


def case_target(name: str, known: Iterable[str]) -> str:
    """The matrix target in a test id such as `test_x[debian-6.1-bookworm]` ('-' if none)."""
    params = name.partition("[")[2]
    for target in sorted(known, key=len, reverse=True):
        if re.search(rf"(^|-){re.escape(target)}(-|\]|$)", params):
            return target
    found = TARGET_RE.search(params)
    return found.group(0) if found else "-"


def summarize(junit: Path, targets: Sequence[str]) -> dict[tuple[str, str], Cell]:
    """(target, suite) -> Cell from a JUnit XML file (pytest's, xdist merged)."""
    cells: dict[tuple[str, str], Cell] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        suite = case.get("classname", "?").rsplit(".", 1)[-1]
        cell = cells.setdefault((case_target(case.get("name", ""), targets), suite), Cell())
        cell.seconds += float(case.get("time") or 0)
        bad = [child for child in case if child.tag in ("failure", "error")]
        if bad:
            cell.failed += 1
            text = " ".join((b.get("message") or "") + (b.text or "") for b in bad)
            cell.warnings += int(any(m in text for m in WARNING_MARKERS))
        elif case.find("skipped") is not None:
            cell.skipped += 1
        else:
            cell.passed += 1
    return cells


def _row(target: str, suite: str, c: Cell) -> str:
    return f"| {target} | {suite} | {c.passed} | {c.failed} | {c.skipped} | {c.seconds:.0f}s | {c.warnings} |"


def table(cells: dict[tuple[str, str], Cell]) -> str:
    """Markdown table, one row per target x suite, plus a total row per target."""
    lines = [
        "| target | suite | passed | failed | skipped | duration | kernel warnings |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for target in sorted({t for t, _ in cells}):
        rows = sorted((s, c) for (t, s), c in cells.items() if t == target)
        lines += [_row(target, suite, c) for suite, c in rows]
        total = Cell(
            passed=sum(c.passed for _, c in rows),
            failed=sum(c.failed for _, c in rows),
            skipped=sum(c.skipped for _, c in rows),
            seconds=sum(c.seconds for _, c in rows),
            warnings=sum(c.warnings for _, c in rows),
        )
        lines.append(_row(f"**{target}**", "all", total))
    return "\n".join(lines) + "\n"


def _targets(kernel: str) -> list[str]:
    from vmimages import matrix

    return list(matrix.targets()) if kernel == "all" else [k for k in kernel.split(",") if k]


def run(kernel: str, workers: str, junit: Path, deep_on: str | None, extra: Sequence[str]) -> int:
    targets = _targets(kernel)
    start = time.monotonic()
    print(f"=== matrix: building {', '.join(targets)}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "vmimages", "build", "--target", kernel], cwd=REPO)
    if rc != 0:
        print(f"matrix: image build failed (exit {rc})", file=sys.stderr)
        return 1
    built = time.monotonic() - start
    argv = [
        str(Path(sys.executable).with_name("pytest")), "-q", "tests/guest", "tests/regressions",
        f"--kernel={kernel}",
        "-n", workers, f"--junitxml={junit}",
    ]  # fmt: skip
    if deep_on:
        argv.append(f"--deep-on={deep_on}")
    argv += list(extra)
    print(f"=== matrix: {' '.join(argv)}", flush=True)
    rc = subprocess.call(argv, cwd=REPO)
    took = time.monotonic() - start - built
    if rc == PYTEST_NO_TESTS:
        print("matrix: pytest collected no tests (exit 5); that must not pass", file=sys.stderr)
        return 1
    if not junit.exists():
        print(f"matrix: pytest exited {rc} without writing {junit}", file=sys.stderr)
        return 1
    cells = summarize(junit, targets)
    text = table(cells)
    summary = junit.with_name("matrix-summary.md")
    summary.write_text(f"# Kernel matrix\n\nbuild {built:.0f}s, guest tests {took:.0f}s (wall)\n\n{text}")
    print(
        f"\n=== matrix summary (build {built:.0f}s, guest tests {took:.0f}s wall; {summary})\n{text}",
        flush=True,
    )
    failed = sum(c.failed for c in cells.values())
    warned = sum(c.warnings for c in cells.values())
    if rc != 0 or failed or warned:
        print(
            f"matrix: FAILED (pytest exit {rc}, {failed} failed, {warned} with kernel warnings)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ci.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default=os.environ.get("KERNELS", "all"))
    p.add_argument("-n", "--workers", default=os.environ.get("DBD_WORKERS", "2"))
    p.add_argument("--deep-on", default=None, help="passed to pytest (default: its own, 'auto')")
    p.add_argument("--junit", type=Path, default=REPO / "artifacts" / "junit-guest.xml")
    module_under_test.add_arguments(p)
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    a = p.parse_args(argv)
    try:
        chosen = module_under_test.choose(a.ko, a.module_src, a.module_build)
    except ValueError as e:
        p.error(str(e))
    a.junit.parent.mkdir(parents=True, exist_ok=True)
    return run(a.kernel, a.workers, a.junit.resolve(), a.deep_on, [*chosen.args(), *a.pytest_args])


if __name__ == "__main__":
    sys.exit(main())
