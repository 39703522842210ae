"""The project's test command: lint, host-only tests, then guest tests on the kernel matrix.

Each stage prints its duration; the run stops at the first failing stage. pytest's exit code 5
("no tests collected") counts as a failure: a stage that ran nothing proved nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PYTEST_NO_TESTS = 5


def _tool(name: str) -> str:
    return str(VENV_BIN / name)


class StageFailed(Exception):
    pass


def _run_stage(title: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> float:
    print(f"\n=== {title}: {' '.join(argv)}", flush=True)
    start = time.monotonic()
    rc = subprocess.call(list(argv), cwd=REPO, env=env)
    took = time.monotonic() - start
    if rc == PYTEST_NO_TESTS and Path(argv[0]).name == "pytest":
        raise StageFailed(f"{title}: pytest collected no tests (exit 5); that must not pass")
    if rc != 0:
        raise StageFailed(f"{title}: exit status {rc} after {took:.1f}s")
    print(f"=== {title}: ok in {took:.1f}s", flush=True)
    return took


def _kernels(arg: str | None) -> str:
    if arg:
        return arg
    return os.environ.get("KERNELS", "all")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run-tests", description=__doc__)
    parser.add_argument("--unit", action="store_true", help="lint and host-only tests only")
    parser.add_argument("--kernel", help="guest tests on these targets (comma list or 'all')")
    parser.add_argument("-n", "--workers", default=os.environ.get("DBD_WORKERS", "2"))
    parser.add_argument(
        "--no-long",
        dest="long",
        action="store_false",
        help="leave out the tests marked long (on the default kernel: the XFS incremental chain and "
        "power cut; about 2 minutes of wall time)",
    )
    args = parser.parse_args(argv)

    artifacts = Path(os.environ.get("DBD_ARTIFACTS", REPO / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []
    try:
        timings.append(("ruff", _run_stage("lint: ruff", [_tool("ruff"), "check", "."])))
        timings.append(
            ("ruff format", _run_stage("lint: ruff format", [_tool("ruff"), "format", "--check", "."]))
        )
        timings.append(
            (
                "mypy",
                _run_stage(
                    "lint: mypy --strict",
                    [
                        _tool("mypy"),
                        "--strict",
                        "pydbd",
                        "guestlib",
                        "fuzz/model.py",
                        "fuzz/run.py",
                        "doc/mkman.py",
                        "ci",
                    ],
                ),
            )
        )
        timings.append(
            (
                "unit",
                _run_stage(
                    "host tests",
                    [
                        _tool("pytest"),
                        "-q",
                        "tests/unit",
                        "fuzz",
                        f"--junitxml={artifacts / 'junit-unit.xml'}",
                    ],
                    env={**os.environ, "HYPOTHESIS_PROFILE": "ci"},
                ),
            )
        )
        if not args.unit:
            kernels = _kernels(args.kernel)
            timings.append(
                (
                    "matrix",
                    _run_stage(
                        "kernel matrix (images, guest tests, summary)",
                        [
                            sys.executable,
                            "-m",
                            "ci.matrix",
                            f"--kernel={kernels}",
                            "-n",
                            str(args.workers),
                            f"--junit={artifacts / 'junit-guest.xml'}",
                            # the long tests are all deep: with --kernel all they run on the
                            # default kernel only, where they run in full
                            *(["--", "--long"] if args.long else []),
                        ],
                    ),
                )
            )
    except StageFailed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\n=== stage durations")
        for name, took in timings:
            print(f"  {name:<12} {took:8.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
