"""ci.matrix: JUnit XML of a guest run -> target x suite summary (no guests)."""

from __future__ import annotations

from pathlib import Path

from ci import matrix

TARGETS = ["debian-5.10", "debian-6.1", "debian-6.12", "debian-7.2"]
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.guest.test_lifecycle" name="test_cycle[debian-6.1-bookworm]" time="90.5"/>
<testcase classname="tests.guest.test_lifecycle" name="test_cycle[debian-6.12-trixie]" time="80.0">
  <failure message="AssertionError: state 1">assert 1 == 3</failure></testcase>
<testcase classname="tests.guest.test_module_basic" name="test_load[debian-6.12]" time="10.0">
  <error message="harness.errors.KernelWarningError: WARNING: at kernel/x.c">trace</error></testcase>
<testcase classname="tests.guest.test_module_basic" name="test_load[debian-6.1]" time="9.5"/>
<testcase classname="tests.guest.test_scenarios" name="test_chain[debian-6.1-disk-ext4]" time="100"/>
<testcase classname="tests.guest.test_module_basic" name="test_other[debian-6.1]" time="1">
  <skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def test_case_target_prefers_the_longest_known_name() -> None:
    assert matrix.case_target("test_x[debian-6.12-trixie]", TARGETS) == "debian-6.12"
    assert matrix.case_target("test_x[ext4-debian-6.1]", TARGETS) == "debian-6.1"
    assert (
        matrix.case_target("test_x[debian-6.12-debug]", [*TARGETS, "debian-6.12-debug"])
        == "debian-6.12-debug"
    )
    assert matrix.case_target("test_plain", TARGETS) == "-"


def test_summary_counts_failures_warnings_and_durations(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    junit.write_text(JUNIT)
    cells = matrix.summarize(junit, TARGETS)
    assert cells[("debian-6.1", "test_lifecycle")] == matrix.Cell(passed=1, seconds=90.5)
    assert cells[("debian-6.12", "test_lifecycle")] == matrix.Cell(failed=1, seconds=80.0)
    assert cells[("debian-6.12", "test_module_basic")] == matrix.Cell(failed=1, seconds=10.0, warnings=1)
    assert cells[("debian-6.1", "test_module_basic")] == matrix.Cell(passed=1, skipped=1, seconds=10.5)
    text = matrix.table(cells)
    assert "| debian-6.12 | test_module_basic | 0 | 1 | 0 | 10s | 1 |" in text
    assert "| **debian-6.1** | all | 3 | 0 | 1 | 201s | 0 |" in text
    assert "| **debian-6.12** | all | 0 | 2 | 0 | 90s | 1 |" in text
