"""The cost-against-size verdicts of the benchmark pages: setup-snapshot against the COW size,
module memory per tracked TiB and blocks copied per backup round (host only, synthetic results)."""

from __future__ import annotations

from typing import Any

from benchmarks import runner
from benchmarks.snapshot_latency import cow_size_rows, small_falloc_mib


def _point(size_mib: int, falloc: int, setup_ms: float, memory_kib: float = 0.0) -> dict[str, Any]:
    spread = {"median": setup_ms, "min": setup_ms, "max": setup_ms}
    point: dict[str, Any] = {"series": "volume", "size_mib": size_mib, "falloc_arg": falloc, "runs": 1}
    point |= {op: dict(spread) for op in ("setup", "to_incremental", "to_snapshot")}
    point |= {"cow_setup_mib": falloc or size_mib / 10, "memory_kib_snapshot": memory_kib}
    point |= {"memory_kib_incremental": 2 * memory_kib}
    for mode, kib in (("snapshot", memory_kib), ("incremental", 2 * memory_kib)):
        point[f"memory_mib_per_tib_{mode}"] = kib / 1024 * 1024 * 1024 / size_mib
    return point


def _latency(default_ms: float) -> dict[str, Any]:
    return {
        "small_falloc_mib": 32,
        "target_ms": 150.0,
        "cow_ratio_target": 1.5,
        "target_volume_mib": 8192,
        "points": [_point(8192, 32, 60.0, 256), _point(8192, 0, default_ms, 256)],
    }


def test_setup_target_needs_both_the_ratio_and_the_bound() -> None:
    assert runner.latency_verdict(_latency(80.0))[0].endswith("**met**")
    assert "not met" in runner.latency_verdict(_latency(95.0))[0]  # x1.58
    slow = _latency(140.0)
    slow["points"][0]["setup"] = {"median": 130.0, "min": 130.0, "max": 130.0}
    assert runner.latency_verdict(slow)[0].endswith("**met**")  # x1.08, under 150 ms
    slow["points"][1]["setup"] |= {"median": 160.0}
    assert "not met" in runner.latency_verdict(slow)[0]  # x1.23 but over 150 ms
    old = {k: v for k, v in _latency(80.0).items() if k != "cow_ratio_target"}
    assert "no COW-size targets" in runner.latency_verdict(old)[0]


def test_memory_per_tib_comes_from_the_largest_volume() -> None:
    sl = _latency(80.0)
    sl["points"].append(_point(65536, 0, 90.0, 2048))
    line = runner.memory_lines(sl)[0]
    assert "on the 64 GiB volume: 2048 KiB in snapshot mode, 4096 KiB in incremental mode" in line
    assert "per tracked TiB 32.0 MiB and 64.0 MiB" in line


def test_cow_size_rows_and_the_fixed_cow_size() -> None:
    rows = cow_size_rows(_latency(90.0)["points"])
    assert rows == [
        {
            "size_mib": 8192,
            "cow_mib": 819.2,
            "small_cow_mib": 32,
            "setup_ratio": 1.5,
            "to_snapshot_ratio": 1.5,
        }
    ]
    assert small_falloc_mib(8192) == 32 and small_falloc_mib(65536) == 256  # twice the index


def _round(size_mib: int, change: str, written: int, copied: int) -> dict[str, Any]:
    return {"size_mib": size_mib, "change": change, "written_blocks": written, "nr_changed": copied,
            "copied": copied, "update_img_s": 1.0}  # fmt: skip


def test_round_cost_target_counts_the_sizes_that_meet_it() -> None:
    rc: dict[str, Any] = {"spurious_target": 64, "rounds": [_round(1024, "1M", 256, 282)]}
    rc["rounds"] += [_round(1024, "1%", 2560, 2648), _round(65536, "1M", 256, 491)]
    md = "\n".join(runner.render_round_cost(rc))
    assert "+26 at 1 GiB, +235 at 64 GiB: **met on 1 of 2 sizes**" in md
    assert "about 33 blocks per GiB of it here" in md  # (235 - 26) / (6.4 - 0.1) GiB of COW file
    assert "| 64 GiB | 1M | 256 | 491 | 491 | +235 | 1.0 |" in md
    rc["rounds"] = [r for r in rc["rounds"] if r["size_mib"] == 1024]
    assert "**met**" in "\n".join(runner.render_round_cost(rc))
    assert runner.render_round_cost({"rounds": []}) == []
