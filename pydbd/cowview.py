"""The content of a COW file as the module means it, for files it keeps beneath the filesystem.

The module preallocates its COW file with fallocate() (unwritten extents) and writes the index and
the data by bio straight to the device sectors under the file, so a read() through the filesystem
returns zeros there. Only block 0 (header, then the section map) is written through the filesystem.
The section map says which index sections hold content on the device; the others are all zero,
whatever stale data the device holds there. A file without the map (upstream's, or one handed over
to update-img) is an ordinary file and is read through the filesystem as before.

:func:`true_content_fd` builds an anonymous sparse file holding that content, read from the device
at the places FIEMAP gives, so the readers of :mod:`pydbd.cow` can use it like the file itself.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pydbd.cow import (
    BLOCK_SIZE,
    HEADER_REGION,
    SECTION_SIZE,
    SECTOR_SIZE,
    CowFormatError,
    CowHeader,
    geometry,
)

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
# UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL: no readable place.
FIEMAP_EXTENT_UNREADABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
FIEMAP_BATCH = 256
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, reserved64[2], flags, reserved[3]
_MAX_OFFSET = 2**64 - 1

SMAP_OFFSET = 64
SMAP_MAGIC = b"DBDSMAP1"
SMAP_BITMAP = SMAP_OFFSET + 16
SMAP_MAX_BITS = (BLOCK_SIZE - SMAP_BITMAP) * 8

COPY_CHUNK = 4 * 1024 * 1024
# Pieces of a chunk that are all zero are not written, so the view stays sparse (a memfd keeps what
# is written to it in memory).
_PIECE = 64 * 1024
_ZERO_PIECE = bytes(_PIECE)


class Extent(NamedTuple):
    logical: int
    physical: int
    length: int
    flags: int


def fiemap(fd: int) -> list[Extent]:
    """Every extent of the open file ``fd`` (unwritten ones included), in logical order."""
    extents: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + FIEMAP_BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, _MAX_OFFSET - start, 0, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        for i in range(mapped):
            off = _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            extents.append(Extent(*_FIEMAP_EXTENT.unpack_from(buf, off)))
        if not mapped or extents[-1].flags & FIEMAP_EXTENT_LAST:
            return extents
        start = extents[-1].logical + extents[-1].length


def device_of(fd: int, name: str = "file") -> str:
    """Path of the block device node of the filesystem holding the open file ``fd``."""
    dev = os.fstat(fd).st_dev
    numbers = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open(f"/sys/dev/block/{numbers}/uevent", encoding="ascii") as f:
            devname = next(line[8:].strip() for line in f if line.startswith("DEVNAME="))
        path = f"/dev/{devname}"
        if os.stat(path).st_rdev != dev:
            raise OSError(errno.ENODEV, f"{path} is not device {numbers}")
    except (OSError, StopIteration) as exc:
        raise OSError(
            errno.ENODEV, f"{name}: no block device node found for its filesystem (device {numbers}): {exc}"
        ) from exc
    return path


@dataclass(frozen=True)
class SectionMap:
    """Bit g set: index sections [g*group, (g+1)*group) hold their content on the device."""

    group: int
    nbits: int
    bits: bytes

    def valid(self, section: int) -> bool:
        g = section // self.group
        return g < self.nbits and bool(self.bits[g >> 3] >> (g & 7) & 1)

    def fits(self, nsect: int) -> bool:
        """Whether the module would have written this map for an index of ``nsect`` sections."""
        return self.group == max(1, -(-nsect // SMAP_MAX_BITS)) and self.nbits == -(-nsect // self.group)


def read_section_map(block0: bytes | bytearray) -> SectionMap | None:
    """The section map of a header block, or None when it has none."""
    if block0[SMAP_OFFSET : SMAP_OFFSET + len(SMAP_MAGIC)] != SMAP_MAGIC:
        return None
    if len(block0) < SMAP_BITMAP:
        raise CowFormatError(len(block0), "header block ends inside the section map")
    group, nbits = struct.unpack_from("<II", block0, SMAP_OFFSET + 8)
    if group < 1 or nbits < 1:
        raise CowFormatError(SMAP_OFFSET + 8, f"section map with {group} sections a bit and {nbits} bits")
    if nbits > SMAP_MAX_BITS:
        raise CowFormatError(
            SMAP_OFFSET + 12, f"section map has {nbits} bits, more than the {SMAP_MAX_BITS} of a header block"
        )
    nbytes = -(-nbits // 8)
    if len(block0) < SMAP_BITMAP + nbytes:
        raise CowFormatError(len(block0), f"header block ends inside the {nbits}-bit section map")
    return SectionMap(group, nbits, bytes(block0[SMAP_BITMAP : SMAP_BITMAP + nbytes]))


def index_sections(
    smap: SectionMap, header: CowHeader, file_size: int, device_bytes: int | None = None
) -> int:
    """The index's section count (nsect), which the file does not record.

    The module writes group = max(1, ceil(nsect / SMAP_MAX_BITS)) and nbits = ceil(nsect / group), so
    nsect lies in ((nbits-1)*group, nbits*group]; with group 1 (indexes up to SMAP_MAX_BITS sections,
    devices up to about 490 GiB) that is nbits exactly. The index must also end within the file, and
    in a snapshot file before fpos (fpos >= first_data_block). The file lives on the tracked device, so
    when that device's size (``device_bytes``) gives a candidate, it is the answer; otherwise an
    index-only file (which ends at data_offset) takes the largest candidate, a snapshot file the
    smallest.
    """
    room = max(0, (file_size - HEADER_REGION) // SECTION_SIZE)
    candidates = [
        n
        for n in range((smap.nbits - 1) * smap.group + 1, min(smap.nbits * smap.group, room) + 1)
        if smap.fits(n)
        and (header.index_only or (HEADER_REGION + n * SECTION_SIZE) // BLOCK_SIZE <= header.fpos)
    ]
    if not candidates:
        raise CowFormatError(
            SMAP_OFFSET,
            f"section map ({smap.group} sections a bit, {smap.nbits} bits) fits no index "
            f"within the file's {file_size} bytes",
        )
    if device_bytes is not None and geometry(device_bytes // SECTOR_SIZE).nsect in candidates:
        return geometry(device_bytes // SECTOR_SIZE).nsect
    return candidates[-1] if header.index_only else candidates[0]


def true_content_fd(
    path_or_fd: str | os.PathLike[str] | int,
    *,
    name: str | None = None,
    nsect: int | None = None,
    extents: Sequence[Extent] | None = None,
    device: str | None = None,
) -> int | None:
    """A descriptor of an anonymous file holding what the module means the COW file to contain.

    Returns None for a file without a section map (read it through the filesystem); the caller
    closes the returned descriptor. ``nsect`` is the index's section count when the tracked device is
    known (else see :func:`index_sections`); ``extents`` and ``device`` replace FIEMAP and the device
    holding the file (tests). Reading the device needs read access to it (root).
    """
    if isinstance(path_or_fd, int):
        return _view(path_or_fd, name or f"fd {path_or_fd}", nsect, extents, device)
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _view(fd, name or os.fspath(path_or_fd), nsect, extents, device)
    finally:
        os.close(fd)


def _view(
    fd: int, name: str, nsect: int | None, extents: Sequence[Extent] | None, device: str | None
) -> int | None:
    block0 = _pread(fd, BLOCK_SIZE, 0)
    smap = read_section_map(block0)
    if smap is None:
        return None
    if nsect is not None and not smap.fits(nsect):
        raise CowFormatError(
            SMAP_OFFSET,
            f"section map ({smap.group} sections a bit, {smap.nbits} bits) "
            f"does not fit an index of {nsect} sections",
        )
    header = CowHeader.unpack(block0)
    size = os.fstat(fd).st_size
    layout = sorted(fiemap(fd) if extents is None else extents)
    device = device_of(fd, name) if device is None else device
    try:
        dev = _open_device(device)
    except PermissionError as exc:
        raise PermissionError(
            exc.errno,
            f"{name}: the COW file keeps its index beneath the filesystem; "
            f"reading it needs read access to the device {device}",
        ) from exc
    try:
        if nsect is None:
            nsect = index_sections(smap, header, size, os.lseek(dev, 0, os.SEEK_END))
        return _build(dev, layout, smap, header, nsect, size, block0)
    finally:
        os.close(dev)


def _build(
    dev: int,
    layout: list[Extent],
    smap: SectionMap,
    header: CowHeader,
    nsect: int,
    size: int,
    block0: bytes,
) -> int:
    ranges: list[tuple[int, int]] = []
    for g in range(smap.nbits):
        if smap.valid(g * smap.group):
            first, end = g * smap.group, min((g + 1) * smap.group, nsect)
            ranges.append((HEADER_REGION + first * SECTION_SIZE, HEADER_REGION + end * SECTION_SIZE))
    if not header.index_only:
        ranges.append((HEADER_REGION + nsect * SECTION_SIZE, header.fpos * BLOCK_SIZE))
    out = _anonymous_file()
    try:
        os.ftruncate(out, size)
        _pwrite(out, block0, 0)
        for start, end in ranges:
            _copy(dev, out, layout, start, min(end, size))
    except BaseException:
        os.close(out)
        raise
    return out


def _copy(dev: int, out: int, layout: list[Extent], start: int, end: int) -> None:
    """Copy file bytes [start, end) from their places on the device into ``out`` at the same offsets."""
    logicals = [e.logical for e in layout]
    pos = start
    while pos < end:
        i = bisect.bisect_right(logicals, pos) - 1
        if i < 0 or pos >= layout[i].logical + layout[i].length:
            raise CowFormatError(
                pos, f"byte {pos} of the COW file is in no extent: its place on the device is unknown"
            )
        ext = layout[i]
        if ext.flags & FIEMAP_EXTENT_UNREADABLE:
            raise CowFormatError(
                pos, f"extent at {ext.logical} has no place on the device (flags {ext.flags:#x})"
            )
        n = min(end, ext.logical + ext.length, pos + COPY_CHUNK) - pos
        data = _read_device(dev, n, ext.physical + pos - ext.logical)
        if len(data) < n:
            raise OSError(errno.EIO, f"device ends before byte {ext.physical + pos - ext.logical + n}")
        for p in range(0, n, _PIECE):
            piece = data[p : p + _PIECE]
            if piece != _ZERO_PIECE[: len(piece)]:
                _pwrite(out, piece, pos + p)
        pos += n


def _open_device(path: str) -> int:
    """The device, read with O_DIRECT where it allows: the module writes beneath its page cache, so
    cached pages of these blocks (from mkfs, say) would be stale."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _read_device(dev: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset``; O_DIRECT needs a page-aligned buffer (an anonymous mmap is one) and
    512-byte-aligned offsets and lengths, which extents and sections have."""
    if not fcntl.fcntl(dev, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
        return _pread(dev, n, offset)
    buf = mmap.mmap(-1, max(n, 1))
    try:
        done = 0
        while done < n:
            got = os.preadv(dev, [memoryview(buf)[done:n]], offset + done)
            if not got:
                break
            done += got
        return bytes(buf[:done])
    finally:
        buf.close()


def _anonymous_file() -> int:
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("dbd-cow-view", os.MFD_CLOEXEC)
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="dbd-cow-view-")
    os.unlink(path)
    return fd


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    done = 0
    while done < n:
        part = os.pread(fd, n - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]
