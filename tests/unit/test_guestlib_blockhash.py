"""guestlib.blockhash against plain files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from guestlib import blockhash
from guestlib.blockhash import BLOCK_SIZE, DIGEST_SIZE


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _blocks(n: int, tag: int = 0) -> bytes:
    return b"".join(bytes([tag, i % 256, i // 256]) * (BLOCK_SIZE // 3) + b"\0" for i in range(n))


def test_one_digest_per_block_matches_blake2b(tmp_path: Path) -> None:
    data = _blocks(5)
    digests = blockhash.hash_blocks(_write(tmp_path / "f", data))
    assert len(digests) == 5 * DIGEST_SIZE
    for i in range(5):
        want = hashlib.blake2b(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], digest_size=16).digest()
        assert blockhash.digest_at(digests, i) == want


def test_partial_trailing_block_is_hashed(tmp_path: Path) -> None:
    data = _blocks(2) + b"tail"
    digests = blockhash.hash_blocks(_write(tmp_path / "f", data))
    assert blockhash.block_count(digests) == 3
    assert blockhash.digest_at(digests, 2) == blockhash.block_digest(b"tail")


def test_start_and_count_select_a_range(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", _blocks(10))
    whole = blockhash.hash_blocks(path)
    assert blockhash.hash_blocks(path, 3, 4) == whole[3 * DIGEST_SIZE : 7 * DIGEST_SIZE]
    assert blockhash.hash_blocks(path, 8) == whole[8 * DIGEST_SIZE :]
    assert blockhash.hash_blocks(path, 8, 100) == whole[8 * DIGEST_SIZE :]
    assert blockhash.hash_blocks(path, 20) == b""


def test_small_reads_and_direct_io_give_the_same_digests(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", _blocks(37))
    reference = blockhash.hash_blocks(path)
    assert blockhash.hash_blocks(path, read_size=3 * BLOCK_SIZE) == reference
    try:
        direct = blockhash.hash_blocks(path, direct=True, read_size=8 * BLOCK_SIZE)
    except OSError as exc:  # tmpfs has no O_DIRECT
        pytest.skip(f"O_DIRECT unsupported here: {exc}")
    assert direct == reference


def test_bad_range_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", _blocks(1))
    with pytest.raises(ValueError):
        blockhash.hash_blocks(path, -1)


def test_first_difference_and_differing_blocks() -> None:
    a = b"".join(bytes([i]) * DIGEST_SIZE for i in range(10))
    b = bytearray(a)
    b[4 * DIGEST_SIZE] ^= 1
    b[7 * DIGEST_SIZE + 15] ^= 0x80
    assert blockhash.first_difference(a, a) is None
    assert blockhash.first_difference(a, bytes(b)) == 4
    assert blockhash.differing_blocks(a, bytes(b)) == [4, 7]


def test_length_mismatch_counts_the_extra_blocks_as_different() -> None:
    a = bytes(DIGEST_SIZE * 3)
    b = bytes(DIGEST_SIZE * 5)
    assert blockhash.first_difference(a, b) == 3
    assert blockhash.differing_blocks(b, a) == [3, 4]


def test_differences_found_across_scan_slices() -> None:
    n = 10_000
    a = bytearray(n * DIGEST_SIZE)
    b = bytearray(a)
    for block in (0, 4095, 4096, 9999):
        b[block * DIGEST_SIZE] = 1
    assert blockhash.differing_blocks(bytes(a), bytes(b)) == [0, 4095, 4096, 9999]


def test_sha256_device_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    path = _write(tmp_path / "f", data)
    assert blockhash.sha256_device(path) == hashlib.sha256(data).hexdigest()


def test_save_and_load_digests(tmp_path: Path) -> None:
    digests = blockhash.hash_blocks(_write(tmp_path / "f", _blocks(3)))
    blockhash.save_digests(digests, tmp_path / "h")
    assert blockhash.load_digests(tmp_path / "h") == digests
    (tmp_path / "bad").write_bytes(b"x" * 17)
    with pytest.raises(ValueError, match="multiple of 16"):
        blockhash.load_digests(tmp_path / "bad")
