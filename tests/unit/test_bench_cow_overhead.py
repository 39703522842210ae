"""Host-only tests of the write-overhead benchmark: fio commands of every job variant, parsing of
fio's group-reported JSON and of /proc/stat, and the rendering of a results document (with and
without the fields newer runs add)."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from benchmarks import cow_overhead as co
from benchmarks import runner
from benchmarks.guestcmd import BenchError


def fio_args(cmd: str) -> dict[str, str]:
    """--key=value options of a fio command line (flags without a value map to "")."""
    out = {}
    for word in shlex.split(cmd)[1:]:
        key, _, value = word.removeprefix("--").partition("=")
        out[key] = value
    return out


# ---------------------------------------------------------------- job variants and fio commands


def test_all_eight_variants_with_distinct_names_and_files() -> None:
    jobs = co.make_jobs(256, 128, co.ALL_JOBS)
    assert len(jobs) == 8
    assert len({j.name for j in jobs}) == 8
    assert len({j.filename for j in jobs}) == 8  # no variant rewrites another's blocks
    assert {(j.direct, j.numjobs) for j in jobs} == {(True, 1), (False, 1), (True, 4), (False, 4)}


def test_original_two_jobs_keep_their_names_and_files() -> None:
    seq, rand = co.make_jobs(256, 128)
    assert (seq.name, seq.filename, seq.direct, seq.numjobs) == ("seqwrite 1M", f"{co.MNT}/seq.dat", True, 1)
    assert (rand.name, rand.filename) == ("randwrite 4k", f"{co.MNT}/rand.dat")


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("rand-buffered", "randwrite 4k buffered"),
        ("seq-x4", "seqwrite 1M 4 jobs"),
        ("seq-buffered-x4", "seqwrite 1M buffered 4 jobs"),
    ],
)
def test_variant_names(key: str, name: str) -> None:
    (job,) = co.make_jobs(64, 32, (key,))
    assert job.name == name


def test_unknown_or_unsplittable_job_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown job"):
        co.make_jobs(64, 32, ("seq-x3",))
    with pytest.raises(ValueError, match="does not split"):
        co.make_jobs(6, 32, ("seq-x4",))  # 6 MiB is not 4 parts of whole 1 MiB blocks


def test_fio_cmd_direct_one_job_is_unchanged() -> None:
    (job,) = co.make_jobs(256, 128, ("seq",))
    a = fio_args(co.fio_cmd(job, 0))
    assert a["direct"] == "1" and a["numjobs"] == "1" and a["size"] == "256M"
    assert "end_fsync" not in a and "offset_increment" not in a and "group_reporting" not in a
    assert "runtime" not in a and "time_based" not in a  # a first-write pass covers the whole file


def test_fio_cmd_buffered_syncs_at_the_end() -> None:
    (job,) = co.make_jobs(256, 128, ("rand-buffered",))
    a = fio_args(co.fio_cmd(job, 5, timed=True))
    assert a["direct"] == "0" and a["end_fsync"] == "1"
    assert a["rw"] == "randwrite" and a["bs"] == "4k" and a["size"] == "128M"
    assert "time_based" in a and a["runtime"] == "5"


@pytest.mark.parametrize(("key", "part"), [("seq-x4", "64M"), ("rand-buffered-x4", "32M")])
def test_fio_cmd_four_jobs_write_one_quarter_each(key: str, part: str) -> None:
    (job,) = co.make_jobs(256, 128, (key,))
    a = fio_args(co.fio_cmd(job, 0))
    assert a["numjobs"] == "4" and "group_reporting" in a
    # job i writes [i * part, (i + 1) * part): together the file, once
    assert a["size"] == part and a["offset_increment"] == part
    assert a["filename"] == job.filename
    assert ("end_fsync" in a) == (not job.direct)


def test_fio_cmd_quarter_in_kib_when_not_whole_mib() -> None:
    (job,) = co.make_jobs(64, 6, ("rand-x4",))
    a = fio_args(co.fio_cmd(job, 0))
    assert a["size"] == "1536k" and a["offset_increment"] == "1536k"


def test_disk_grows_with_the_jobs() -> None:
    two = co.make_jobs(256, 128)
    eight = co.make_jobs(256, 128, co.ALL_JOBS)
    assert co.default_disk_mib(two) == co.DEFAULT_DISK_MIB
    disk = co.default_disk_mib(eight)
    files = sum(j.size_mib for j in eight)
    assert disk > co.DEFAULT_DISK_MIB
    # the files and a COW file preallocated for all of them fit, with room for ext4
    assert files + co.cow_mib_needed(eight, disk) + 64 <= disk
    assert co.cow_mib_needed(eight, disk) >= files


# ---------------------------------------------------------------- parsing fio and /proc/stat


def group_json(io_bytes: int, runtime_ms: int) -> dict[str, Any]:
    """fio 3.33's JSON for a 4-process job with group_reporting, trimmed to what matters: one entry
    in jobs, the group, whose bandwidth is the sum of all processes' bytes over the longest runtime."""
    bw = io_bytes * 1000 // runtime_ms
    write = {
        "io_bytes": io_bytes,
        "io_kbytes": io_bytes // 1024,
        "bw_bytes": bw,
        "bw": bw // 1024,
        "iops": io_bytes / 4096 * 1000 / runtime_ms,
        "runtime": runtime_ms,
        "total_ios": io_bytes // 4096,
        "clat_ns": {
            "min": 40000,
            "max": 9000000,
            "mean": 300000.5,
            "percentile": {"1.000000": 50000, "50.000000": 250880, "99.000000": 4014080},
        },
    }
    job = {
        "jobname": "bench",
        "groupid": 0,
        "error": 0,
        "elapsed": 3,
        "job_runtime": 4 * runtime_ms,
        "read": {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0, "runtime": 0, "clat_ns": {}},
        "write": write,
        "usr_cpu": 1.5,
        "sys_cpu": 20.25,
    }
    return {"fio version": "fio-3.33", "global options": {}, "jobs": [job]}


