"""The planted bugs of ci/mutants/ and the mutation runner's verdicts (host only)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ci import mutation

PATCHES = mutation.mutants()


def test_there_are_at_least_ten_planted_bugs() -> None:
    assert len(PATCHES) >= 10, [p.name for p in PATCHES]


@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_each_planted_bug_says_what_it_breaks_and_still_applies(patch: Path) -> None:
    assert len(mutation.description(patch)) > 40, f"{patch.name}: describe the bug before the diff"
    p = subprocess.run(
        ["patch", "-p1", "--dry-run", "-i", str(patch)],
        cwd=mutation.REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, f"{patch.name} no longer applies to kernel/: {p.stdout}{p.stderr}"


def test_apply_copies_kernel_and_patches_the_copy_only(tmp_path: Path) -> None:
    patch = next(p for p in PATCHES if p.stem == "copy-twice")
    assert mutation.apply(patch, tmp_path) == ""
    assert "& COW_PENDING)" in (tmp_path / "kernel" / "tracer.c").read_text()
    assert "& COW_PENDING)" not in (mutation.REPO / "kernel" / "tracer.c").read_text()


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3" failures="1">
<testcase classname="tests.guest.test_a" name="test_ok[debian-6.1]" time="1"/>
<testcase classname="tests.guest.test_b" name="test_bad[debian-6.1]" time="2">
<failure message="AssertionError: the snapshot shows a write&#10;second line">trace</failure></testcase>
</testsuite></testsuites>
"""


def test_verdicts_from_pytest_status_and_junit(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    assert mutation.verdict(1, junit) == (
        "killed",
        "tests.guest.test_b::test_bad[debian-6.1]",
        "AssertionError: the snapshot shows a write",
    )
    assert mutation.verdict(2, junit)[0] == "killed"  # xdist's -x: interrupted after the failure
    assert mutation.verdict(0, junit)[0] == "survived"
    assert mutation.verdict(5, tmp_path / "none.xml") == ("error", "", "no tests collected")
    assert mutation.verdict(2, tmp_path / "none.xml") == ("error", "", "pytest exit 2")


def test_report_gives_the_kill_rate_and_each_survivor() -> None:
    text = mutation.report(
        [
            mutation.Outcome("a", "killed", "t::x", "boom", 1.0),
            mutation.Outcome("b", "survived", minutes=20.0),
        ],
        "debian-6.1",
    )
    assert text.startswith("Mutation run on debian-6.1: 1 of 2 planted bugs killed (50 %).")
    assert "| b | survived |  | 20.0 |" in text
