"""Rendering of benchmarks/guest_boot.py's results in doc/benchmarks.md (host only)."""

from __future__ import annotations

from typing import Any

from benchmarks.runner import render_boot


def _entry(ready: float, warm: float, per_workers: dict[str, float] | None) -> dict[str, Any]:
    runs = {"boot-to-ready": [ready] * 3, "warm start": [warm] * 3, "close": [0.2] * 3}
    e: dict[str, Any] = {"build_warm_s": 0.5, "runs": runs, "median_s": {k: v[0] for k, v in runs.items()}}
    if per_workers is not None:
        e["guests_per_min"] = per_workers
    return e


def test_boot_section_shows_throughput_per_worker_count_and_issue_3_targets() -> None:
    gb = {
        "default_target": "debian-6.1",
        "cold_build_s": 720.0,
        "targets": {
            "debian-5.10": _entry(4.4, 4.6, {"1": 11.0, "2": 19.5}),
            "debian-6.1": _entry(3.6, 3.8, {"1": 12.25, "2": 21.0}),
        },
    }
    text = "\n".join(render_boot(gb))
    row = next(line for line in text.splitlines() if line.startswith("| debian-6.1 |"))
    assert "| 12.2 |" in row or "| 12.3 |" in row
    assert row.endswith("| 21.0 |")
    assert "| boot to a ready shell on debian-6.1 | <= 4 s | 3.60 s | yes |" in text
    assert "| warm start on debian-6.1 | < 10 s | 3.80 s | yes |" in text
    assert "| cold build of debian-5.10, debian-6.1 | <= 10 min | 12.0 min | **no** |" in text


def test_boot_section_of_an_older_run_without_throughput_or_targets() -> None:
    gb = {"targets": {"debian-6.1": _entry(4.5, 4.7, None)}}
    text = "\n".join(render_boot(gb))
    assert "not run" in text
    # no default_target recorded: the first target stands for it; no cold build measured
    assert "| boot to a ready shell on debian-6.1 | <= 4 s | 4.50 s | **no** |" in text
    assert "cold build" not in text