def test_parse_group_reported_fio() -> None:
    doc = group_json(io_bytes=32 * co.MIB, runtime_ms=2000)
    text = "note: both iodepth >= 1 and synchronous I/O engine are selected\n" + json.dumps(doc, indent=2)
    r = co.parse_fio(text, "randwrite 4k 4 jobs", "baseline")
    assert r.io_mib == pytest.approx(32)
    assert r.bw_mib_s == pytest.approx(16)  # all four processes' bytes over the group's runtime
    assert r.runtime_s == pytest.approx(2.0)
    assert r.iops == pytest.approx(4096)
    assert r.clat_p50_us == pytest.approx(250.88) and r.clat_p99_us == pytest.approx(4014.08)
    assert (r.job, r.phase) == ("randwrite 4k 4 jobs", "baseline")


STAT_BEFORE = "cpu  1000 20 3000 50000 400 10 60 5 0 0"
STAT_AFTER = "cpu  1150 20 3200 50100 450 12 68 5 0 0"


def test_cpu_delta_counts_busy_fields_only() -> None:
    before, after = co.parse_stat(STAT_BEFORE), co.parse_stat(STAT_AFTER)
    busy, elapsed = co.cpu_seconds(before, after)
    # user +150, system +200, irq +2, softirq +8 = 360 jiffies; idle +100 and iowait +50 are not busy
    assert busy == pytest.approx(3.60)
    assert elapsed == pytest.approx(5.10)


def test_parse_stat_refuses_other_lines() -> None:
    with pytest.raises(BenchError):
        co.parse_stat("cpu0 1 2 3 4 5 6 7 8 9 10")


