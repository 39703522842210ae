"""guestlib.cowcorrupt: each variant is the corruption it claims, and pydbd's verifier sees it."""

from __future__ import annotations

from pathlib import Path

from guestlib import cowcorrupt
from pydbd import cow

SECTORS = 2000 * 8  # 2000 blocks


def _clean(tmp_path: Path, mode: str = "snapshot") -> bytes:
    path = tmp_path / f"clean-{mode}"
    cow.build_cow_file(path, SECTORS, mode=mode, changes=[3, 17, 1999])  # type: ignore[arg-type]
    assert cow.verify(path, SECTORS).ok
    return path.read_bytes()


def test_variants_are_deterministic_and_cover_every_kind(tmp_path: Path) -> None:
    clean = _clean(tmp_path)
    a, b = cowcorrupt.variants(clean, 9, 2000), cowcorrupt.variants(clean, 9, 2000)
    assert [(v.name, v.data) for v in a] == [(v.name, v.data) for v in b]
    names = " | ".join(v.name for v in a)
    for kind in (
        "magic",
        "not CLEAN",
        "INDEX_ONLY",
        "fpos",
        "fsize",
        "truncated",
        "past the file",
        "share slot",
    ):
        assert kind in names, kind
    assert all(v.data != clean for v in a)


def test_structural_variants_fail_pydbd_verification(tmp_path: Path) -> None:
    for mode in ("snapshot", "incremental"):
        clean = _clean(tmp_path, mode)
        for i, v in enumerate(cowcorrupt.variants(clean, 4, 2000)):
            # The mode flip is a valid file of the other mode (only reload's mode check sees it); header
            # counters such as fsize, seqid or version are adopted as they are (spec 4.4 and 4.5).
            if v.name == "INDEX_ONLY flipped" or not (v.must_refuse or "entr" in v.name or "flag" in v.name):
                continue
            path = tmp_path / f"{mode}-{i}"
            path.write_bytes(v.data)
            try:
                report = cow.verify(path, SECTORS)
            except OSError:
                continue
            assert not report.ok or not (report.header and report.header.clean), f"{mode}: {v.name} verifies"


def test_must_refuse_marks_the_spec_checks(tmp_path: Path) -> None:
    refuse = {v.name for v in cowcorrupt.variants(_clean(tmp_path), 1, 2000) if v.must_refuse}
    assert {"magic", "not CLEAN", "INDEX_ONLY flipped", "truncated to 0"} <= refuse
    assert "seqid 0" not in refuse
