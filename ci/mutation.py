"""Mutation mode: how many of the planted bugs in ci/mutants/ the guest suite kills.

    ci/mutation [--kernel debian-6.1] [--only NAME,...] [-n 2] [-- PYTEST ARGS]

Each ci/mutants/<name>.patch is a realistic bug, a unified diff against kernel/ after a paragraph
that says what it breaks. For each one: kernel/ is copied, the patch applied, the module built for
the kernel, and the per-change tier of the guest suite run against it through --ko, shortest tests
first, stopping at the first failure (-x). A failing run kills the mutant, a passing one lets it
survive; a patch that no longer applies or builds is an error, not a kill. The table printed at
the end (also artifacts/mutation.md, with artifacts/mutation.json) gives each mutant's verdict, the
test that killed it and its first message line, and the kill rate. Exit status: 0 when every mutant was
killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTANTS = REPO / "ci" / "mutants"
TESTS = ("tests/guest", "tests/regressions")


@dataclass
class Outcome:
    mutant: str
    verdict: str  # killed, survived, error
    test: str = ""  # the first failing test
    message: str = ""  # its first message line, or why the run was an error
    minutes: float = 0.0


def mutants(only: Sequence[str] = ()) -> list[Path]:
    found = sorted(MUTANTS.glob("*.patch"))
    if only:
        missing = set(only) - {p.stem for p in found}
        if missing:
            raise SystemExit(f"mutation: no such mutant: {', '.join(sorted(missing))} (see {MUTANTS})")
        found = [p for p in found if p.stem in only]
    return found


def description(patch: Path) -> str:
    """The paragraph before the diff: what the planted bug breaks."""
    head = patch.read_text().split("\n--- ", 1)[0]
    return " ".join(head.split())


def apply(patch: Path, dest: Path) -> str:
    """kernel/ copied to dest/kernel with the patch applied; '' or why it does not apply."""
    shutil.copytree(
        REPO / "kernel", dest / "kernel", ignore=shutil.ignore_patterns("generated", "*.o", "*.ko")
    )
    p = subprocess.run(
        ["patch", "-p1", "-i", str(patch)], cwd=dest, capture_output=True, text=True, check=False
    )
    return "" if p.returncode == 0 else f"does not apply to kernel/: {(p.stdout + p.stderr).strip()}"


def first_failure(junit: Path) -> tuple[str, str]:
    """(test id, first message line) of the first failed or erroring test case in a JUnit file."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return "", ""
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                text = (bad.get("message") or bad.text or "").strip()
                return name, text.splitlines()[0][:200] if text else ""
    return "", ""


def verdict(rc: int, junit: Path) -> tuple[str, str, str]:
    """pytest's exit status and JUnit file as (verdict, test, message)."""
    test, message = first_failure(junit)
    if rc == 1 or (rc == 2 and test):  # with xdist, -x ends a failing run as interrupted (2)
        return "killed", test, message
    if rc == 0:
        return "survived", "", ""
    why = "no tests collected" if rc == 5 else f"pytest exit {rc}"
    return "error", test, message or why


def run_one(patch: Path, kernel: str, workers: str, extra: Sequence[str], work: Path) -> Outcome:
    from harness.errors import ModuleBuildError
    from harness.images import module_path
    from harness.pytest_plugin import SHORTEST_FIRST_ENV

    start = time.monotonic()
    name = patch.stem
    dest = work / name
    why = apply(patch, dest)
    if why:
        return Outcome(name, "error", message=why)
    try:
        ko = module_path(kernel, dest / "kernel")
    except ModuleBuildError as e:
        return Outcome(name, "error", message=f"does not build: {str(e).splitlines()[0]}")
    kodir = dest / "ko"
    kodir.mkdir()
    shutil.copyfile(ko, kodir / f"{kernel}.ko")
    logs = REPO / "artifacts" / "mutation" / name
    logs.mkdir(parents=True, exist_ok=True)
    junit = logs / "junit.xml"
    argv = [
        str(Path(sys.executable).with_name("pytest")), "-q", *TESTS, "--kernel", kernel, "--ko", str(kodir),
        "-x", "-n", workers, "-p", "no:cacheprovider", f"--junitxml={junit}", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "DBD_ARTIFACTS": str(logs),
        SHORTEST_FIRST_ENV: "1",
    }
    print(f"=== mutation {name}: {' '.join(argv)}", flush=True)
    rc = subprocess.call(argv, cwd=REPO, env=env)
    v, test, message = verdict(rc, junit)
    return Outcome(name, v, test, message, round((time.monotonic() - start) / 60, 1))


def report(outcomes: Sequence[Outcome], kernel: str) -> str:
    killed = sum(o.verdict == "killed" for o in outcomes)
    lines = [
        f"Mutation run on {kernel}: {killed} of {len(outcomes)} planted bugs killed"
        f" ({100 * killed // max(len(outcomes), 1)} %).",
        "",
        "| mutant | verdict | killed by / why | minutes |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        why = f"`{o.test}`: {o.message}" if o.test else o.message
        lines.append(f"| {o.mutant} | {o.verdict} | {why.replace('|', '/')} | {o.minutes} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ci/mutation", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="debian-6.1", help="one kernel target (default debian-6.1)")
    p.add_argument("--only", default="", help="comma list of mutant names (default: all of ci/mutants)")
    p.add_argument("-n", "--workers", default=os.environ.get("DBD_WORKERS", "2"))
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    a = p.parse_args(argv)
    chosen = mutants([n for n in a.only.split(",") if n])
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="dbd-mutation-") as tmp:
        for patch in chosen:
            outcomes.append(run_one(patch, a.kernel, a.workers, a.pytest_args, Path(tmp)))
            print(f"=== mutation {outcomes[-1].mutant}: {outcomes[-1].verdict}", flush=True)
    text = report(outcomes, a.kernel)
    out = REPO / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "mutation.md").write_text(text)
    (out / "mutation.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    print("\n" + text)
    return 0 if outcomes and all(o.verdict == "killed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
