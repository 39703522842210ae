"""guestlib.logwrites on synthetic dm-log-writes logs (the layout the kernel target writes)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from guestlib import logwrites as lw

S = 512


class LogBuilder:
    """Writes a log the way dm-log-writes lays it out: super sector, then header sector + data."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.count = 0

    def entry(self, sector: int, data: bytes = b"", flags: int = 0, mark: str = "", discard: int = 0) -> None:
        nr = discard if flags & lw.DISCARD else len(data) // S
        text = mark.encode()
        header = struct.pack("<QQQQ", sector, nr, flags, len(text)) + text
        self.body += header.ljust(S, b"\0") + data
        self.count += 1

    def bytes(self) -> bytes:
        return struct.pack("<QQQI", lw.MAGIC, 1, self.count, S).ljust(S, b"\0") + bytes(self.body)


def _log(tmp_path: Path) -> Path:
    b = LogBuilder()
    b.entry(0, b"A" * S)  # 0
    b.entry(2, b"B" * (2 * S))  # 1
    b.entry(0, flags=lw.FLUSH)  # 2  point
    b.entry(0, flags=lw.MARK, mark="setup")  # 3
    b.entry(1, b"C" * S, flags=lw.FUA)  # 4  point
    b.entry(2, flags=lw.DISCARD, discard=1)  # 5
    b.entry(3, b"D" * S)  # 6
    b.entry(0, flags=lw.FLUSH)  # 7  point
    path = tmp_path / "log"
    path.write_bytes(b.bytes())
    return path


def test_entries_and_crash_points(tmp_path: Path) -> None:
    fd = os.open(_log(tmp_path), os.O_RDONLY)
    try:
        es = list(lw.entries(fd))
        assert [e.index for e in es] == list(range(8))
        assert es[3].mark == "setup" and es[5].data_offset == 0 and es[1].nr_sectors == 2
        assert lw.crash_points(fd) == [2, 4, 7]
        assert lw.crash_points(fd, after_mark="setup") == [4, 7]
    finally:
        os.close(fd)


def test_replay_yields_the_device_state_at_each_point(tmp_path: Path) -> None:
    log = _log(tmp_path)
    target = tmp_path / "dev"
    target.write_bytes(bytes(4 * S))
    states = {}
    for index in lw.replay_points(str(log), str(target), [2, 4, 7]):
        states[index] = target.read_bytes()
    assert states[2] == b"A" * S + bytes(S) + b"B" * (2 * S)
    assert states[4] == b"A" * S + b"C" * S + b"B" * (2 * S)
    assert states[7] == b"A" * S + b"C" * S + bytes(S) + b"D" * S  # discard replayed as zeros


def test_sample_spreads_and_keeps_both_ends() -> None:
    points = list(range(100))
    picked = lw.sample(points, 5)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 5
    assert lw.sample(points[:3], 5) == [0, 1, 2]
    assert lw.sample(points, 1) == [99]


def test_bad_logs_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 1024)
    fd = os.open(bad, os.O_RDONLY)
    try:
        with pytest.raises(lw.LogFormatError, match="not a dm-log-writes log"):
            lw.read_super(fd)
    finally:
        os.close(fd)
    short = tmp_path / "short"
    short.write_bytes(struct.pack("<QQQI", lw.MAGIC, 1, 3, S).ljust(S, b"\0"))
    fd = os.open(short, os.O_RDONLY)
    try:
        with pytest.raises(lw.LogFormatError, match="past the end"):
            list(lw.entries(fd))
    finally:
        os.close(fd)