def test_fio_output_between_two_stat_reads() -> None:
    fio_out = json.dumps(group_json(io_bytes=512 * co.MIB, runtime_ms=4000), indent=2)
    text = f"{STAT_BEFORE}\n{fio_out}\n{STAT_AFTER}\n"
    before, after, out = co.split_cpu(text)
    assert before == co.parse_stat(STAT_BEFORE) and after == co.parse_stat(STAT_AFTER)
    res = co.with_cpu_result(co.parse_fio(out, "seqwrite 1M", "baseline"), before, after)
    assert res.cpu_busy_s == pytest.approx(3.6)
    assert res.cpu_s_per_gib == pytest.approx(7.2)  # 3.6 s for half a GiB
    with pytest.raises(BenchError):
        co.split_cpu(fio_out)


def test_with_cpu_reads_stat_around_the_command_in_one_shell_line() -> None:
    cmd = co.with_cpu("fio --name=x")
    assert cmd.startswith(co.STAT_CMD) and cmd.endswith(co.STAT_CMD) and "fio --name=x" in cmd
    assert "\n" not in cmd and ";" not in cmd  # && : a failed fio fails the command


def fio_row(phase: str, bw: float, cpu: float, paired_cpu: tuple[float, ...] = ()) -> co.FioResult:
    return co.FioResult(
        "seqwrite 1M", phase, bw, bw, 100.0, 200.0, bw * 3, 3.0,
        runs_mib_s=(bw,), cpu_s_per_gib=cpu, runs_cpu_s_per_gib=(cpu,), paired_cpu=paired_cpu,
    )  # fmt: skip


def test_case_rows_cpu_ratio_paired_median_and_reference() -> None:
    fio = [
        fio_row("baseline", 100.0, 2.0),
        fio_row("snapshot first write", 30.0, 6.0, paired_cpu=(2.5, 3.5, 3.0)),
        fio_row("incremental", 95.0, 3.0),  # no pairs: against the untracked runs' median
    ]
    rows = {r["phase"]: r for r in co.case_rows({"fio": fio})}
    assert rows["snapshot first write"]["cpu_ratio"] == pytest.approx(3.0)
    assert rows["incremental"]["cpu_ratio"] == pytest.approx(1.5)
    assert co.references(fio)["seqwrite 1M"].cpu_s_per_gib == pytest.approx(2.0)


def test_old_results_without_cpu_give_no_cpu_ratio() -> None:
    old = co.FioResult("randwrite 4k", "baseline", 8.0, 2000.0, 300.0, 1700.0, 24.0, 3.0)
    (row,) = co.case_rows({"fio": [old]})
    assert row["cpu_ratio"] is None and row["cpu_s_per_gib"] is None
    assert row["bw_ratio"] == pytest.approx(1.0)


# ---------------------------------------------------------------- rendering


def case(phase: str, job: str, bw_ratio: float, cpu: bool) -> dict[str, Any]:
    c: dict[str, Any] = {
        "phase": phase,
        "job": job,
        "bw_mib_s": 100.0 * bw_ratio,
        "iops": 100.0,
        "clat_p50_us": 500.0,
        "clat_p99_us": 900.0,
        "io_mib": 300.0,
        "bw_ratio": bw_ratio,
        "p50_ratio": 1.0,
        "p99_ratio": 1.0,
        "paired_bw": [bw_ratio],
        "ref_runs_mib_s": [100.0],
        "target": runner.TARGETS.get(phase),
    }
    if cpu:
        c |= {"cpu_s_per_gib": 4.0 / bw_ratio, "cpu_ratio": round(1 / bw_ratio, 2), "paired_cpu": [1.0]}
    return c


