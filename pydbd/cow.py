"""The COW file format of the snapshot driver: geometry, header, streaming index access, a verifier,
a builder of synthetic files for tests, and a streaming comparison of two files.

Layout (spec section 4): a 4096-byte header region whose first 64 bytes are the header, then the
index (one little-endian u64 per 4 KiB block of the tracked device, padded to whole 32 KiB
sections), then, in snapshot mode, the saved block data addressed in 4 KiB units from the file start.

Every reader here streams the index in bounded chunks: a 16 TiB device has a 32 GiB index, so no
function may hold the whole index in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MAGIC = 4776
HEADER_SIZE = 64
HEADER_REGION = 4096
BLOCK_SIZE = 4096
SECTOR_SIZE = 512
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE
ENTRY_SIZE = 8
ENTRIES_PER_SECTION = 4096
SECTION_SIZE = ENTRIES_PER_SECTION * ENTRY_SIZE

CLEAN = 1
INDEX_ONLY = 2
VMALLOC_UPPER = 4
KNOWN_FLAGS = CLEAN | INDEX_ONLY | VMALLOC_UPPER
FLAG_NAMES = {CLEAN: "CLEAN", INDEX_ONLY: "INDEX_ONLY", VMALLOC_UPPER: "VMALLOC_UPPER"}

# Entry value written for blocks changed while incremental (no data kept).
MARKER = 1

# Header field byte offsets, used as the offset of header violations.
OFF_MAGIC, OFF_FLAGS, OFF_FPOS, OFF_FSIZE, OFF_SEQID, OFF_UUID, OFF_VERSION, OFF_NR = (
    0,
    4,
    8,
    16,
    24,
    32,
    48,
    56,
)

# 65536 entries = 512 KiB per read: large enough that a sparse 2 GiB index streams at disk/page-cache
# speed, small enough to be irrelevant for memory.
CHUNK_ENTRIES = 65536
# Non-zero chunks are examined in groups of this many entries so that mostly-zero chunks cost a memcmp.
_GROUP = 64
_GROUP_BYTES = _GROUP * ENTRY_SIZE
_GROUP_STRUCT = struct.Struct(f"<{_GROUP}Q")
_ENTRY_STRUCT = struct.Struct("<Q")
_ZERO_GROUP = bytes(_GROUP_BYTES)

_HEADER_STRUCT = struct.Struct("<IIQQQ16sQQ")
assert _HEADER_STRUCT.size == HEADER_SIZE

# A distinct-check bitmap larger than this is refused (reported as a skipped check) rather than allocated.
MAX_BITMAP_BYTES = 256 * 1024 * 1024
# Violations beyond this many are counted but not stored, so a wholly corrupt 32 GiB index cannot
# exhaust memory through the report itself.
DEFAULT_MAX_VIOLATIONS = 100_000


class CowFormatError(ValueError):
    """A file that cannot be used as a COW file at all; ``offset`` is where the problem was found."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset
        self.message = message


# --------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Geometry:
    """Index geometry of a tracked device. ``sectors`` is None when the geometry was inferred from a file."""

    nblocks: int
    nsect: int
    sectors: int | None = None

    @property
    def index_entries(self) -> int:
        """Entries in the index region, including the zero padding after ``nblocks``."""
        return self.nsect * ENTRIES_PER_SECTION

    @property
    def index_bytes(self) -> int:
        return self.nsect * SECTION_SIZE

    @property
    def data_offset(self) -> int:
        return HEADER_REGION + self.index_bytes

    @property
    def first_data_block(self) -> int:
        return self.data_offset // BLOCK_SIZE

    @property
    def has_partial_block(self) -> bool:
        """True when the device ends with a partial 4 KiB block (it may own index entry ``nblocks``)."""
        return self.sectors is not None and self.sectors % SECTORS_PER_BLOCK != 0

    @property
    def entries_in_use(self) -> int:
        """Entries that may be non-zero: one per whole block, plus the trailing partial block's."""
        return min(self.index_entries, self.nblocks + self.has_partial_block)


