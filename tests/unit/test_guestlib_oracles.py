"""guestlib.oracles on plain files: each oracle passes on a right answer and names the first wrong block."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from guestlib import blockhash, churn, oracles
from pydbd import cow

NBLOCKS = 64
SECTORS = NBLOCKS * 8
UUID = bytes(range(100, 116))


def _image(path: Path, tag: int, changed: dict[int, int] | None = None) -> Path:
    """An image whose block b holds pattern_block(b, tag), or pattern_block(b, changed[b])."""
    changed = changed or {}
    path.write_bytes(b"".join(cow.pattern_block(b, changed.get(b, tag)) for b in range(NBLOCKS)))
    return path


# (a) -----------------------------------------------------------------------------------------------


def test_stability_passes_for_identical_reads(tmp_path: Path) -> None:
    digests = blockhash.hash_blocks(_image(tmp_path / "s", 0))
    result = oracles.snapshot_stability(digests, digests)
    assert result.ok
    assert result.message == f"all {NBLOCKS} blocks unchanged"


def test_stability_names_the_first_changed_block(tmp_path: Path) -> None:
    before = blockhash.hash_blocks(_image(tmp_path / "a", 0))
    after = blockhash.hash_blocks(_image(tmp_path / "b", 0, {17: 5, 40: 5}))
    result = oracles.snapshot_stability(before, after)
    assert not result.ok
    assert result.first_block == 17
    assert result.details["differing"] == 2
    assert "block 17 changed between the two reads" in result.message


def test_stability_reports_a_size_change(tmp_path: Path) -> None:
    before = blockhash.hash_blocks(_image(tmp_path / "a", 0))
    result = oracles.snapshot_stability(before, before[: -2 * blockhash.DIGEST_SIZE])
    assert not result.ok
    assert result.first_block == NBLOCKS - 2
    assert "size changed" in result.message


# (b) and (e) ---------------------------------------------------------------------------------------


def test_point_in_time_accepts_the_manifest_state(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    result = churn.churn(root, seed=21, ops=60, max_file_size=16 * 1024)
    assert oracles.point_in_time(root, result.manifest).ok


def test_point_in_time_rejects_later_changes(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    manifest = churn.churn(root, seed=22, ops=60, max_file_size=16 * 1024).manifest
    victim = sorted(k for k, v in manifest.items() if v is not None)[0]
    (root / victim).write_bytes(b"written after the snapshot")
    result = oracles.point_in_time(root, manifest)
    assert not result.ok
    assert f"{victim}: content differs" in result.message


def _runner(code: int, output: str, seen: list[list[str]]) -> oracles.Runner:
    def run(argv: Sequence[str]) -> tuple[int, str]:
        seen.append(list(argv))
        return code, output

    return run


def test_point_in_time_runs_the_requested_fsck(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    manifest = churn.churn(root, seed=23, ops=20).manifest
    seen: list[list[str]] = []
    ok = oracles.point_in_time(
        root, manifest, fsck_device="/dev/datto0", fstype="xfs", runner=_runner(0, "", seen)
    )
    assert ok.ok
    assert seen == [["xfs_repair", "-n", "/dev/datto0"]]
    bad = oracles.point_in_time(
        root, manifest, fsck_device="/dev/datto0", fstype="ext4", runner=_runner(4, "inode 12 bad\n", seen)
    )
    assert not bad.ok
    assert seen[-1] == ["e2fsck", "-fn", "/dev/datto0"]
    assert "exited 4" in bad.message and "inode 12 bad" in bad.message


def test_fsck_command_rejects_unknown_types() -> None:
    with pytest.raises(ValueError):
        oracles.fsck_command("/dev/x", "btrfs")


@pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None, reason="no e2fsprogs"
)
def test_fsck_on_a_real_ext4_image(tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    with open(image, "wb") as handle:
        handle.truncate(8 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    assert oracles.fsck(str(image), "ext4").ok
    # Wreck the block group descriptors (block 1 with 4 KiB blocks; bytes 2048+ with 1 KiB blocks).
    with open(image, "r+b") as handle:
        handle.seek(2048)
        handle.write(b"\xa5" * 8192)
    result = oracles.fsck(str(image), "ext4")
    assert not result.ok
    assert "e2fsck -fn" in result.message


def test_nothing_lost_skips_volatile_paths(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    result = churn.churn(root, seed=24, ops=40, unsynced_ops=8, max_file_size=16 * 1024)
    assert oracles.nothing_lost(root, result.manifest, volatile=result.volatile).ok
    stable = sorted(k for k, v in result.manifest.items() if v is not None and k not in result.volatile)
    (root / stable[0]).unlink()
    lost = oracles.nothing_lost(root, result.manifest, volatile=result.volatile)
    assert not lost.ok
    assert f"{stable[0]}: missing" in lost.message


# (c) -----------------------------------------------------------------------------------------------


def _incremental_cow(path: Path, marked: list[int], seqid: int = 1) -> Path:
    cow.build_cow_file(path, SECTORS, mode="incremental", changes=marked, seqid=seqid, uuid=UUID)
    return path


def test_change_list_complete_with_over_marking(tmp_path: Path) -> None:
    snap_n = blockhash.hash_blocks(_image(tmp_path / "n", 0))
    snap_n1 = blockhash.hash_blocks(_image(tmp_path / "n1", 0, {3: 1, 10: 1, 11: 1}))
    result = oracles.change_list_complete(snap_n, snap_n1, _incremental_cow(tmp_path / "c", [3, 10, 11, 20]))
    assert result.ok, result.message
    assert result.details["differing"] == 3
    assert result.details["marked"] == 4
    assert result.details["over_marked"] == 1
    assert result.details["precision"] == pytest.approx(0.75)


def test_change_list_catches_an_unmarked_differing_block(tmp_path: Path) -> None:
    snap_n = blockhash.hash_blocks(_image(tmp_path / "n", 0))
    snap_n1 = blockhash.hash_blocks(_image(tmp_path / "n1", 0, {3: 1, 10: 1, 11: 1, 63: 1}))
    result = oracles.change_list_complete(snap_n, snap_n1, _incremental_cow(tmp_path / "c", [3, 10]))
    assert not result.ok
    assert result.first_block == 11
    assert result.details["missed_blocks"] == [11, 63]
    assert "block 11 differs" in result.message and "2 of 4 differing blocks missed" in result.message


def test_change_list_uses_snapshot_mode_entries_too(tmp_path: Path) -> None:
    snap_n = blockhash.hash_blocks(_image(tmp_path / "n", 0))
    snap_n1 = blockhash.hash_blocks(_image(tmp_path / "n1", 0, {5: 2}))
    path = tmp_path / "c"
    cow.build_cow_file(path, SECTORS, changes=[5], uuid=UUID)
    assert oracles.change_list_complete(snap_n, snap_n1, path).ok


def _update_setup(tmp_path: Path, marked: list[int], seqid: int = 1) -> tuple[str, str, str]:
    _image(tmp_path / "snap_n1", 0, {2: 9, 30: 9, 31: 9})
    image = tmp_path / "image"
    _image(image, 0)
    return str(tmp_path / "snap_n1"), str(_incremental_cow(tmp_path / "cow", marked, seqid)), str(image)


def _info(seqid: int = 2) -> SimpleNamespace:
    return SimpleNamespace(uuid=UUID, seqid=seqid)


def test_update_img_oracle_passes_when_the_image_becomes_the_snapshot(tmp_path: Path) -> None:
    snap, cow_path, image = _update_setup(tmp_path, [2, 30, 31, 40])
    result = oracles.update_img_matches(
        snap, cow_path, image, info_lookup=lambda minor: _info(), minor_resolver=lambda path: 0
    )
    assert result.ok, result.message
    assert "copying complete: 4 blocks changed, 0 errors" in result.details["stdout"]


def test_update_img_oracle_finds_the_first_block_left_stale(tmp_path: Path) -> None:
    snap, cow_path, image = _update_setup(tmp_path, [2, 31])
    result = oracles.update_img_matches(
        snap, cow_path, image, info_lookup=lambda minor: _info(), minor_resolver=lambda path: 0
    )
    assert not result.ok
    assert result.first_block == 30


def test_update_img_oracle_reports_a_refused_update(tmp_path: Path) -> None:
    snap, cow_path, image = _update_setup(tmp_path, [2, 30, 31], seqid=5)
    result = oracles.update_img_matches(
        snap, cow_path, image, info_lookup=lambda minor: _info(), minor_resolver=lambda path: 0
    )
    assert not result.ok
    assert result.details["exit"] == 22
    assert "seqid" in result.message


def test_update_img_oracle_leaves_the_cow_extents_out(tmp_path: Path) -> None:
    """Block 30 is stale in the image; inside a COW file's extent that is allowed, outside it is not."""
    snap, cow_path, image = _update_setup(tmp_path, [2, 31])
    exempt = [(30 * 4096, 4096)]
    result = oracles.update_img_matches(
        snap, cow_path, image, exempt=exempt, info_lookup=lambda minor: _info(), minor_resolver=lambda path: 0
    )
    assert result.ok, result.message
    assert result.details["differing_in_cow_extents"] == 1


