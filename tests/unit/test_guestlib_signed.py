"""guestlib.signed: block signatures, classification of wrong blocks, and the writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestlib import signed
from guestlib.signed import BLOCK_SIZE, SECTOR_SIZE, make_block

RUN = signed.run_id_for_seed(7)


def test_block_layout_round_trips() -> None:
    block = make_block(RUN, 42, 9, stream=3)
    assert len(block) == BLOCK_SIZE
    assert block.startswith(signed.MAGIC)
    sig = signed.parse_block(block)
    assert sig == signed.Signature(run_id=RUN, stream=3, seq=9, block=42, intact=True)
    assert signed.parse_block(bytes(BLOCK_SIZE)) is None
    assert signed.parse_block(block[:100]) is None


def test_payload_depends_on_every_field() -> None:
    base = make_block(RUN, 1, 1)
    variants = [
        make_block(RUN + 1, 1, 1),
        make_block(RUN, 2, 1),
        make_block(RUN, 1, 2),
        make_block(RUN, 1, 1, 1),
    ]
    for other in variants:
        assert other[signed.HEADER_SIZE :] != base[signed.HEADER_SIZE :]


def test_run_ids_differ_per_seed() -> None:
    assert signed.run_id_for_seed(1) != signed.run_id_for_seed(2)
    assert signed.run_id_for_seed(1) == signed.run_id_for_seed(1)


EXPECTED = {5: 3, 6: 4, 7: 4}


def test_expected_block_is_ok() -> None:
    assert signed.classify(make_block(RUN, 5, 3), EXPECTED, at=5, run_id=RUN) == "ok"


def test_older_write_is_stale() -> None:
    diag = signed.diagnose(make_block(RUN, 5, 2), EXPECTED, at=5, run_id=RUN)
    assert diag.verdict == "stale"
    assert "older seq 2" in diag.message


def test_later_write_is_newer() -> None:
    assert signed.classify(make_block(RUN, 5, 8), EXPECTED, at=5, run_id=RUN) == "newer"


def test_block_of_another_location_is_misplaced() -> None:
    diag = signed.diagnose(make_block(RUN, 7, 4), EXPECTED, at=6, run_id=RUN)
    assert diag.verdict == "misplaced"
    assert "holds block 7" in diag.message


def test_mixed_sectors_of_two_writes_are_torn() -> None:
    new, old = make_block(RUN, 6, 4), make_block(RUN, 6, 1)
    # The first sector (with the header) reached the disk, the rest did not.
    torn = new[:SECTOR_SIZE] + old[SECTOR_SIZE:]
    assert signed.classify(torn, EXPECTED, at=6, run_id=RUN) == "torn"
    # The other way round: header of the old write, tail of the new one.
    torn = old[: 4 * SECTOR_SIZE] + new[4 * SECTOR_SIZE :]
    assert signed.classify(torn, EXPECTED, at=6, run_id=RUN) == "torn"


def test_lost_header_with_expected_sectors_is_torn() -> None:
    block = bytes(SECTOR_SIZE) + make_block(RUN, 6, 4)[SECTOR_SIZE:]
    diag = signed.diagnose(block, EXPECTED, at=6, run_id=RUN)
    assert diag.verdict == "torn"
    assert "sectors [1, 2, 3, 4, 5, 6, 7]" in diag.message


def test_unsigned_or_other_run_data_is_foreign() -> None:
    assert signed.classify(bytes(BLOCK_SIZE), EXPECTED, at=5, run_id=RUN) == "foreign"
    assert signed.classify(os.urandom(BLOCK_SIZE), EXPECTED, at=5, run_id=RUN) == "foreign"
    other = signed.diagnose(make_block(RUN + 1, 5, 3), EXPECTED, at=5, run_id=RUN)
    assert other.verdict == "foreign"
    assert "another run" in other.message
    assert signed.classify(make_block(RUN, 5, 3, stream=2), EXPECTED, at=5, run_id=RUN) == "foreign"


def test_locations_without_an_expected_write() -> None:
    assert signed.classify(bytes(BLOCK_SIZE), EXPECTED, at=100, run_id=RUN) == "ok"
    assert signed.classify(make_block(RUN, 100, 9), EXPECTED, at=100, run_id=RUN) == "newer"
    assert signed.classify(make_block(RUN, 5, 3), EXPECTED, at=100, run_id=RUN) == "misplaced"


def test_without_location_the_header_names_it() -> None:
    assert signed.classify(make_block(RUN, 5, 3), EXPECTED) == "ok"
    assert signed.classify(make_block(RUN, 5, 1), EXPECTED) == "stale"


def _device(tmp_path: Path, blocks: int) -> Path:
    path = tmp_path / "dev"
    with open(path, "wb") as handle:
        handle.truncate(blocks * BLOCK_SIZE)
    return path


def test_writer_and_check_round_trip(tmp_path: Path) -> None:
    dev = _device(tmp_path, 256)
    state = signed.random_writes(dev, seed=11, ops=60, nblocks=200, first_block=20, max_run=8)
    assert state.next_seq == 61
    assert all(20 <= b < 220 for b in state.expected)
    report = signed.check(dev, state)
    assert report.ok, report.message
    assert report.counts["ok"] == len(state.expected)


def test_check_reports_the_first_wrong_block(tmp_path: Path) -> None:
    dev = _device(tmp_path, 64)
    state = signed.random_writes(dev, seed=3, ops=30, nblocks=64)
    blocks = sorted(state.expected)
    stale_at, misplaced_at = blocks[2], blocks[5]
    with open(dev, "r+b") as handle:
        handle.seek(stale_at * BLOCK_SIZE)
        handle.write(make_block(state.run_id, stale_at, state.expected[stale_at] - 1))
        handle.seek(misplaced_at * BLOCK_SIZE)
        handle.write(make_block(state.run_id, blocks[0], state.expected[blocks[0]]))
    report = signed.check(dev, state)
    assert not report.ok
    assert report.counts["stale"] == 1
    assert report.counts["misplaced"] == 1
    assert report.failures[0][1:3] == (stale_at, "stale")
    assert f"block {stale_at}: stale" in report.message


def test_continuing_a_state_keeps_the_sequence(tmp_path: Path) -> None:
    dev = _device(tmp_path, 32)
    state = signed.random_writes(dev, seed=5, ops=10, nblocks=32)
    state = signed.random_writes(dev, seed=6, ops=10, nblocks=32, state=state)
    assert state.next_seq == 21
    assert signed.check(dev, state).ok


def test_direct_io_writes(tmp_path: Path) -> None:
    dev = _device(tmp_path, 64)
    try:
        state = signed.random_writes(dev, seed=9, ops=20, nblocks=64, direct=True)
    except OSError as exc:
        pytest.skip(f"O_DIRECT unsupported here: {exc}")
    assert signed.check(dev, state).ok


def test_writer_rejects_bad_ranges(tmp_path: Path) -> None:
    dev = _device(tmp_path, 8)
    with signed.SignedWriter(dev, signed.SignedState(RUN), max_blocks=4) as writer:
        with pytest.raises(ValueError):
            writer.write(0, 5)
        with pytest.raises(ValueError):
            writer.write(-1, 1)


def test_state_json_round_trip(tmp_path: Path) -> None:
    state = signed.SignedState(RUN, stream=2, next_seq=7, expected={3: 1, 10: 6})
    state.save(tmp_path / "s.json")
    assert signed.SignedState.load(tmp_path / "s.json") == state


def test_file_level_writes_and_checks(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    state = signed.random_file_writes(root, seed=4, ops=40, files=3, max_file_blocks=16)
    assert sorted(state.files) == ["sig1.dat", "sig2.dat", "sig3.dat"]
    assert [s.stream for _, s in sorted(state.files.items())] == [1, 2, 3]
    assert signed.check_files(root, state).ok
    state.save(tmp_path / "fs.json")
    loaded = signed.SignedFilesState.load(tmp_path / "fs.json")
    assert loaded == state

    # Swapping two files' contents: every block is then of another stream.
    a, b = root / "sig1.dat", root / "sig2.dat"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    report = signed.check_files(root, state)
    assert not report.ok
    assert report.counts["foreign"] > 0


def test_missing_file_counts_as_foreign(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    state = signed.random_file_writes(root, seed=4, ops=10, files=2, max_file_blocks=8)
    os.unlink(root / "sig2.dat")
    report = signed.check_files(root, state)
    assert report.counts["foreign"] == len(state.files["sig2.dat"].expected)
    assert "file is missing" in report.message
