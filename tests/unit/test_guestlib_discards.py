"""guestlib.discards: traced discards as 4 KiB blocks, and their use by the precision oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestlib import blockhash, discards, oracles
from pydbd import cow

TRACE = """\
         fstrim-301     [000] .....    61.1: block_bio_queue: 254,16 DS 2048 + 2048 [fstrim]
         fstrim-301     [000] .....    61.2: block_bio_queue: 254,16 WS 8 + 8 [fstrim]
    kworker/0:1-12      [000] .....    61.3: block_bio_queue: 254,16 D 10241 + 7 [kworker/0:1]
    kworker/0:1-12      [000] .....    61.4: block_bio_queue: 254,32 D 0 + 8 [kworker/0:1]
"""


def test_discards_of_a_partition_are_relative_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "trace").write_text(TRACE)
    monkeypatch.setattr(discards, "INSTANCE", instance)
    monkeypatch.setattr(discards, "_disk_and_start", lambda device: (254, 16, 2048))
    monkeypatch.setattr(discards, "_sectors", lambda device: 1 << 20)
    # 2048 + 2048 at partition start 2048: blocks 0-255; 10241 + 7: sectors 8193-8199, block 1024
    assert discards.blocks("/dev/vdb1") == [(0, 256), (1024, 1)]


def test_discarded_unchanged_blocks_are_not_spurious(tmp_path: Path) -> None:
    img = tmp_path / "n"
    img.write_bytes(b"".join(cow.pattern_block(b, 0) for b in range(64)))
    digests = blockhash.hash_blocks(img)
    path = tmp_path / "cow"
    cow.build_cow_file(path, 64 * 8, mode="incremental", changes=[20, 21, 22, 23], seqid=1)
    traced = [(20, 1), (21, 1)]
    result = oracles.change_list_complete(digests, digests, path, discarded=traced, max_spurious=2)
    assert result.ok, result.message
    assert (result.details["discarded"], result.details["spurious"]) == (2, 2)
    assert not oracles.change_list_complete(digests, digests, path, discarded=traced, max_spurious=1).ok


def test_traced_change_list_finds_missed_and_spurious_blocks(tmp_path: Path) -> None:
    path = tmp_path / "cow"
    cow.build_cow_file(path, 64 * 8, mode="incremental", changes=[3, 4, 5, 40], seqid=1)
    traced = [(2, 4), (50, 2)]  # blocks 2-5 and 50-51 written below the filesystem
    result = oracles.change_list_traced(path, traced, max_spurious=1)
    assert not result.ok
    assert result.details["missed"] == 3 and result.details["missed_blocks"] == [2, 50, 51]
    exempt = [(2 * 4096, 4096), (50 * 4096, 8192)]  # inside a COW file: not the workload's to mark
    result = oracles.change_list_traced(path, traced, exempt=exempt, max_spurious=1)
    assert result.ok, result.message
    assert result.details["spurious"] == 1  # block 40
    assert not oracles.change_list_traced(path, traced, exempt=exempt, max_spurious=0).ok


def test_subtract_runs() -> None:
    assert oracles._subtract([(0, 10), (20, 5)], [(2, 3), (8, 14)]) == [(0, 2), (5, 3), (22, 3)]
