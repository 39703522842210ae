"""guestlib.cowchain: the recorded COW file extents that backup images need not match."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestlib import agent, cowchain


def test_merge_joins_overlapping_and_touching_extents() -> None:
    assert cowchain.merge([(8192, 4096), (0, 4096), (4096, 100), (20000, 10), (20005, 10)]) == [
        (0, 4196),
        (8192, 4096),
        (20000, 15),
    ]


def test_add_keeps_each_device_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = str(tmp_path / "chain.json")
    cow = tmp_path / "cow"
    cow.write_bytes(b"x")
    extents = iter([[(0, 4096)], [(4096, 4096), (65536, 512)]])
    monkeypatch.setattr(agent, "fiemap_extents", lambda path, allow_unwritten=False: next(extents))
    cowchain.add(str(cow), chain)
    cowchain.add(str(cow), chain)
    st_dev = os.stat(cow).st_dev
    assert cowchain.extents_for(st_dev, chain) == [(0, 8192), (65536, 512)]
    assert cowchain.extents_for(st_dev + 1, chain) == []
    cowchain.reset(chain)
    assert cowchain.extents_for(st_dev, chain) == []


def test_a_recording_cut_short_leaves_the_old_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut right after a recording must not leave an empty chain file: the new version
    replaces the old one whole, after it is on disk."""
    chain = str(tmp_path / "chain.json")
    cow = tmp_path / "cow"
    cow.write_bytes(b"x")
    extents = iter([[(0, 4096)], [(65536, 4096)]])
    monkeypatch.setattr(agent, "fiemap_extents", lambda path, allow_unwritten=False: next(extents))
    cowchain.add(str(cow), chain)
    before = Path(chain).read_text()
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync_then_cut(fd: int) -> None:
        real_fsync(fd)
        synced.append(fd)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "fsync", fsync_then_cut)
    with pytest.raises(KeyboardInterrupt):
        cowchain.add(str(cow), chain)
    assert synced, "the new chain was never fsynced"
    assert Path(chain).read_text() == before


def test_exempt_for_adds_the_files_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = str(tmp_path / "chain.json")
    live = tmp_path / "live-cow"
    live.write_bytes(b"x")
    monkeypatch.setattr(cowchain, "live_cow_files", lambda: [str(live)])
    monkeypatch.setattr(agent, "fiemap_extents", lambda path, allow_unwritten=False: [(1 << 20, 8192)])
    assert cowchain.exempt_for(str(live), chain) == [(1 << 20, 8192)]
    assert cowchain.record_live(chain) == [str(live)]
    assert cowchain.extents_for(os.stat(live).st_dev, chain) == [(1 << 20, 8192)]
