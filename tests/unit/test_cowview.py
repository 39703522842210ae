"""Host tests of pydbd.cowview: the section map, and the view of a COW file kept beneath the
filesystem, built from a fake device file and a chosen extent map (no root, no real device)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pydbd import cow, cowview
from pydbd.cow import (
    BLOCK_SIZE,
    CLEAN,
    INDEX_ONLY,
    MAGIC,
    SECTION_SIZE,
    CowFile,
    CowFormatError,
    CowHeader,
    build_cow_file,
    pattern_block,
    verify,
)
from pydbd.cowview import (
    SMAP_MAX_BITS,
    Extent,
    SectionMap,
    index_sections,
    read_section_map,
    true_content_fd,
)

MIB = 1024 * 1024


def smap_bytes(group: int, nbits: int, valid: set[int]) -> bytes:
    bits = bytearray(-(-nbits // 8))
    for g in valid:
        bits[g // 8] |= 1 << (g % 8)
    return b"DBDSMAP1" + struct.pack("<II", group, nbits) + bytes(bits)


def block0(header: CowHeader, smap: bytes | None) -> bytes:
    blk = bytearray(BLOCK_SIZE)
    blk[:64] = header.pack()
    if smap is not None:
        blk[64 : 64 + len(smap)] = smap
    return bytes(blk)


def hdr(flags: int, fpos: int, fsize: int) -> CowHeader:
    return CowHeader(MAGIC, flags, fpos, fsize, 1, bytes(range(16)), 1, 0)


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def setup_beneath(
    tmp_path: Path, truth: bytes, smap: bytes, layout: list[tuple[int, int, int]], device_size: int = 2 * MIB
) -> tuple[Path, Path, list[Extent]]:
    """A COW file holding only block 0 (truth's header, then ``smap``) over zeros, and a garbage-filled
    device holding truth's bytes at the places ``layout`` (logical, physical, length) gives."""
    cow_path, dev_path = tmp_path / "cow", tmp_path / "dev"
    with open(cow_path, "wb") as f:
        f.write(block0(CowHeader.unpack(truth), smap))
        f.truncate(len(truth))
    device = bytearray(b"\xa5\x5a" * (device_size // 2))
    for logical, physical, length in layout:
        device[physical : physical + length] = truth[logical : logical + length]
    dev_path.write_bytes(device)
    extents = [Extent(lo, ph, ln, 0x800) for lo, ph, ln in layout]
    return cow_path, dev_path, extents


# --------------------------------------------------------------------------------------------------
# Section map


def test_section_map_absent() -> None:
    assert read_section_map(bytes(BLOCK_SIZE)) is None
    assert read_section_map(b"") is None


def test_section_map_bits() -> None:
    smap = read_section_map(block0(hdr(CLEAN, 9, 0), smap_bytes(3, 11, {0, 2, 9})))
    assert smap == SectionMap(3, 11, bytes([0b101, 0b10]))
    assert [s for s in range(40) if smap.valid(s)] == [0, 1, 2, 6, 7, 8, 27, 28, 29]
    assert not smap.fits(31)  # the module would use group 1 for 31 sections


def test_section_map_fits() -> None:
    assert SectionMap(1, 5, b"\0").fits(5)
    assert not SectionMap(1, 5, b"\0").fits(4)
    assert not SectionMap(2, 3, b"\0").fits(6)  # the module uses group 1 below SMAP_MAX_BITS sections
    big = SMAP_MAX_BITS + 1
    assert SectionMap(2, -(-big // 2), b"").fits(big)


def test_section_map_too_many_bits() -> None:
    with pytest.raises(ValueError, match="32129 bits, more than the 32128"):
        read_section_map(block0(hdr(CLEAN, 9, 0), b"DBDSMAP1" + struct.pack("<II", 1, SMAP_MAX_BITS + 1)))
    with pytest.raises(CowFormatError, match="0 sections a bit"):
        read_section_map(block0(hdr(CLEAN, 9, 0), b"DBDSMAP1" + struct.pack("<II", 0, 1)))


def test_index_sections_derivation() -> None:
    index_only = hdr(CLEAN | INDEX_ONLY, 0, 0)
    assert index_sections(SectionMap(1, 7, b"\0"), index_only, 4096 + 7 * SECTION_SIZE) == 7
    with pytest.raises(CowFormatError, match="fits no index"):
        index_sections(SectionMap(1, 7, b"\0"), index_only, 4096 + 6 * SECTION_SIZE)
    # group 2: nsect is 2*nbits - 1 or 2*nbits; the device size decides, else the smallest that fits
    n = SMAP_MAX_BITS + 1
    smap = SectionMap(2, -(-n // 2), b"")
    snap = hdr(CLEAN, 10**9, 0)
    size = 4096 + (n + 5) * SECTION_SIZE
    assert index_sections(smap, snap, size) == n
    device_of_n1 = (n + 1) * 4096 * BLOCK_SIZE
    assert index_sections(smap, snap, size, device_of_n1) == n + 1
    assert index_sections(smap, index_only, 4096 + (n + 1) * SECTION_SIZE) == n + 1


# --------------------------------------------------------------------------------------------------
# The view


def test_no_section_map_returns_none(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    build_cow_file(path, 8000, changes=[1, 2])
    assert true_content_fd(path, extents=[], device="/nonexistent") is None
    fd = os.open(path, os.O_RDONLY)
    try:
        assert true_content_fd(fd, extents=[], device="/nonexistent") is None
    finally:
        os.close(fd)


def test_index_only_view(tmp_path: Path) -> None:
    """Three sections: 0 in one extent, 1 split across two, 2 in an invalid group (garbage on the device)."""
    truth = bytearray(block0(hdr(CLEAN | INDEX_ONLY, 0, 4096 + 3 * SECTION_SIZE), None))
    truth += os.urandom(3 * SECTION_SIZE)
    layout = [
        (0, 0, 4096),
        (4096, 8 * 4096, SECTION_SIZE + 12288),
        (4096 + SECTION_SIZE + 12288, 100 * 4096, SECTION_SIZE - 12288 + SECTION_SIZE),
    ]
    smap = smap_bytes(1, 3, {0, 1})
    view = view_of(tmp_path, bytes(truth), smap, layout)
    expected = block0(CowHeader.unpack(truth), smap) + truth[4096 : 4096 + 2 * SECTION_SIZE]
    expected += bytes(SECTION_SIZE)  # invalid group: zeros, not the device's bytes
    assert len(view) == len(truth)
    assert view == expected


def view_of(tmp_path: Path, truth: bytes, smap: bytes, layout: list[tuple[int, int, int]]) -> bytes:
    """What true_content_fd shows of a file laid out beneath a fake device."""
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap, layout)
    fd = true_content_fd(cow_path, extents=extents, device=str(dev_path))
    assert fd is not None
    try:
        return read_all(fd)
    finally:
        os.close(fd)


def test_snapshot_view_reads_data_slots(tmp_path: Path) -> None:
    """Two sections (group 1), data slots [17, 20) from the device, slots past fpos stay zero."""
    nsect, fpos, size = 2, 20, 24 * 4096
    truth = bytearray(block0(hdr(CLEAN, fpos, size), None))
    truth += os.urandom(size - 4096)
    layout = [(0, 0, 4096), (4096, 64 * 4096, size - 4096)]
    smap = smap_bytes(1, nsect, {1})
    view = view_of(tmp_path, bytes(truth), smap, layout)
    first_data = 4096 + nsect * SECTION_SIZE
    assert view[:4096] == block0(CowHeader.unpack(truth), smap)
    assert view[4096 : 4096 + SECTION_SIZE] == bytes(SECTION_SIZE)
    assert view[4096 + SECTION_SIZE : first_data] == truth[4096 + SECTION_SIZE : first_data]
    assert view[first_data : fpos * 4096] == truth[first_data : fpos * 4096]
    assert view[fpos * 4096 :] == bytes(size - fpos * 4096)


def test_bytes_in_no_extent(tmp_path: Path) -> None:
    truth = block0(hdr(CLEAN | INDEX_ONLY, 0, 0), None) + bytes(SECTION_SIZE)
    layout = [(0, 0, 4096), (4096, 4096, SECTION_SIZE - 4096)]  # the last block of the section is missing
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap_bytes(1, 1, {0}), layout)
    with pytest.raises(CowFormatError, match="in no extent"):
        true_content_fd(cow_path, extents=extents, device=str(dev_path))


def test_nsect_that_does_not_fit(tmp_path: Path) -> None:
    truth = block0(hdr(CLEAN | INDEX_ONLY, 0, 0), None) + bytes(SECTION_SIZE)
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap_bytes(1, 1, {0}), [(0, 0, len(truth))])
    with pytest.raises(CowFormatError, match="does not fit an index of 2 sections"):
        true_content_fd(cow_path, nsect=2, extents=extents, device=str(dev_path))


def test_unreadable_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = block0(hdr(CLEAN | INDEX_ONLY, 0, 0), None) + bytes(SECTION_SIZE)
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap_bytes(1, 1, {0}), [(0, 0, len(truth))])
    real_open = os.open

    def refuse_device(path: str, flags: int, mode: int = 0o777) -> int:
        if os.fspath(path) == str(dev_path):  # a chmod 0 file would not do: root reads it
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse_device)
    with pytest.raises(PermissionError, match=r"beneath the filesystem.*read access to the device .*dev"):
        true_content_fd(cow_path, extents=extents, device=str(dev_path))


# --------------------------------------------------------------------------------------------------
# Through pydbd.cow


def test_cowfile_and_verify_use_the_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth_path = tmp_path / "truth"
    build_cow_file(truth_path, 8000, changes={5: None, 9: pattern_block(9, 7)})
    truth = truth_path.read_bytes()
    layout = [(0, 0, 4096), (4096, MIB, 8192), (4096 + 8192, 16 * 4096, len(truth) - 4096 - 8192)]
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap_bytes(1, 1, {0}), layout)
    monkeypatch.setattr(cowview, "fiemap", lambda fd: extents)
    monkeypatch.setattr(cowview, "device_of", lambda fd, name="": str(dev_path))

    with CowFile(cow_path) as cf:
        assert cf.file_size == len(truth)
        assert list(cf.iter_changed()) == [(5, 9), (9, 10)]
        assert os.pread(cf._fd, BLOCK_SIZE, 10 * BLOCK_SIZE) == pattern_block(9, 7)
    with CowFile(cow_path, 8000) as cf:
        assert list(cf.iter_changed()) == [(5, 9), (9, 10)]
    report = verify(cow_path, 8000)
    assert report.ok, report.violations
    assert report.counts.mapped == 2
    assert any("section map" in note for note in report.notes)

    # read through the filesystem, the same file has an all-zero index (what the hook avoids)
    monkeypatch.setattr(cow, "_content_view", lambda fd, name, sectors: None)
    assert not verify(cow_path, 8000).ok


def test_verify_reports_a_map_that_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth_path = tmp_path / "truth"
    build_cow_file(truth_path, 8000, changes=[5])
    truth = truth_path.read_bytes()
    cow_path, dev_path, extents = setup_beneath(tmp_path, truth, smap_bytes(1, 2, {0}), [(0, 0, len(truth))])
    monkeypatch.setattr(cowview, "fiemap", lambda fd: extents)
    monkeypatch.setattr(cowview, "device_of", lambda fd, name="": str(dev_path))
    report = verify(cow_path, 8000)
    assert [v.rule for v in report.violations] == [cow.RULE_HEADER]
    assert "does not fit an index of 1 sections" in report.violations[0].message
    with pytest.raises(CowFormatError):
        CowFile(cow_path, 8000)