def test_image_matches_masks_only_the_sectors_of_a_cow_extent(tmp_path: Path) -> None:
    """A block that straddles a COW file's extent (1 KiB filesystem blocks) is compared outside it."""
    image = _image(tmp_path / "img", 0)
    snap = tmp_path / "snap"
    data = bytearray(image.read_bytes())
    data[7 * 4096 : 7 * 4096 + 512] = bytes(512)  # sector 0 of block 7, inside the extent
    snap.write_bytes(data)
    inside = [(7 * 4096, 1024)]
    assert oracles.image_matches(str(image), str(snap), inside).ok
    data[7 * 4096 + 2048] ^= 1  # sector 4 of block 7: outside the extent
    snap.write_bytes(data)
    result = oracles.image_matches(str(image), str(snap), inside)
    assert not result.ok
    assert result.first_block == 7
    assert "straddles a COW file" in result.message


def test_image_matches_names_an_all_zero_block(tmp_path: Path) -> None:
    image = _image(tmp_path / "img", 0)
    snap = tmp_path / "snap"
    data = bytearray(image.read_bytes())
    data[5 * 4096 : 6 * 4096] = bytes(4096)
    snap.write_bytes(data)
    result = oracles.image_matches(str(image), str(snap))
    assert not result.ok
    assert result.first_block == 5
    assert "the snapshot's block is all zeros" in result.message


