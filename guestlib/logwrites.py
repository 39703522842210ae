"""Write-point replay: read a dm-log-writes log and rebuild the device at every flush point.

dm-log-writes (`log-writes <dev> <logdev>`) appends every completed write below a device to the log
device, in the order the writes became durable: a FLUSH entry comes after the writes it covers.
Log layout (little endian), in units of the origin's logical sector size S:
  sector 0        super: u64 magic 0x6a736677736872, u64 version (1), u64 nr_entries, u32 S
  then entries    one S-byte header (u64 sector, u64 nr_sectors, u64 flags, u64 data_len; a MARK's
                  name follows in the same sector), then nr_sectors × S bytes of data unless the
                  entry is a DISCARD (no data) or a MARK
Flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16.

A crash point is the state after a FLUSH or FUA entry: what the disk is guaranteed to hold had the
power failed right after that request completed. :func:`replay_points` applies the log to a
target and yields at the chosen points, so a caller can check the filesystem and the COW file
there (guestlib.__main__'s ``replay-check``). Discarded ranges are replayed as zeros.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")
CHUNK = 1 << 20


class LogFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int  # in units of the log's sector size
    nr_sectors: int
    flags: int
    data_offset: int  # byte offset of the data in the log (0 if none)
    mark: str = ""

    @property
    def is_point(self) -> bool:
        return bool(self.flags & (FLUSH | FUA))


@dataclass(frozen=True)
class LogInfo:
    nr_entries: int
    sector_size: int


def read_super(fd: int) -> LogInfo:
    raw = os.pread(fd, SUPER.size, 0)
    if len(raw) < SUPER.size:
        raise LogFormatError("log device too short for a super block")
    magic, version, nr_entries, sector_size = SUPER.unpack(raw)
    if magic != MAGIC:
        raise LogFormatError(f"not a dm-log-writes log (magic {magic:#x})")
    if version != 1 or sector_size not in (512, 1024, 2048, 4096):
        raise LogFormatError(f"unsupported log (version {version}, sector size {sector_size})")
    return LogInfo(nr_entries, sector_size)


def entries(fd: int) -> Iterator[Entry]:
    """Every entry of the log in order."""
    info = read_super(fd)
    size = info.sector_size
    pos = size  # entries start right after the super's sector
    for index in range(info.nr_entries):
        header = os.pread(fd, size, pos)
        if len(header) < ENTRY.size:
            raise LogFormatError(f"entry {index} at byte {pos} is past the end of the log")
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(header)
        mark = ""
        if flags & MARK:
            mark = header[ENTRY.size : ENTRY.size + min(data_len, size - ENTRY.size)].decode(errors="replace")
        has_data = not flags & (DISCARD | MARK) and nr_sectors > 0
        yield Entry(index, sector, nr_sectors, flags, pos + size if has_data else 0, mark)
        pos += size + (nr_sectors * size if has_data else 0)


def _apply(log_fd: int, target_fd: int, e: Entry, sector_size: int) -> None:
    offset, remaining = e.sector * sector_size, e.nr_sectors * sector_size
    if e.flags & MARK or not remaining:
        return
    src = e.data_offset
    while remaining:
        n = min(remaining, CHUNK)
        data = bytes(n) if e.flags & DISCARD else os.pread(log_fd, n, src)
        if len(data) != n:
            raise LogFormatError(f"entry {e.index}: data truncated at byte {src} of the log")
        os.pwrite(target_fd, data, offset)
        offset, src, remaining = offset + n, src + n, remaining - n


def crash_points(log_fd: int, after_mark: str | None = None) -> list[int]:
    """Indexes of the FLUSH/FUA entries (optionally only those after the named mark)."""
    points, armed = [], after_mark is None
    for e in entries(log_fd):
        if e.flags & MARK and e.mark == after_mark:
            armed = True
        elif armed and e.is_point:
            points.append(e.index)
    return points


def sample(points: list[int], limit: int) -> list[int]:
    """At most `limit` points spread evenly over `points`, always keeping the first and last."""
    if limit <= 0 or len(points) <= limit:
        return list(points)
    if limit == 1:
        return [points[-1]]
    step = (len(points) - 1) / (limit - 1)
    return sorted({points[round(i * step)] for i in range(limit)})


def replay_points(log_path: str, target_path: str, points: list[int]) -> Iterator[int]:
    """Replay the log onto the target, yielding after each entry index in `points` (in order).

    The target must start as the device did when logging began (zeroed for a fresh mkfs).
    """
    wanted = sorted(points)
    log_fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
    target_fd = os.open(target_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = read_super(log_fd).sector_size
        nxt = 0
        for e in entries(log_fd):
            if nxt >= len(wanted):
                break
            _apply(log_fd, target_fd, e, size)
            if e.index == wanted[nxt]:
                os.fsync(target_fd)
                nxt += 1
                yield e.index
    finally:
        os.close(log_fd)
        os.close(target_fd)


@dataclass
class PointReport:
    """What the crash points looked like: counts per COW-file verdict and the findings."""

    checked: int = 0
    cow_clean: int = 0  # CLEAN header and the file verifies: reload would accept it, rightly
    cow_dirty: int = 0  # not CLEAN: reload refuses it
    cow_absent: int = 0  # before setup, or after the file was deleted
    findings: list[str] | None = None

    def to_json(self) -> dict[str, object]:
        findings = self.findings or []
        verdict = f"first: {findings[0]}" if findings else "no finding"
        return {
            "ok": not findings,
            "message": f"{self.checked} crash points: {self.cow_clean} clean COW files verified, "
            f"{self.cow_dirty} dirty (refused on reload), {self.cow_absent} without one; {verdict}",
            "crash_points": self.checked,
            "cow_clean": self.cow_clean,
            "cow_dirty": self.cow_dirty,
            "cow_absent": self.cow_absent,
            "findings": findings[:20],
        }