def results_doc(new_fields: bool) -> dict[str, Any]:
    jobs: list[dict[str, Any]]
    if new_fields:
        jobs = [
            {"name": "seqwrite 1M", "size_mib": 64, "direct": True, "numjobs": 1},
            {"name": "randwrite 4k buffered 4 jobs", "size_mib": 16, "direct": False, "numjobs": 4},
        ]
    else:  # a run from before job variants and guest CPU
        jobs = [{"name": "seqwrite 1M", "size_mib": 64}, {"name": "randwrite 4k", "size_mib": 16}]
    phases = {"baseline": 1.0, runner.FIRST_WRITE: 0.25, runner.REWRITE: 0.97, runner.INCREMENTAL: 0.99}
    cases = [case(p, j["name"], r, new_fields) for j in jobs for p, r in phases.items()]
    reference = {
        j["name"]: {"bw_mib_s": 100.0, "clat_p50_us": 500.0, "clat_p99_us": 900.0, "runs": 3, "noise": 0.05}
        | ({"cpu_s_per_gib": 4.0} if new_fields else {})
        for j in jobs
    }
    cow = {
        "guest_kernel": "6.1.0-test",
        "guest_nproc": "1",
        **({"qemu_smp": "1,maxcpus=2"} if new_fields else {}),
        "fio_version": "fio-3.33",
        "sizes_mib": {"disk": 2048, "seq": 64, "rand": 16},
        "repeat": 3,
        "paired": True,
        "time_based_s": 2,
        "jobs": jobs,
        "cases": cases,
        "reference": reference,
    }
    meta = {
        "date": "2026-11-27 20:00 UTC",
        "command": "benchmarks/run --quick",
        "kernel_target": "debian-6.1",
        "quick": True,
        "nproc": 2,
        "cpu_model": "test CPU",
        "host_kernel": "6.0",
        "git": "abc123",
        "loadavg_before": ["1.0", "1.0", "1.0"],
    }
    entry = {"command": "benchmarks/cow_overhead.py", "rc": 0, "seconds": 1.0, "results": cow}
    return {"meta": meta, "benchmarks": {"cow_overhead": entry}}


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render without matplotlib: no plots, the tables only."""
    if not HAVE_MATPLOTLIB:
        monkeypatch.setattr(runner, "render_plots", lambda cow, plot_dir: [])


def render(doc: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bench.md"
    runner.render(doc, path, tmp_path / "bench")
    return path.read_text()


@pytest.mark.usefixtures("no_plots")
def test_render_new_jobs_and_cpu(tmp_path: Path) -> None:
    md = render(results_doc(new_fields=True), tmp_path)
    assert "buffered 4 jobs over 16 MiB (buffered, fsync at the end of the run, 4 processes, each" in md
    assert "| CPU s/GiB | CPU ratio |" in md
    assert "(6.1.0-test, 1 vCPU (QEMU `-smp 1,maxcpus=2`), fio-3.33)" in md
    # the first-write row of the buffered job: its CPU per GiB and ratio (4 / 0.25, 1 / 0.25)
    first = "| snapshot first write | randwrite 4k buffered 4 jobs |"
    row = next(ln for ln in md.splitlines() if ln.startswith(first))
    assert row.rstrip(" |").endswith("16.00 | 4.00")
    assert "Guest CPU seconds per GiB written / untracked reference" in md
    assert "guest CPU 4.00 s/GiB" in md
    # the targets table has rows for every job
    targets = [ln for ln in md.splitlines() if ln.startswith("| snapshot first write >= 0.3 |")]
    assert [ln.split("|")[2].strip() for ln in targets] == ["seqwrite 1M", "randwrite 4k buffered 4 jobs"]


@pytest.mark.usefixtures("no_plots")
def test_render_old_results_without_new_fields(tmp_path: Path) -> None:
    md = render(results_doc(new_fields=False), tmp_path)
    assert "CPU ratio" not in md and "Guest CPU" not in md
    assert "seqwrite 1M over 64 MiB (direct I/O, 1 process)" in md
    assert "(6.1.0-test, 1 vCPU, fio-3.33)" in md  # a results file from before -smp was recorded
    assert "| snapshot first write | randwrite 4k |" in md
    assert "| snapshot rewrite >= 0.9 | randwrite 4k | 0.97 | yes" in md


def rewrite_miss_doc(quick: bool, kept: bool) -> dict[str, Any]:
    """A run whose rewrite ratio misses by far more than its noise; kept: the cow section comes from
    an earlier run (whose quickness then decides, not the last command's)."""
    doc = results_doc(new_fields=True)
    for c in doc["benchmarks"]["cow_overhead"]["results"]["cases"]:
        if c["phase"] == runner.REWRITE:
            c["bw_ratio"], c["paired_bw"] = 0.5, [0.5]
    if kept:
        doc["benchmarks"]["cow_overhead"]["kept_from"] = {"date": "earlier", "quick": quick}
        doc["meta"]["quick"] = not quick
    else:
        doc["meta"]["quick"] = quick
    return doc


@pytest.mark.usefixtures("no_plots")
@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("quick", [False, True])
def test_a_miss_asks_for_a_full_run_only_when_the_cow_run_was_quick(
    tmp_path: Path, quick: bool, kept: bool
) -> None:
    md = render(rewrite_miss_doc(quick, kept), tmp_path)
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| snapshot rewrite >= 0.9 | seqwrite 1M |")]
    assert "| **no** |" in row and "preserved-blocks check" in row
    assert ("needs a full-size run" in row) == quick


@pytest.mark.usefixtures("no_plots")
@pytest.mark.parametrize("own_date", [True, False])
def test_a_kept_section_names_its_own_start_like_the_overview(tmp_path: Path, own_date: bool) -> None:
    doc = results_doc(new_fields=True)
    entry = doc["benchmarks"]["cow_overhead"]
    entry["kept_from"] = {"date": "2026-11-27 22:34 UTC", "command": "benchmarks/run --kernel debian-6.1"}
    if own_date:
        entry["date"] = "2026-11-27 23:20 UTC"
    (line,) = [ln for ln in render(doc, tmp_path).splitlines() if ln.startswith("  - cow_overhead:")]
    # an older record without the section's own start falls back to its run's
    started = "2026-11-27 23:20 UTC" if own_date else "2026-11-27 22:34 UTC"
    assert line == f"  - cow_overhead: {started}, `benchmarks/run --kernel debian-6.1`"


@pytest.mark.usefixtures("no_plots")
def test_untracked_speed_names_the_spread_of_single_pairs(tmp_path: Path) -> None:
    doc = results_doc(new_fields=True)
    for c in doc["benchmarks"]["cow_overhead"]["results"]["cases"]:
        if c["phase"] == "baseline" and c["job"] == "seqwrite 1M":
            c["paired_bw"] = [0.8, 1.25, 1.0]
    lines = [ln for ln in render(doc, tmp_path).splitlines() if "(median of the" in ln]
    (seq,) = [ln for ln in lines if ln.startswith("- seqwrite 1M:")]
    assert seq.endswith("; its 3 single untracked pairs from 0.80 to 1.25")
    # one pair has no spread to state
    (other,) = [ln for ln in lines if ln.startswith("- randwrite 4k buffered 4 jobs:")]
    assert "single untracked pairs" not in other


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed: plots not rendered")
@pytest.mark.parametrize("new_fields", [True, False])
def test_render_plots_per_job(tmp_path: Path, new_fields: bool) -> None:
    md = render(results_doc(new_fields), tmp_path)
    names = ["seqwrite_1m", "randwrite_4k_buffered_4_jobs" if new_fields else "randwrite_4k"]
    for slug in names:
        png = tmp_path / "bench" / f"cow_overhead_{slug}.png"
        assert png.stat().st_size > 1000
        assert f"(bench/cow_overhead_{slug}.png)" in md


def test_quick_selection_is_four_known_jobs() -> None:
    (cow,) = [b for b in runner.benches("debian-6.1") if b.key == "cow_overhead"]
    keys = cow.quick[cow.quick.index("--jobs") + 1].split(",")
    assert len(keys) == 4 and set(keys) <= set(co.ALL_JOBS)
    assert "--jobs" not in cow.full  # the full run: all eight
    i = cow.quick.index("--seq-size")
    co.make_jobs(int(cow.quick[i + 1]), int(cow.quick[cow.quick.index("--rand-size") + 1]), tuple(keys))