def test_change_list_leaves_the_cow_extents_out(tmp_path: Path) -> None:
    snap_n = blockhash.hash_blocks(_image(tmp_path / "n", 0))
    snap_n1 = blockhash.hash_blocks(_image(tmp_path / "n1", 0, {3: 1, 10: 1, 11: 1}))
    cow_file = _incremental_cow(tmp_path / "c", [3, 11])
    assert not oracles.change_list_complete(snap_n, snap_n1, cow_file).ok
    result = oracles.change_list_complete(snap_n, snap_n1, cow_file, exempt=[(10 * 4096 + 512, 512)])
    assert result.ok, result.message


# (d) -----------------------------------------------------------------------------------------------


WRITTEN = [4, 9, 10, 50]


def _snapshot_cow(
    tmp_path: Path, *, nr_changed_blocks: int | None = None, clean: bool = True
) -> tuple[Path, Path]:
    """A snapshot-mode COW file (seqid 3) preserving the WRITTEN blocks of the snapshot image."""
    snapshot = _image(tmp_path / "snapshot", 0)
    data: dict[int, bytes | None] = {b: cow.pattern_block(b, 0) for b in WRITTEN}
    path = tmp_path / "cow"
    cow.build_cow_file(
        path, SECTORS, changes=data, seqid=3, uuid=UUID, nr_changed_blocks=nr_changed_blocks, clean=clean
    )
    return path, snapshot


def test_cow_structure_accepts_a_correct_file(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path)
    result = oracles.cow_structure(
        path, snapshot, written=WRITTEN, exact_written=True, expected_seqid=3, expected_uuid=UUID
    )
    assert result.ok, result.message
    assert result.details["compared"] == len(WRITTEN)


