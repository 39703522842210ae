"""Host-only tests of the benchmark pages across the kernel matrix: each kernel's results file and
page under doc/benchmarks/<kernel>/, and the overview that puts the targets side by side."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import matrix, runner
from tests.unit.test_bench_cow_overhead import HAVE_MATPLOTLIB, results_doc


def kernel_doc(kernel: str, ratios: dict[str, float], noise: float = 0.05) -> dict[str, Any]:
    """A results document of one kernel whose phases have the given throughput ratios."""
    doc = copy.deepcopy(results_doc(new_fields=True))
    doc["meta"] |= {"kernel_target": kernel, "quick": False}
    cow = doc["benchmarks"]["cow_overhead"]["results"]
    for c in cow["cases"]:
        if c["phase"] in ratios:
            c["bw_ratio"] = ratios[c["phase"]]
            c["paired_bw"] = [ratios[c["phase"]]]
    for ref in cow["reference"].values():
        ref["noise"] = noise
    cow["guest_kernel"] = kernel.removeprefix("debian-") + ".0-test"
    return doc


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAVE_MATPLOTLIB:
        monkeypatch.setattr(runner, "render_plots", lambda cow, plot_dir: [])
        monkeypatch.setattr(matrix, "matrix_plot", lambda cows, plot_dir: None)


def write_results(root: Path, docs: dict[str, dict[str, Any]]) -> Path:
    """The layout benchmarks/run keeps: <root>/<kernel>/results.json beside <root>.md."""
    for kernel, doc in docs.items():
        (root / kernel).mkdir(parents=True)
        (root / kernel / "results.json").write_text(json.dumps(doc))
    return root.with_suffix(".md")


def test_kernels_in_version_order() -> None:
    names = ["debian-7.2", "debian-6.12-debug", "debian-5.10", "debian-6.12", "debian-6.1"]
    assert sorted(names, key=matrix.kernel_key) == [
        "debian-5.10", "debian-6.1", "debian-6.12", "debian-6.12-debug", "debian-7.2"
    ]  # fmt: skip


def test_miss_kinds() -> None:
    assert matrix.miss_kind(0.95, 0.9, 0.1) == ""
    assert matrix.miss_kind(0.85, 0.9, 0.1) == "noise"  # 0.05 below, noise is 0.085
    assert matrix.miss_kind(0.70, 0.9, 0.1) == "miss"
    assert matrix.miss_kind(0.89, 0.9, None) == "miss"


@pytest.mark.usefixtures("no_plots")
def test_overview_side_by_side_with_misses_and_why(tmp_path: Path) -> None:
    docs = {
        "debian-6.1": kernel_doc("debian-6.1", {runner.FIRST_WRITE: 0.4, runner.REWRITE: 0.97}),
        # 5.10 misses the rewrite target beyond its noise and the first write within it
        "debian-5.10": kernel_doc("debian-5.10", {runner.FIRST_WRITE: 0.29, runner.REWRITE: 0.7}),
    }
    overview = write_results(tmp_path / "benchmarks", docs)
    written = runner.render_all(overview)
    assert written == [tmp_path / "benchmarks" / "debian-5.10.md", tmp_path / "benchmarks" / "debian-6.1.md",
                       overview]  # fmt: skip
    md = overview.read_text()
    lines = md.splitlines()
    assert "| job | debian-5.10 | debian-6.1 |" in lines  # version order, not file order
    assert "| seqwrite 1M | *0.29* / **0.70** / 0.99 | 0.40 / 0.97 / 0.99 |" in lines
    assert "- debian-5.10: 2 of 6 targets met, 2 missed within the run's noise, 2 beyond it; " in md
    assert "- debian-6.1: 6 of 6 targets met, 0 missed within the run's noise, 0 beyond it" in md
    assert "**snapshot rewrite >= 0.9**, missed by:" in md
    assert "- debian-5.10, seqwrite 1M: 0.70 (pairs 0.70; noise 5%)" in lines
    assert "- debian-5.10, seqwrite 1M: 0.29 (within its noise) (pairs 0.29; noise 5%)" in lines
    assert f"What would close it: {runner.CLOSE[runner.REWRITE]}." in md
    assert "**incremental >= 0.95**" not in md  # met everywhere: no section
    assert "[debian-5.10](benchmarks/debian-5.10.md)" in md
    machine = "2 CPUs (test CPU), host kernel 6.0"
    assert f"| cow_overhead | cow_overhead: 2026-11-27 20:00 UTC | {machine} | abc123 | no |" in md
    # each kernel's page names its kernel and links back up
    page = (tmp_path / "benchmarks" / "debian-5.10.md").read_text()
    assert page.startswith("# Benchmarks on debian-5.10\n")
    assert "[benchmarks.md](../benchmarks.md)" in page
    assert f"would close it: {runner.CLOSE[runner.REWRITE]}" in page
    # no latency, update-img or boot results: no such sections
    assert "## Snapshot creation latency" not in md and "## Guest boot" not in md


def test_a_miss_names_the_spread_of_its_jobs_single_untracked_pairs() -> None:
    doc = kernel_doc("debian-5.10", {runner.REWRITE: 0.7})
    cow = doc["benchmarks"]["cow_overhead"]["results"]
    for c in cow["cases"]:
        if c["phase"] == "baseline" and c["job"] == "seqwrite 1M":
            c["paired_bw"] = [0.9, 1.2, 1.05]
    lines = matrix.misses({"debian-5.10": cow})[runner.REWRITE]
    spread = "its 3 single untracked pairs from 0.90 to 1.20"
    assert lines[0] == f"debian-5.10, seqwrite 1M: 0.70 (pairs 0.70; noise 5%; {spread})"


def test_a_section_kept_from_a_run_on_another_machine_names_that_machine(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    earlier = kernel_doc("debian-5.10", {})
    earlier["meta"] |= {"cpu_model": "old CPU", "host_kernel": "5.0", "git": "old111"}
    earlier["benchmarks"]["snapshot_latency"] = {"rc": 0, "date": "2026-11-01 10:00 UTC", "results": {}}
    out.write_text(json.dumps(earlier))
    kept = runner.earlier_entries(out, running={"cow_overhead"})
    assert set(kept) == {"snapshot_latency"}
    now = kernel_doc("debian-5.10", {})
    now["benchmarks"] |= kept
    row = matrix.run_row("debian-5.10", now, tmp_path / "b.md")
    started, machine, source = row[4:7]
    assert started == "cow_overhead: 2026-11-27 20:00 UTC; snapshot_latency: 2026-11-01 10:00 UTC"
    assert machine.split("; ") == [
        "2 CPUs (test CPU), host kernel 6.0",
        "2 CPUs (old CPU), host kernel 5.0 (snapshot_latency)",
    ]
    assert source == "abc123; old111 (snapshot_latency)"
    # a section kept before the machine was recorded says so instead of borrowing the new run's
    del now["benchmarks"]["snapshot_latency"]["kept_from"]["cpu_model"]
    assert "not recorded (snapshot_latency)" in matrix.run_row("debian-5.10", now, tmp_path / "b.md")[5]


@pytest.mark.usefixtures("no_plots")
def test_host_benchmarks_from_the_newest_run(tmp_path: Path) -> None:
    def boot(target: str, ready: float) -> dict[str, Any]:
        median = {"boot-to-ready": ready, "warm start": ready, "close": 0.3}
        e = {"build_warm_s": 0.1, "median_s": median, "runs": {"boot-to-ready": [ready]}}
        return {"targets": {target: e}, "default_target": target}

    old, new = kernel_doc("debian-6.1", {}), kernel_doc("debian-6.12", {})
    old["benchmarks"]["guest_boot"] = {
        "rc": 0,
        "date": "2026-11-01 10:00 UTC",
        "results": boot("old-target", 9.0),
    }
    new["benchmarks"]["guest_boot"] = {
        "rc": 0,
        "date": "2026-11-02 10:00 UTC",
        "results": boot("new-target", 2.0),
    }
    overview = write_results(tmp_path / "b", {"debian-6.1": old, "debian-6.12": new})
    matrix.render_overview(matrix.load_all(tmp_path / "b"), overview, tmp_path / "b")
    md = overview.read_text()
    assert "new-target" in md and "old-target" not in md
    assert "(From the debian-6.12 run of 2026-11-02 10:00 UTC.)" in md


def test_unreadable_results_are_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "debian-6.1").mkdir()
    (tmp_path / "debian-6.1" / "results.json").write_text("{not json")
    assert matrix.load_all(tmp_path) == {}
    assert "benchmarks/run --kernel debian-6.1 again" in capsys.readouterr().out


def test_empty_overview_says_how_to_fill_it(tmp_path: Path) -> None:
    matrix.render_overview({}, tmp_path / "b.md", tmp_path / "b")
    assert "No results yet: run `benchmarks/run`." in (tmp_path / "b.md").read_text()


@pytest.mark.usefixtures("no_plots")
def test_run_writes_kernel_results_page_and_overview(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/run --kernel K: results and page under the overview's folder, logs under artifacts,
    then the overview from every kernel (one kept from before)."""
    earlier = kernel_doc("debian-5.10", {runner.REWRITE: 0.5})
    earlier["benchmarks"]["snapshot_latency"] = {"rc": 1, "error": "guest hung"}
    overview = write_results(tmp_path / "benchmarks", {"debian-5.10": earlier})
    fresh = kernel_doc("debian-7.2", {})["benchmarks"]["cow_overhead"]

    def fake_run(b: runner.Bench, quick: bool, log_dir: Path) -> dict[str, Any]:
        assert log_dir == tmp_path / "logs" / "debian-7.2"
        return fresh

    monkeypatch.setattr(runner, "run_bench", fake_run)
    monkeypatch.setattr(runner, "LOG_ROOT", tmp_path / "logs")
    rc = runner.main(["--kernel", "debian-7.2", "--only", "cow", "--overview", str(overview)])
    assert rc == 0
    saved = json.loads((tmp_path / "benchmarks" / "debian-7.2" / "results.json").read_text())
    assert saved["meta"]["kernel_target"] == "debian-7.2"
    assert (tmp_path / "benchmarks" / "debian-7.2.md").read_text().startswith("# Benchmarks on debian-7.2")
    md = overview.read_text()
    assert "| job | debian-5.10 | debian-7.2 |" in md
    assert "**0.50**" in md  # the earlier kernel's miss is still on the page
    assert "cow_overhead, snapshot_latency (**failed**)" in md
    assert "- debian-5.10, snapshot_latency: guest hung" in md.splitlines()