def geometry(device_sectors: int) -> Geometry:
    """Geometry of a device of ``device_sectors`` 512-byte sectors.

    The index has at least one section, as in the module: a device under 4 KiB (no whole block)
    still gets one section, whose entry 0 belongs to its partial block."""
    if device_sectors < 0:
        raise ValueError(f"negative device size: {device_sectors}")
    nblocks = device_sectors // SECTORS_PER_BLOCK
    nsect = max(1, _ceil_div(nblocks, ENTRIES_PER_SECTION))
    return Geometry(nblocks=nblocks, nsect=nsect, sectors=device_sectors)


def geometry_for_sections(nsect: int) -> Geometry:
    """The largest geometry with ``nsect`` sections; used when the device size is unknown."""
    return Geometry(nblocks=nsect * ENTRIES_PER_SECTION, nsect=nsect, sectors=None)


def entry_offset(block: int) -> int:
    """Byte offset of the index entry of ``block``."""
    return HEADER_REGION + ENTRY_SIZE * block


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class CowHeader:
    magic: int
    flags: int
    fpos: int
    fsize: int
    seqid: int
    uuid: bytes
    version: int
    nr_changed_blocks: int

    @property
    def clean(self) -> bool:
        return bool(self.flags & CLEAN)

    @property
    def index_only(self) -> bool:
        return bool(self.flags & INDEX_ONLY)

    @property
    def uuid_hex(self) -> str:
        """The uuid as 32 lowercase hex digits in stored byte order."""
        return self.uuid.hex()

    def pack(self) -> bytes:
        if len(self.uuid) != 16:
            raise ValueError(f"uuid must be 16 bytes, got {len(self.uuid)}")
        try:
            return _HEADER_STRUCT.pack(
                self.magic,
                self.flags,
                self.fpos,
                self.fsize,
                self.seqid,
                self.uuid,
                self.version,
                self.nr_changed_blocks,
            )
        except struct.error as exc:
            raise ValueError(f"header field out of range: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> CowHeader:
        if len(data) < HEADER_SIZE:
            raise CowFormatError(len(data), f"header needs {HEADER_SIZE} bytes, only {len(data)} available")
        fields = _HEADER_STRUCT.unpack_from(data, 0)
        return cls(*fields)


def describe_flags(flags: int) -> str:
    """``0x3 (CLEAN|INDEX_ONLY)``; unknown bits are shown as hex."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~KNOWN_FLAGS
    if unknown:
        names.append(f"unknown {unknown:#x}")
    return f"{flags:#x} ({'|'.join(names) or 'dirty'})"


# --------------------------------------------------------------------------------------------------
# Streaming index access


def _read_into(fd: int, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from ``offset``, looping over short reads; returns the byte count read (less at EOF)."""
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _raw_chunks(fd: int, start_block: int, count: int) -> Iterator[tuple[int, bytearray]]:
    """Yield (first block, raw entry bytes) covering ``count`` entries; stops early at end of file.

    The full-size chunks share one reused buffer, valid only until the next iteration. Chunks are
    bytearrays rather than memoryviews because bytearray comparison is a memcmp while memoryview
    comparison goes element by element, which made zero-skipping 50 times slower.
    """
    buf = bytearray(min(count, CHUNK_ENTRIES) * ENTRY_SIZE)
    block = start_block
    end = start_block + count
    while block < end:
        want = min(end - block, CHUNK_ENTRIES) * ENTRY_SIZE
        part = buf if want == len(buf) else bytearray(want)
        got = _read_into(fd, part, entry_offset(block))
        usable = got - got % ENTRY_SIZE
        if usable:
            yield block, part if usable == len(part) else part[:usable]
        if usable < want:
            return
        block += want // ENTRY_SIZE


_ZERO_CHUNK = bytes(CHUNK_ENTRIES * ENTRY_SIZE)


def _nonzero_entries(first_block: int, raw: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(block, value) of every non-zero entry in ``raw``; all-zero chunks and groups cost one memcmp."""
    size = len(raw)
    if size == len(_ZERO_CHUNK) and raw == _ZERO_CHUNK:
        return
    pos = 0
    while pos + _GROUP_BYTES <= size:
        if raw[pos : pos + _GROUP_BYTES] != _ZERO_GROUP:
            base = first_block + pos // ENTRY_SIZE
            for i, value in enumerate(_GROUP_STRUCT.unpack_from(raw, pos)):
                if value:
                    yield base + i, value
        pos += _GROUP_BYTES
    while pos < size:
        (value,) = _ENTRY_STRUCT.unpack_from(raw, pos)
        if value:
            yield first_block + pos // ENTRY_SIZE, value
        pos += ENTRY_SIZE


def _runs(blocks: Iterable[int], max_run: int | None = None) -> Iterator[tuple[int, int]]:
    """Coalesce ascending block numbers into (first, count) runs of at most ``max_run`` blocks."""
    first = -1
    count = 0
    for block in blocks:
        if count and block == first + count and (max_run is None or count < max_run):
            count += 1
            continue
        if count:
            yield first, count
        first, count = block, 1
    if count:
        yield first, count


def _content_view(fd: int, name: str, device_sectors: int | None) -> int | None:
    """For a file the module keeps beneath the filesystem (its header block has a section map), a
    descriptor of its content read from the device (see :mod:`pydbd.cowview`); else None."""
    from pydbd import cowview  # imported here: cowview imports this module

    nsect = None if device_sectors is None else geometry(device_sectors).nsect
    return cowview.true_content_fd(fd, name=name, nsect=nsect)


def read_header(fd: int) -> CowHeader:
    buf = bytearray(HEADER_SIZE)
    return CowHeader.unpack(buf[: _read_into(fd, buf, 0)])


class CowFile:
    """A COW file opened read-only. Use as a context manager or call :meth:`close`.

    ``device_sectors`` fixes the geometry; without it the geometry is inferred from the header
    (see :func:`infer_geometry`).
    """

    def __init__(self, path: str | os.PathLike[str], device_sectors: int | None = None) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._owns_fd = True
        try:
            view = _content_view(self._fd, self.path, device_sectors)
            if view is not None:
                os.close(self._fd)
                self._fd = view
            self._load(device_sectors)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_fd(cls, fd: int, name: str, device_sectors: int | None = None) -> CowFile:
        """Wrap an already-open descriptor; the caller keeps ownership of ``fd``."""
        self = cls.__new__(cls)
        self.path, self._fd, self._owns_fd = name, fd, False
        self._load(device_sectors)
        return self

    def _load(self, device_sectors: int | None) -> None:
        self.file_size = os.fstat(self._fd).st_size
        self.header = read_header(self._fd)
        self._geometry = geometry(device_sectors) if device_sectors is not None else None

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            self._geometry = infer_geometry(self.header, self.file_size, self._fd)
        return self._geometry

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> CowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _span(self, start_block: int, count: int | None) -> int:
        if count is None:
            count = max(0, self.geometry.entries_in_use - start_block)
        end = entry_offset(start_block + count)
        if end > self.file_size:
            raise CowFormatError(self.file_size, f"index truncated: entries up to byte {end} requested")
        return count

    def iter_raw(self, start_block: int = 0, count: int | None = None) -> Iterator[tuple[int, bytearray]]:
        """Raw little-endian entry chunks (first block, bytes); each chunk is valid for one iteration."""
        return _raw_chunks(self._fd, start_block, self._span(start_block, count))

    def iter_index(self, start_block: int = 0, count: int | None = None) -> Iterator[int]:
        """Every entry value from ``start_block`` on; ``count`` defaults to the rest of the device."""
        for _, raw in self.iter_raw(start_block, count):
            yield from memoryview(raw).cast("Q") if _NATIVE_LE else struct.unpack(f"<{len(raw) // 8}Q", raw)

    def iter_changed(self, start_block: int = 0, count: int | None = None) -> Iterator[tuple[int, int]]:
        """(block, value) for every non-zero entry, in block order."""
        for first, raw in self.iter_raw(start_block, count):
            yield from _nonzero_entries(first, raw)

    def read_slot(self, slot: int) -> bytes:
        """The 4 KiB data block at slot ``slot`` (what the file holds there; for a file kept beneath
        the filesystem, what the device holds there)."""
        buf = bytearray(BLOCK_SIZE)
        return bytes(buf[: _read_into(self._fd, buf, slot * BLOCK_SIZE)])

    def iter_changed_runs(
        self, start_block: int = 0, count: int | None = None, max_run: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """(first_block, count) for every run of adjacent changed blocks, at most ``max_run`` long."""
        return _runs((block for block, _ in self.iter_changed(start_block, count)), max_run)


_NATIVE_LE = struct.pack("=Q", 1) == struct.pack("<Q", 1)


# --------------------------------------------------------------------------------------------------
# Geometry inference (device size unknown)


def _section_nonzero_counts(fd: int, max_sections: int) -> Iterator[int]:
    """Number of non-zero entries in each successive section, streaming."""
    for _, raw in _raw_chunks(fd, 0, max_sections * ENTRIES_PER_SECTION):
        for pos in range(0, len(raw), SECTION_SIZE):
            yield sum(1 for _ in _nonzero_entries(0, raw[pos : pos + SECTION_SIZE]))


def _shape_sections(byte_length: int) -> int | None:
    """Sections of an index that ends exactly at ``byte_length``, or None if it is not such a length."""
    index = byte_length - HEADER_REGION
    if index > 0 and index % SECTION_SIZE == 0:
        return index // SECTION_SIZE
    return None


def infer_geometry(header: CowHeader, file_size: int, fd: int) -> Geometry:
    """The smallest section count consistent with the file, as a geometry with ``sectors=None``.

    Index-only files end at (and record in fsize) the data offset. For snapshot files the number of
    mapped entries must equal fpos - first_data_block = fpos - 1 - 8k for k sections: the left side
    grows with k and the right side shrinks, so the first k where they meet is the only candidate.
    """
    max_sections = max(1, (file_size - HEADER_REGION) // SECTION_SIZE)
    if header.index_only:
        nsect = _shape_sections(header.fsize) or _shape_sections(file_size)
        return geometry_for_sections(min(nsect or max_sections, max_sections))
    mapped = 0
    for k, count in enumerate(_section_nonzero_counts(fd, max_sections), start=1):
        mapped += count
        if mapped >= header.fpos - 1 - SECTORS_PER_BLOCK * k:
            return geometry_for_sections(k)
    return geometry_for_sections(max_sections)


# --------------------------------------------------------------------------------------------------
# Verifier (spec 4.5)

RULE_HEADER = "header"
RULE_MAGIC = "magic"
RULE_DIRTY = "clean"
RULE_FLAGS = "flags"
RULE_LENGTH = "length"
RULE_FSIZE = "fsize"
RULE_TRUNCATED = "truncated-index"
RULE_FPOS = "fpos"
RULE_RANGE = "range"
RULE_DUPLICATE = "duplicate"
RULE_COUNT = "count"
RULE_NR_CHANGED = "nr-changed"
RULE_BEYOND = "beyond-nblocks"


@dataclass(frozen=True)
class Violation:
    offset: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"offset {self.offset} ({self.offset:#x}): [{self.rule}] {self.message}"


@dataclass
class IndexCounts:
    nonzero: int = 0
    markers: int = 0
    mapped: int = 0


@dataclass
class VerifyReport:
    path: str
    file_size: int
    header: CowHeader | None = None
    geometry: Geometry | None = None
    geometry_inferred: bool = False
    counts: IndexCounts = field(default_factory=IndexCounts)
    violations: list[Violation] = field(default_factory=list)
    violations_total: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_violations: int | None = DEFAULT_MAX_VIOLATIONS

    @property
    def ok(self) -> bool:
        return self.violations_total == 0

    @property
    def violations_omitted(self) -> int:
        return self.violations_total - len(self.violations)

    def add(self, offset: int, rule: str, message: str) -> None:
        self.violations_total += 1
        if self.max_violations is None or len(self.violations) < self.max_violations:
            self.violations.append(Violation(offset, rule, message))

    def rules(self) -> set[str]:
        return {v.rule for v in self.violations}

    def to_dict(self) -> dict[str, Any]:
        geo = self.geometry
        return {
            "path": self.path,
            "file_size": self.file_size,
            "header": None if self.header is None else header_dict(self.header),
            "geometry": None if geo is None else geometry_dict(geo, self.geometry_inferred),
            "counts": dataclasses.asdict(self.counts),
            "valid": self.ok,
            "violations": [dataclasses.asdict(v) for v in self.violations],
            "violations_total": self.violations_total,
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }


def header_dict(h: CowHeader) -> dict[str, Any]:
    d = dataclasses.asdict(h)
    d["uuid"] = h.uuid_hex
    d["flags_decoded"] = describe_flags(h.flags)
    return d


def geometry_dict(g: Geometry, inferred: bool) -> dict[str, Any]:
    return {
        "sectors": g.sectors,
        "nblocks": g.nblocks,
        "nsect": g.nsect,
        "data_offset": g.data_offset,
        "first_data_block": g.first_data_block,
        "inferred": inferred,
    }


def verify(
    path: str | os.PathLike[str],
    device_sectors: int | None = None,
    *,
    max_violations: int | None = DEFAULT_MAX_VIOLATIONS,
) -> VerifyReport:
    """Check a COW file against every rule of spec 4.5; corruption is reported, never raised.

    OSError (missing or unreadable file) is the only exception that escapes.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        report = VerifyReport(os.fspath(path), os.fstat(fd).st_size, max_violations=max_violations)
        try:
            view = _content_view(fd, report.path, device_sectors)
        except CowFormatError as exc:
            report.add(exc.offset, RULE_HEADER, exc.message)
            return report
        if view is not None:
            os.close(fd)
            fd = view
            report.notes.append("section map present: index and data read from the device beneath the file")
        _verify_fd(fd, device_sectors, report)
        return report
    finally:
        os.close(fd)


def _verify_fd(fd: int, device_sectors: int | None, report: VerifyReport) -> None:
    try:
        header = read_header(fd)
    except CowFormatError as exc:
        report.add(exc.offset, RULE_HEADER, exc.message)
        return
    report.header = header
    _check_header(header, report)
    if device_sectors is None:
        report.geometry = infer_geometry(header, report.file_size, fd)
        report.geometry_inferred = True
        report.skipped.append(
            "device size unknown: geometry inferred as the smallest that fits "
            f"({report.geometry.nsect} sections); rule 5 (entries beyond nblocks) not checked"
        )
    else:
        report.geometry = geometry(device_sectors)
    _check_lengths(header, report.geometry, report)
    _check_index(fd, header, report.geometry, report)


def _check_header(h: CowHeader, report: VerifyReport) -> None:
    if h.magic != MAGIC:
        report.add(OFF_MAGIC, RULE_MAGIC, f"magic is {h.magic} ({h.magic:#x}), expected {MAGIC}")
    if not h.clean:
        report.add(OFF_FLAGS, RULE_DIRTY, f"CLEAN flag not set (flags {describe_flags(h.flags)})")
    if h.flags & ~KNOWN_FLAGS:
        report.add(OFF_FLAGS, RULE_FLAGS, f"unknown flag bits {h.flags & ~KNOWN_FLAGS:#x} set")


def _check_lengths(h: CowHeader, geo: Geometry, report: VerifyReport) -> None:
    size = report.file_size
    if size < geo.data_offset:
        report.add(size, RULE_TRUNCATED, f"file ends at {size}, before the index ends at {geo.data_offset}")
    if h.index_only:
        _check_index_only_lengths(h, geo, report)
    elif size < h.fsize:
        report.add(size, RULE_LENGTH, f"file is {size} bytes, shorter than fsize {h.fsize}")
    if not h.index_only and h.fpos < geo.first_data_block:
        report.add(OFF_FPOS, RULE_FPOS, f"fpos {h.fpos} is below the first data block {geo.first_data_block}")


def _check_index_only_lengths(h: CowHeader, geo: Geometry, report: VerifyReport) -> None:
    size = report.file_size
    if size > geo.data_offset:
        report.notes.append(f"index-only file is {size} bytes, longer than data_offset {geo.data_offset}")
    if h.fsize == geo.data_offset:
        return
    if size > geo.data_offset:
        report.notes.append(f"fsize {h.fsize} != data_offset {geo.data_offset}: truncation apparently failed")
    else:
        report.add(OFF_FSIZE, RULE_FSIZE, f"fsize {h.fsize} != data_offset {geo.data_offset}")


@dataclass
class _Bitmap:
    """Seen-set over data block numbers [low, high): one bit per block."""

    low: int
    high: int
    bits: bytearray

    def test_and_set(self, value: int) -> bool:
        i = value - self.low
        byte, bit = i >> 3, 1 << (i & 7)
        seen = bool(self.bits[byte] & bit)
        self.bits[byte] |= bit
        return seen


def _make_bitmap(h: CowHeader, geo: Geometry, report: VerifyReport) -> _Bitmap | None:
    """Bitmap for the distinct-mapping check, bounded by the file size rather than by fpos."""
    if h.index_only:
        return None  # rule 2 does not require distinct entries
    low = geo.first_data_block
    high = min(h.fpos, _ceil_div(report.file_size, BLOCK_SIZE))
    if h.fpos > high:
        report.add(OFF_FPOS, RULE_FPOS, f"fpos {h.fpos} points past the end of the file ({report.file_size})")
    nbytes = _ceil_div(max(0, high - low), 8)
    if nbytes > MAX_BITMAP_BYTES:
        report.skipped.append(f"duplicate check: would need a {nbytes}-byte bitmap")
        return None
    return _Bitmap(low, high, bytearray(nbytes))


def _check_index(fd: int, h: CowHeader, geo: Geometry, report: VerifyReport) -> None:
    bitmap = _make_bitmap(h, geo, report)
    duplicates: set[int] = set()
    available = min(geo.index_entries, max(0, (report.file_size - HEADER_REGION) // ENTRY_SIZE))
    for first, raw in _raw_chunks(fd, 0, available):
        for block, value in _nonzero_entries(first, raw):
            _check_entry(block, value, h, geo, report)
            if bitmap is not None and bitmap.low <= value < bitmap.high and bitmap.test_and_set(value):
                duplicates.add(value)
    if duplicates:
        _report_duplicates(fd, available, duplicates, report)
    _check_counts(h, geo, report)


def _check_entry(block: int, value: int, h: CowHeader, geo: Geometry, report: VerifyReport) -> None:
    counts = report.counts
    counts.nonzero += 1
    if value == MARKER:
        counts.markers += 1
    else:
        counts.mapped += 1
    off = entry_offset(block)
    if (
        geo.sectors is not None
        and block >= geo.nblocks
        and not (block == geo.nblocks and geo.has_partial_block)
    ):
        report.add(
            off, RULE_BEYOND, f"entry of block {block} is {value}, but the device has {geo.nblocks} blocks"
        )
    if value == MARKER and h.index_only:
        return
    if not geo.first_data_block <= value < h.fpos:
        what = "marker 1 in a snapshot file" if value == MARKER else f"mapping {value}"
        report.add(off, RULE_RANGE, f"block {block}: {what} outside [{geo.first_data_block}, {h.fpos})")
    elif not h.index_only and value * BLOCK_SIZE >= report.file_size:
        report.add(off, RULE_RANGE, f"block {block}: mapping {value} points past end of file")


def _report_duplicates(fd: int, available: int, values: set[int], report: VerifyReport) -> None:
    """Second pass: report every entry holding a value that more than one entry holds."""
    holders: dict[int, list[int]] = {}
    for first, raw in _raw_chunks(fd, 0, available):
        for block, value in _nonzero_entries(first, raw):
            if value in values:
                holders.setdefault(value, []).append(block)
    for value, blocks in sorted(holders.items()):
        others = ", ".join(str(b) for b in blocks[:8]) + (" ..." if len(blocks) > 8 else "")
        for block in blocks:
            report.add(
                entry_offset(block),
                RULE_DUPLICATE,
                f"block {block}: data block {value} mapped by blocks {others}",
            )


def _check_counts(h: CowHeader, geo: Geometry, report: VerifyReport) -> None:
    nonzero = report.counts.nonzero
    expected = h.fpos - geo.first_data_block
    if not h.index_only and nonzero != expected:
        report.add(
            OFF_FPOS,
            RULE_COUNT,
            f"{nonzero} non-zero entries, but fpos - first data block = "
            f"{h.fpos} - {geo.first_data_block} = {expected}",
        )
    if h.version >= 1 and h.nr_changed_blocks != nonzero:
        report.add(
            OFF_NR,
            RULE_NR_CHANGED,
            f"nr_changed_blocks is {h.nr_changed_blocks}, index has {nonzero} non-zero entries",
        )


# --------------------------------------------------------------------------------------------------
# Builder of synthetic files (tests and benchmarks)

Changes = Mapping[int, bytes | None] | Iterable[int]


def pattern_block(block: int, tag: int = 0) -> bytes:
    """A deterministic 4 KiB block that differs per block number and tag."""
    return struct.pack("<QQ", block, tag) * (BLOCK_SIZE // 16)


def _change_items(changes: Changes) -> list[tuple[int, bytes | None]]:
    if isinstance(changes, Mapping):
        return list(changes.items())
    return [(block, None) for block in changes]


class _IndexWriter:
    """Writes scattered index entries section by section so large sparse indexes stay cheap to build."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sections: dict[int, bytearray] = {}
        # Every value set, so the builder can count non-zero entries without rescanning the index.
        self.values: dict[int, int] = {}

    def set(self, block: int, value: int) -> None:
        section, slot = divmod(block, ENTRIES_PER_SECTION)
        if section not in self.sections:
            if len(self.sections) >= 256:
                self.flush()
            buf = bytearray(SECTION_SIZE)  # stays zero past end of file
            _read_into(self.fd, buf, entry_offset(section * ENTRIES_PER_SECTION))
            self.sections[section] = buf
        _ENTRY_STRUCT.pack_into(self.sections[section], slot * ENTRY_SIZE, value)
        self.values[block] = value

    def flush(self) -> None:
        for section, buf in self.sections.items():
            os.pwrite(self.fd, buf, entry_offset(section * ENTRIES_PER_SECTION))
        self.sections.clear()


def build_cow_file(
    path: str | os.PathLike[str],
    device_sectors: int,
    *,
    mode: Literal["snapshot", "incremental"] = "snapshot",
    changes: Changes = (),
    seqid: int = 1,
    uuid: bytes = bytes(range(16)),
    version: int = 1,
    clean: bool = True,
    fsize: int | None = None,
    fpos: int | None = None,
    magic: int = MAGIC,
    extra_flags: int = 0,
    nr_changed_blocks: int | None = None,
    raw_entries: Mapping[int, int] | None = None,
    truncate_to: int | None = None,
) -> CowHeader:
    """Write a synthetic COW file and return its header.

    snapshot: the data of each changed block (given bytes, or :func:`pattern_block`) is appended in
    the iteration order of ``changes`` and mapped, as the driver's copy-on-write does.
    incremental: each changed block gets the marker 1 and the file ends at data_offset.

    Corruption knobs: ``magic``, ``clean``, ``extra_flags``, ``fsize``, ``fpos``, ``nr_changed_blocks``,
    ``raw_entries`` (block -> value, written last, may lie beyond nblocks) and ``truncate_to``.
    """
    geo = geometry(device_sectors)
    items = _change_items(changes)
    flags = (CLEAN if clean else 0) | (INDEX_ONLY if mode == "incremental" else 0) | extra_flags
    with _open_for_build(path) as fd:
        os.ftruncate(fd, geo.data_offset)
        writer = _IndexWriter(fd)
        next_slot = _write_changes(fd, writer, geo, items, snapshot=mode == "snapshot")
        for block, value in (raw_entries or {}).items():
            writer.set(block, value)
        writer.flush()
        nonzero = sum(1 for b, v in writer.values.items() if v and b < geo.index_entries)
        header = CowHeader(
            magic=magic,
            flags=flags,
            fpos=next_slot if fpos is None else fpos,
            fsize=_default_fsize(mode, geo, next_slot, fsize),
            seqid=seqid,
            uuid=uuid,
            version=version,
            nr_changed_blocks=nonzero if nr_changed_blocks is None else nr_changed_blocks,
        )
        os.pwrite(fd, header.pack(), 0)
        if mode == "snapshot":
            os.ftruncate(fd, max(header.fsize, next_slot * BLOCK_SIZE))
        if truncate_to is not None:
            os.ftruncate(fd, truncate_to)
    return header


@contextlib.contextmanager
def _open_for_build(path: str | os.PathLike[str]) -> Iterator[int]:
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def _write_changes(
    fd: int, writer: _IndexWriter, geo: Geometry, items: list[tuple[int, bytes | None]], *, snapshot: bool
) -> int:
    """Record every change; returns the next free data slot (fpos)."""
    slot = geo.first_data_block
    for block, data in items:
        if not 0 <= block < geo.index_entries:
            # e.g. the partial last block of a device whose whole blocks fill every section exactly:
            # its entry would land on the first data block, so no valid file can record it.
            raise ValueError(f"block {block}: outside the index ({geo.index_entries} entries)")
        if not snapshot:
            writer.set(block, MARKER)
            continue
        payload = pattern_block(block) if data is None else data
        if len(payload) != BLOCK_SIZE:
            raise ValueError(f"block {block}: data must be {BLOCK_SIZE} bytes, got {len(payload)}")
        os.pwrite(fd, payload, slot * BLOCK_SIZE)
        writer.set(block, slot)
        slot += 1
    return slot


def _default_fsize(mode: str, geo: Geometry, next_slot: int, fsize: int | None) -> int:
    if fsize is not None:
        return fsize
    if mode == "incremental":
        return geo.data_offset
    # The driver's default preallocation is 10 % of the device; make room for the data if that is less.
    device_bytes = (geo.sectors or 0) * SECTOR_SIZE
    return max(device_bytes * 10 // 100, next_slot * BLOCK_SIZE)


# --------------------------------------------------------------------------------------------------
# Comparison of two files

HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(CowHeader))


@dataclass
class CowDiff:
    header_diffs: dict[str, tuple[Any, Any]]
    blocks_compared: int
    changed_in_both: int = 0
    only_in_a: int = 0
    only_in_b: int = 0
    runs_only_in_a: list[tuple[int, int]] = field(default_factory=list)
    runs_only_in_b: list[tuple[int, int]] = field(default_factory=list)
    runs_truncated: bool = False

    @property
    def identical_changes(self) -> bool:
        return self.only_in_a == 0 and self.only_in_b == 0


def iter_change_differences(a: CowFile, b: CowFile, count: int) -> Iterator[tuple[int, bool, bool]]:
    """(block, changed in a, changed in b) for every block changed in at least one file, streamed."""
    ia = a.iter_changed(0, count)
    ib = b.iter_changed(0, count)
    na = next(ia, None)
    nb = next(ib, None)
    while na is not None or nb is not None:
        ba = na[0] if na is not None else None
        bb = nb[0] if nb is not None else None
        block = min(x for x in (ba, bb) if x is not None)
        yield block, ba == block, bb == block
        if ba == block:
            na = next(ia, None)
        if bb == block:
            nb = next(ib, None)


@dataclass
class _RunCollector:
    """Accumulates ascending blocks into (first, count) runs, keeping at most ``limit`` runs."""

    limit: int
    runs: list[tuple[int, int]]
    truncated: bool = False

    def add(self, block: int) -> None:
        if self.runs and sum(self.runs[-1]) == block:
            self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + 1)
        elif len(self.runs) < self.limit:
            self.runs.append((block, 1))
        else:
            self.truncated = True


def diff_cow(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    device_sectors: int | None = None,
    max_runs: int = 10_000,
) -> CowDiff:
    """Compare headers and changed-block sets of two COW files, streaming both indexes.

    Blocks are compared up to the smaller of the two index lengths (both geometries are inferred
    unless ``device_sectors`` is given). At most ``max_runs`` runs per side are kept.
    """
    with CowFile(a, device_sectors) as fa, CowFile(b, device_sectors) as fb:
        diffs = {
            name: (getattr(fa.header, name), getattr(fb.header, name))
            for name in HEADER_FIELDS
            if getattr(fa.header, name) != getattr(fb.header, name)
        }
        count = min(fa.geometry.entries_in_use, fb.geometry.entries_in_use)
        result = CowDiff(header_diffs=diffs, blocks_compared=count)
        only_a = _RunCollector(max_runs, result.runs_only_in_a)
        only_b = _RunCollector(max_runs, result.runs_only_in_b)
        for block, in_a, in_b in iter_change_differences(fa, fb, count):
            if in_a and in_b:
                result.changed_in_both += 1
            elif in_a:
                result.only_in_a += 1
                only_a.add(block)
            else:
                result.only_in_b += 1
                only_b.add(block)
        result.runs_truncated = only_a.truncated or only_b.truncated
        return result
