"""Per-4-KiB-block digests of a block device or file, and comparisons of two digest arrays.

A digest array is ``bytes``: one 16-byte blake2b digest per block, packed back to back, so block ``i``
is ``digests[16*i : 16*i+16]``. A device whose size is not a multiple of 4096 gets a digest of its
final partial block (of the bytes that exist). 64 MiB of device costs 256 KiB of digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Iterator

BLOCK_SIZE = 4096
DIGEST_SIZE = 16
# Large reads keep the device busy; 4 MiB is far above any readahead win and trivial for memory.
READ_SIZE = 4 * 1024 * 1024


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """Digest of one block's bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def device_size(fd: int) -> int:
    """Size in bytes of an open file or block device (st_size is 0 for block devices)."""
    return os.lseek(fd, 0, os.SEEK_END)


def _open(path: str | os.PathLike[str], direct: bool) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    return os.open(os.fspath(path), flags)


def iter_chunks(
    path: str | os.PathLike[str],
    start: int = 0,
    count: int | None = None,
    *,
    direct: bool = False,
    read_size: int = READ_SIZE,
) -> Iterator[tuple[int, memoryview]]:
    """Yield (first block, data) chunks covering blocks [start, start+count); the view is reused.

    With ``direct`` the file is opened O_DIRECT and read into page-aligned memory (an mmap buffer);
    the final partial block of a device is then read with a whole-block request, which the kernel
    returns short.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"bad block range start={start} count={count}")
    read_size = max(BLOCK_SIZE, read_size - read_size % BLOCK_SIZE)
    fd = _open(path, direct)
    try:
        size = device_size(fd)
        end_byte = size if count is None else min(size, (start + count) * BLOCK_SIZE)
        buf = mmap.mmap(-1, read_size)
        try:
            view = memoryview(buf)
            offset = start * BLOCK_SIZE
            while offset < end_byte:
                want = min(read_size, end_byte - offset)
                got = _read_full(fd, view, offset, want, direct)
                if got == 0:
                    return
                yield offset // BLOCK_SIZE, view[:got]
                if got < want:
                    return
                offset += got
        finally:
            # A consumer may still hold the last chunk; the mapping then goes when that is dropped.
            with contextlib.suppress(BufferError):
                view.release()
                buf.close()
    finally:
        os.close(fd)


def _read_full(fd: int, view: memoryview, offset: int, want: int, direct: bool) -> int:
    """Read ``want`` bytes at ``offset`` into ``view`` (fewer only at end of file)."""
    done = 0
    while done < want:
        length = want - done
        if direct:
            length = -(-length // BLOCK_SIZE) * BLOCK_SIZE  # O_DIRECT needs whole blocks
        n = os.preadv(fd, [view[done : done + length]], offset + done)
        if n <= 0:
            break
        done += n
    return min(done, want)


def hash_blocks(
    path: str | os.PathLike[str],
    start: int = 0,
    count: int | None = None,
    *,
    direct: bool = False,
    read_size: int = READ_SIZE,
) -> bytes:
    """Packed 16-byte digests of blocks [start, start+count) (``count`` None: to the end)."""
    out = bytearray()
    for _, data in iter_chunks(path, start, count, direct=direct, read_size=read_size):
        for pos in range(0, len(data), BLOCK_SIZE):
            out += block_digest(data[pos : pos + BLOCK_SIZE])
    return bytes(out)


def sha256_device(path: str | os.PathLike[str], *, direct: bool = False) -> str:
    """Hex sha256 of the whole device or file."""
    digest = hashlib.sha256()
    for _, data in iter_chunks(path, direct=direct):
        digest.update(data)
    return digest.hexdigest()


def block_count(digests: bytes) -> int:
    if len(digests) % DIGEST_SIZE:
        raise ValueError(f"digest array length {len(digests)} is not a multiple of {DIGEST_SIZE}")
    return len(digests) // DIGEST_SIZE


def digest_at(digests: bytes, block: int) -> bytes:
    """Digest of ``block``; empty bytes past the end of the array."""
    return digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE]


# Blocks compared per slice when scanning for differences: equal slices cost one memcmp.
_SCAN_BLOCKS = 4096


def iter_differing_blocks(a: bytes, b: bytes) -> Iterator[int]:
    """Ascending indexes of blocks whose digests differ; blocks present in only one array differ too."""
    na, nb = block_count(a), block_count(b)
    common = min(na, nb)
    step = _SCAN_BLOCKS * DIGEST_SIZE
    for base in range(0, common * DIGEST_SIZE, step):
        end = min(base + step, common * DIGEST_SIZE)
        if a[base:end] == b[base:end]:
            continue
        for pos in range(base, end, DIGEST_SIZE):
            if a[pos : pos + DIGEST_SIZE] != b[pos : pos + DIGEST_SIZE]:
                yield pos // DIGEST_SIZE
    yield from range(common, max(na, nb))


def first_difference(a: bytes, b: bytes) -> int | None:
    """Index of the first block whose digest differs (or that only one array has), None if equal."""
    return next(iter_differing_blocks(a, b), None)


def differing_blocks(a: bytes, b: bytes) -> list[int]:
    return list(iter_differing_blocks(a, b))


def save_digests(digests: bytes, path: str | os.PathLike[str]) -> None:
    with open(path, "wb") as handle:
        handle.write(digests)


def load_digests(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    block_count(data)  # validates the length
    return data