def test_update_img_targets_of_issue_2() -> None:
    def case(name: str, blocks: int, seconds: float, faster: float, share: float) -> dict[str, Any]:
        return {"case": name, "blocks": blocks, "seconds": seconds, "mib_s": 1.0, "x_faster_than_dd": faster,
                "bw_vs_dd": share, "max_rss_mib": 20.0}  # fmt: skip

    ui = {
        "size_mib": 1024,
        "repeat": 3,
        "page_cache_dropped": True,
        "dd": {"mib_s": 1024.0, "seconds": 1.0},
        "targets": {"1% scattered x faster": 20, "clustered bw vs dd": 0.7, "max_rss_mib": 64},
        "cases": [
            case("1% scattered", 2621, 0.1, 10.0, 0.1),
            case("10% clustered", 26112, 0.1, 9.0, 0.8),
            case("50% clustered", 131072, 0.7, 1.4, 0.6),
            case("1% scattered, 4 KiB I/O", 2621, 0.1, 1.0, 0.01),
        ],
    }
    text = "\n".join(runner.render_update_img(ui))
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1") or ln.startswith("| 5")]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == [
        ">= 20x: **no**", ">= 70% of dd: yes", ">= 70% of dd: **no**", "-"
    ]  # fmt: skip
    # 1 GiB/s: 4 KiB every 3.8 µs; 20x at 1 % needs a block in 100 * 3.8 / 20 = 19 µs; it took 38
    assert "- 1% scattered: 2621 blocks at 38 µs each" in text
    assert "needs a block in 19 µs" in text
    assert "- 50% clustered: 512 MiB in 700 ms" in text
    assert "10% clustered:" not in text.split("Missed targets of issue 2")[1]