def test_cow_structure_catches_a_wrong_data_block(tmp_path: Path) -> None:
    snapshot = _image(tmp_path / "snapshot", 0)
    data = {b: cow.pattern_block(b, 0) for b in WRITTEN}
    data[9] = cow.pattern_block(9, 1)  # the new data instead of the preserved old data
    path = tmp_path / "cow"
    cow.build_cow_file(path, SECTORS, changes=data, uuid=UUID)
    result = oracles.cow_structure(path, snapshot, written=WRITTEN)
    assert not result.ok
    assert result.first_block == 9
    assert "entry of block 9 maps data block" in result.message


def test_cow_structure_leaves_out_the_cow_files_own_sectors_of_a_straddling_block(tmp_path: Path) -> None:
    """A 1 KiB-block filesystem can place the COW file so that a 4 KiB block straddles it: the
    preserved copy's first KiB then holds what the file held at the first write, the snapshot shows
    the file as it was when taken. Only the rest of the block must match."""
    snapshot = _image(tmp_path / "snapshot", 0)
    data = {b: cow.pattern_block(b, 0) for b in WRITTEN}
    data[9] = b"\xaa" * 1024 + data[9][1024:]  # sectors 0-1 of block 9: the COW file's own bytes
    path = tmp_path / "cow"
    cow.build_cow_file(path, SECTORS, changes=data, uuid=UUID)
    own = [(9 * 4096 - 3072, 4096)]  # the file's extent ends 1 KiB into block 9
    assert oracles.own_sectors_mask(9, own) == 0b11
    assert oracles.own_sectors_mask(8, own) == 0b11111100
    assert oracles.own_sectors_mask(10, own) == 0
    assert not oracles.cow_structure(path, snapshot, written=WRITTEN).ok
    result = oracles.cow_structure(path, snapshot, written=WRITTEN, own_extents=own)
    assert result.ok, result.message
    # outside the file's own sectors a difference still fails
    data[9] = b"\xaa" * 2048 + data[9][2048:]
    cow.build_cow_file(path, SECTORS, changes=data, uuid=UUID)
    result = oracles.cow_structure(path, snapshot, written=WRITTEN, own_extents=own)
    assert not result.ok and result.first_block == 9


def test_cow_structure_catches_a_wrong_nr_changed_blocks(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path, nr_changed_blocks=len(WRITTEN) + 1)
    result = oracles.cow_structure(path, snapshot, written=WRITTEN)
    assert not result.ok
    assert "nr_changed_blocks is 5" in result.message


def test_cow_structure_catches_a_wrong_seqid_and_uuid(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path)
    result = oracles.cow_structure(path, snapshot, expected_seqid=2)
    assert not result.ok
    assert "seqid is 3, expected 2" in result.message
    result = oracles.cow_structure(path, snapshot, expected_uuid=bytes(16))
    assert not result.ok
    assert "uuid is" in result.message


def test_cow_structure_catches_format_violations(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path, clean=False)
    result = oracles.cow_structure(path, snapshot)
    assert not result.ok
    assert "fails the format rules" in result.message and "CLEAN" in result.message


def test_cow_structure_written_blocks_must_be_marked(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path)
    result = oracles.cow_structure(path, snapshot, written=[*WRITTEN, 33])
    assert not result.ok
    assert result.first_block == 33
    assert "block 33 was written but has no entry" in result.message


def test_cow_structure_extra_entries_fail_only_when_exact(tmp_path: Path) -> None:
    path, snapshot = _snapshot_cow(tmp_path)
    relaxed = oracles.cow_structure(path, snapshot, written=WRITTEN[:2])
    assert relaxed.ok
    assert relaxed.details["extra_marked"] == 2
    exact = oracles.cow_structure(path, snapshot, written=WRITTEN[:2], exact_written=True)
    assert not exact.ok
    assert exact.first_block == 10


def test_cow_structure_on_an_index_only_file_skips_data(tmp_path: Path) -> None:
    snapshot = _image(tmp_path / "snapshot", 0)
    path = _incremental_cow(tmp_path / "cow", WRITTEN)
    result = oracles.cow_structure(path, snapshot, written=WRITTEN)
    assert result.ok, result.message
    assert "index-only" in result.message
