"""Host tests of the COW file format module: geometry, header, streaming reads, verifier, builder, diff."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydbd import cow
from pydbd.cow import (
    CLEAN,
    INDEX_ONLY,
    MAGIC,
    VMALLOC_UPPER,
    CowFile,
    CowFormatError,
    CowHeader,
    build_cow_file,
    diff_cow,
    entry_offset,
    geometry,
    verify,
)

SECTORS_256M = 256 * 1024 * 1024 // 512
SMALL = 1000 * 8  # 1000 blocks: one section with padding entries after nblocks


def header(**overrides: object) -> CowHeader:
    fields: dict[str, object] = {
        "magic": MAGIC,
        "flags": CLEAN | INDEX_ONLY,
        "fpos": 129,
        "fsize": 528384,
        "seqid": 7,
        "uuid": bytes(range(0xA0, 0xB0)),
        "version": 1,
        "nr_changed_blocks": 3,
    }
    fields.update(overrides)
    return CowHeader(**fields)  # type: ignore[arg-type]


def report_for(path: Path, sectors: int | None = SMALL) -> cow.VerifyReport:
    return verify(path, sectors)


def offsets_of(report: cow.VerifyReport, rule: str) -> list[int]:
    return sorted(v.offset for v in report.violations if v.rule == rule)


# ---------------------------------------------------------------- geometry


def test_geometry_of_the_256_mib_test_device() -> None:
    g = geometry(SECTORS_256M)
    assert (g.nblocks, g.nsect, g.index_bytes) == (65536, 16, 524288)
    assert g.data_offset == 528384
    assert g.first_data_block == 129


@pytest.mark.parametrize(
    ("sectors", "nblocks", "nsect"),
    [(8, 1, 1), (15, 1, 1), (4096 * 8, 4096, 1), (4097 * 8, 4097, 2), (2**31, 2**28, 2**16)],
)
def test_geometry_rounding(sectors: int, nblocks: int, nsect: int) -> None:
    g = geometry(sectors)
    assert (g.nblocks, g.nsect) == (nblocks, nsect)
    assert g.first_data_block == 1 + 8 * nsect
    assert g.data_offset == 4096 + nsect * 32768


@pytest.mark.parametrize("sectors", [0, 1, 7])
def test_geometry_of_a_device_under_4_kib_has_one_section(sectors: int) -> None:
    # The module never makes an index of 0 sections (cow_alloc rounds up to 1): the partial block of
    # a device smaller than one 4 KiB block still owns entry 0.
    g = geometry(sectors)
    assert (g.nblocks, g.nsect) == (0, 1)
    assert g.data_offset == 4096 + 32768 and g.first_data_block == 9
    assert g.entries_in_use == (1 if sectors else 0)
    assert g.has_partial_block == bool(sectors)


def test_partial_block_flag() -> None:
    assert geometry(SMALL + 3).has_partial_block
    assert not geometry(SMALL).has_partial_block


# ---------------------------------------------------------------- header


def test_header_pack_layout_is_byte_exact() -> None:
    raw = header().pack()
    assert len(raw) == 64
    assert raw[:4] == bytes.fromhex("a8120000")
    assert struct.unpack_from("<I", raw, 4)[0] == CLEAN | INDEX_ONLY
    assert struct.unpack_from("<QQQ", raw, 8) == (129, 528384, 7)
    assert raw[32:48] == bytes(range(0xA0, 0xB0))
    assert struct.unpack_from("<QQ", raw, 48) == (1, 3)


def test_header_round_trip_and_properties() -> None:
    h = header(flags=CLEAN | VMALLOC_UPPER)
    again = CowHeader.unpack(h.pack() + b"trailing bytes are ignored")
    assert again == h
    assert again.clean and not again.index_only
    assert again.uuid_hex == "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"


def test_header_unpack_of_short_data_raises_format_error() -> None:
    with pytest.raises(CowFormatError) as info:
        CowHeader.unpack(b"\xa8\x12")
    assert info.value.offset == 2
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [{"uuid": b"short"}, {"fpos": -1}, {"magic": 2**32}])
def test_header_pack_rejects_bad_fields(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        header(**bad).pack()


def test_describe_flags() -> None:
    assert cow.describe_flags(0) == "0x0 (dirty)"
    assert cow.describe_flags(CLEAN | INDEX_ONLY) == "0x3 (CLEAN|INDEX_ONLY)"
    assert cow.describe_flags(CLEAN | 0x10) == "0x11 (CLEAN|unknown 0x10)"


# ---------------------------------------------------------------- builder + reader


def test_snapshot_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "snap.cow"
    data = {7: b"\x07" * 4096, 3: None, 8: None}
    h = build_cow_file(path, SECTORS_256M, changes=data, seqid=4)
    assert (h.fpos, h.seqid, h.nr_changed_blocks, h.flags) == (132, 4, 3, CLEAN)
    assert h.fsize == 26843545  # the driver's default 10 % preallocation
    with CowFile(path, SECTORS_256M) as f:
        assert f.header == h
        assert f.file_size == h.fsize
        # Data is appended in the order the changes happened, so block 7 owns the first slot.
        assert list(f.iter_changed()) == [(3, 130), (7, 129), (8, 131)]
        assert list(f.iter_changed_runs()) == [(3, 1), (7, 2)]
        assert list(f.iter_index(2, 4)) == [0, 130, 0, 0]
    raw = path.read_bytes()
    assert raw[129 * 4096 : 130 * 4096] == b"\x07" * 4096
    assert raw[130 * 4096 : 131 * 4096] == cow.pattern_block(3)


def test_incremental_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "inc.cow"
    h = build_cow_file(path, SECTORS_256M, mode="incremental", changes=[5, 6, 9000])
    assert h.flags == CLEAN | INDEX_ONLY
    assert h.fsize == path.stat().st_size == 528384
    with CowFile(path) as f:
        assert f.geometry.nsect == 16
        assert list(f.iter_changed()) == [(5, 1), (6, 1), (9000, 1)]


def test_runs_are_split_at_max_run(tmp_path: Path) -> None:
    path = tmp_path / "inc.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=range(10, 25))
    with CowFile(path) as f:
        assert list(f.iter_changed_runs(max_run=6)) == [(10, 6), (16, 6), (22, 3)]
        assert list(f.iter_changed_runs(start_block=12, count=5)) == [(12, 5)]


def test_cowfile_rejects_short_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.cow"
    path.write_bytes(b"\xa8\x12\x00\x00" + bytes(20))
    with pytest.raises(CowFormatError) as info:
        CowFile(path)
    assert info.value.offset == 24


def test_iter_index_past_end_of_truncated_file_raises_format_error(tmp_path: Path) -> None:
    path = tmp_path / "trunc.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1], truncate_to=4096 + 800)
    with CowFile(path, SMALL) as f, pytest.raises(CowFormatError) as info:
        list(f.iter_index())
    assert info.value.offset == 4896


def test_streaming_a_1_tib_device_index_stays_small(tmp_path: Path) -> None:
    sectors = 2**40 // 512  # 2**28 blocks -> a 2 GiB (sparse) index
    path = tmp_path / "huge.cow"
    changes = [0, 1, 2, 2**27, 2**28 - 1]
    build_cow_file(path, sectors, mode="incremental", changes=changes)
    assert path.stat().st_size == 4096 + 2**31
    if path.stat().st_blocks * 512 > 64 * 1024 * 1024:
        pytest.skip("filesystem does not keep the index sparse")
    tracemalloc.start()
    start = time.monotonic()
    try:
        with CowFile(path, sectors) as f:
            runs = list(f.iter_changed_runs())
        report = verify(path, sectors)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert runs == [(0, 3), (2**27, 1), (2**28 - 1, 1)]
    assert report.ok, report.violations
    assert report.counts.markers == 5
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak}"
    assert time.monotonic() - start < 120


# ---------------------------------------------------------------- verifier: valid files


def test_verifier_accepts_valid_snapshot_file(tmp_path: Path) -> None:
    path = tmp_path / "s.cow"
    build_cow_file(path, SECTORS_256M, changes={9: None, 2: None, 65535: None})
    report = report_for(path, SECTORS_256M)
    assert report.ok, report.violations
    assert (report.counts.nonzero, report.counts.mapped, report.counts.markers) == (3, 3, 0)
    assert report.skipped == []


def test_verifier_accepts_valid_incremental_file(tmp_path: Path) -> None:
    path = tmp_path / "i.cow"
    # After snap->inc a file keeps its old mappings next to new markers; both are valid.
    build_cow_file(path, SMALL, mode="incremental", changes=[1, 2, 999], raw_entries={5: 9, 6: 9}, fpos=12)
    report = report_for(path)
    assert report.ok, report.violations
    assert (report.counts.markers, report.counts.mapped) == (3, 2)


def test_verifier_accepts_vmalloc_upper_and_version_0(tmp_path: Path) -> None:
    path = tmp_path / "v0.cow"
    build_cow_file(path, SMALL, changes=[4], extra_flags=VMALLOC_UPPER, version=0, nr_changed_blocks=0)
    assert report_for(path).ok


def test_verifier_accepts_partial_block_entry(tmp_path: Path) -> None:
    path = tmp_path / "p.cow"
    sectors = SMALL + 4  # 1000 whole blocks plus half a block
    build_cow_file(path, sectors, mode="incremental", changes=[1000])
    assert report_for(path, sectors).ok
    # The same entry is out of bounds when the device ends on a block boundary.
    assert offsets_of(report_for(path, SMALL), "beyond-nblocks") == [entry_offset(1000)]


def test_cowfile_reads_the_partial_block_entry_by_default(tmp_path: Path) -> None:
    path = tmp_path / "p.cow"
    build_cow_file(path, SMALL + 4, mode="incremental", changes=[3, 1000])
    with CowFile(path, SMALL + 4) as partial, CowFile(path, SMALL) as whole:
        assert list(partial.iter_changed()) == [(3, 1), (1000, 1)]
        assert list(whole.iter_changed()) == [(3, 1)]
        assert sum(1 for _ in partial.iter_index()) == 1001


def test_verifier_infers_geometry_and_says_what_it_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.cow"
    build_cow_file(path, SECTORS_256M, changes=range(100))
    report = report_for(path, None)
    assert report.ok, report.violations
    assert report.geometry_inferred
    assert report.geometry is not None and report.geometry.nsect == 16
    assert any("rule 5" in s for s in report.skipped)


def test_inference_of_empty_snapshot_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.cow"
    build_cow_file(path, SECTORS_256M)
    report = report_for(path, None)
    assert report.ok and report.geometry is not None and report.geometry.nsect == 16


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sectors=st.integers(min_value=8, max_value=3 * 4096 * 8 + 7),
    picks=st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), max_size=60),
    snapshot=st.booleans(),
)
def test_built_files_verify_and_read_back(
    tmp_path: Path, sectors: int, picks: list[float], snapshot: bool
) -> None:
    """Any change set gives a valid file whose changed blocks read back, with or without the size."""
    g = geometry(sectors)
    usable = g.entries_in_use
    blocks = list(dict.fromkeys(int(p * usable) for p in picks))
    path = tmp_path / "prop.cow"
    build_cow_file(path, sectors, mode="snapshot" if snapshot else "incremental", changes=blocks)
    assert report_for(path, sectors).ok
    inferred = report_for(path, None)
    assert inferred.ok and inferred.geometry is not None and inferred.geometry.nsect == g.nsect
    with CowFile(path, sectors) as f:
        assert [b for b, _ in f.iter_changed()] == sorted(blocks)
        assert sum(n for _, n in f.iter_changed_runs()) == len(blocks)


# ---------------------------------------------------------------- verifier: corruption


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1], magic=0x12A9)
    assert offsets_of(report_for(path), "magic") == [0]


def test_dirty_file(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1], clean=False)
    report = report_for(path)
    assert offsets_of(report, "clean") == [4]
    assert report.rules() == {"clean"}


def test_unknown_flag_bits(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1], extra_flags=0x100)
    report = report_for(path)
    assert offsets_of(report, "flags") == [4]
    assert "0x100" in report.violations[0].message


def test_out_of_range_mappings(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    # fpos is 11 after two data blocks; 11 is one past the end and 3 lies inside the index.
    build_cow_file(path, SMALL, changes=[1, 2], raw_entries={40: 11, 41: 3, 42: 1})
    report = report_for(path)
    assert offsets_of(report, "range") == [entry_offset(40), entry_offset(41), entry_offset(42)]


def test_incremental_entry_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1], raw_entries={3: 2, 4: 500})
    assert offsets_of(report_for(path), "range") == [entry_offset(3), entry_offset(4)]


def test_duplicated_mappings_report_every_holder(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1, 2, 3], raw_entries={500: 10})
    report = report_for(path)
    # block 2 got slot 10 from the builder; block 500 claims it too.
    assert offsets_of(report, "duplicate") == [entry_offset(2), entry_offset(500)]
    assert all("2, 500" in v.message for v in report.violations if v.rule == "duplicate")
    # The extra entry also breaks the count rule.
    assert offsets_of(report, "count") == [8]


def test_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1, 2], fpos=13, fsize=20 * 4096)
    report = report_for(path)
    assert offsets_of(report, "count") == [8]
    assert report.rules() == {"count"}


def test_nr_changed_blocks_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1, 2], nr_changed_blocks=5)
    report = report_for(path)
    assert offsets_of(report, "nr-changed") == [56]
    assert report.rules() == {"nr-changed"}


def test_entry_beyond_nblocks(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1], raw_entries={1001: 1, 4095: 1})
    report = report_for(path)
    assert offsets_of(report, "beyond-nblocks") == [entry_offset(1001), entry_offset(4095)]


def test_truncated_index(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1, 2, 3000], truncate_to=4096 + 8 * 100)
    report = report_for(path)
    assert offsets_of(report, "truncated-index") == [4096 + 800]
    # Entries that were cut off are missing from the count, which is reported too.
    assert offsets_of(report, "nr-changed") == [56]


def test_snapshot_file_shorter_than_fsize(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1], fsize=64 * 4096, truncate_to=32 * 4096)
    report = report_for(path)
    assert offsets_of(report, "length") == [32 * 4096]


def test_index_only_fsize_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", changes=[1], fsize=100000)
    assert offsets_of(report_for(path), "fsize") == [16]


def test_absurd_fpos_is_reported_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, changes=[1], fpos=2**63)
    tracemalloc.start()
    try:
        report = report_for(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "fpos" in report.rules()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize("size", [0, 1, 63])
def test_file_shorter_than_header(tmp_path: Path, size: int) -> None:
    path = tmp_path / "c.cow"
    path.write_bytes(b"\xa8" * size)
    report = report_for(path)
    assert [(v.offset, v.rule) for v in report.violations] == [(size, "header")]
    assert report.header is None


def test_garbage_file_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.cow"
    path.write_bytes(os.urandom(4096 * 3 + 17))
    for sectors in (None, SMALL, 0):
        report = report_for(path, sectors)
        assert not report.ok


def test_violation_list_is_capped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "c.cow"
    build_cow_file(path, SMALL, mode="incremental", raw_entries={b: 7777 for b in range(50)})
    report = verify(path, SMALL, max_violations=10)
    assert len(report.violations) == 10
    assert report.violations_total == 50
    assert report.violations_omitted == 40


# ---------------------------------------------------------------- diff


def test_diff_cow(tmp_path: Path) -> None:
    a, b = tmp_path / "a.cow", tmp_path / "b.cow"
    build_cow_file(a, SMALL, mode="incremental", changes=[1, 2, 3, 10, 11], seqid=1)
    build_cow_file(b, SMALL, mode="incremental", changes=[2, 3, 4, 5, 10], seqid=2)
    d = diff_cow(a, b)
    assert d.header_diffs == {"seqid": (1, 2)}
    assert (d.changed_in_both, d.only_in_a, d.only_in_b) == (3, 2, 2)
    assert d.runs_only_in_a == [(1, 1), (11, 1)]
    assert d.runs_only_in_b == [(4, 2)]
    assert not d.identical_changes


def test_diff_identical_and_run_cap(tmp_path: Path) -> None:
    a, b = tmp_path / "a.cow", tmp_path / "b.cow"
    build_cow_file(a, SMALL, mode="incremental", changes=range(0, 40, 2))
    build_cow_file(b, SMALL, mode="incremental")
    d = diff_cow(a, b, device_sectors=SMALL, max_runs=3)
    assert d.header_diffs == {"nr_changed_blocks": (20, 0)}
    assert d.only_in_a == 20 and d.runs_only_in_a == [(0, 1), (2, 1), (4, 1)]
    assert d.runs_truncated
    assert diff_cow(a, a).identical_changes