def test_failure_line_is_the_benchmarks_own_reason(tmp_path: Path) -> None:
    reason = "snapshot first write randwrite 4k 4 jobs: the guest stopped completing I/O"
    log = tmp_path / "cow_overhead.log"
    log.write_text(f"setup\n\nFAILED: {reason}\ncpu  1 2 3\nmore dump\n")
    assert runner.failure_line(log) == reason
    assert runner.failure_line(tmp_path / "missing.log") == ""


@pytest.mark.usefixtures("no_plots")
def test_a_run_stopped_before_the_targets_is_listed_not_tabled(tmp_path: Path) -> None:
    stopped = kernel_doc("debian-5.10", {})
    cow = stopped["benchmarks"]["cow_overhead"]
    cow["results"]["cases"] = [c for c in cow["results"]["cases"] if c["phase"] == "baseline"]
    cow |= {"rc": 1, "error": "cow_overhead.py exited with status 1: the guest stopped completing I/O"}
    docs = {"debian-5.10": stopped, "debian-6.1": kernel_doc("debian-6.1", {})}
    overview = write_results(tmp_path / "b", docs)
    runner.render_all(overview)
    md = overview.read_text()
    assert "| job | debian-6.1 |" in md.splitlines()
    assert "Write overhead not measured on: debian-5.10 (see Failed above)." in md
    assert "- debian-5.10, cow_overhead: cow_overhead.py exited with status 1: the guest stopped" in md


def test_a_miss_is_never_rounded_up_to_its_goal() -> None:
    assert runner.ratio_text(0.9497, 0.95) == "0.950"
    assert runner.ratio_text(0.9449, 0.95) == "0.94"
    assert runner.ratio_text(0.951, 0.95) == "0.95"
