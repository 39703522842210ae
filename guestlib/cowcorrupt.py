"""Corrupt copies of a clean COW file, for reload fuzzing (tests/guest/test_ioctl_fuzz.py).

:func:`variants` derives, from the bytes of a clean COW file, seeded corruptions of the kinds a
reload must refuse: header fields (magic, flags, fpos, fsize, seqid, version, counters), a file
truncated inside its header or index, an index entry pointing into the header/index or past the
end of the file, two entries sharing one data slot. Each variant says what it changed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydbd import cow as cowfmt

U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Variant:
    """`must_refuse`: spec 4.4 requires activation to fail (magic, CLEAN, INDEX_ONLY vs mode, a file
    too short for its index). Other corruptions may be refused or survived, never a kernel warning."""

    name: str
    data: bytes
    must_refuse: bool = False


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _entry(data: bytes, block: int) -> int:
    value: int = struct.unpack_from("<Q", data, cowfmt.entry_offset(block))[0]
    return value


def _header_variants(clean: bytes, rng: random.Random) -> Iterator[Variant]:
    h = cowfmt.CowHeader.unpack(clean[: cowfmt.HEADER_SIZE])
    size = len(clean)
    bad_magic = (h.magic ^ (rng.randrange(1, 1 << 32))) & 0xFFFFFFFF
    yield Variant("magic", _put(clean, cowfmt.OFF_MAGIC, "<I", bad_magic), must_refuse=True)
    yield Variant("not CLEAN", _put(clean, cowfmt.OFF_FLAGS, "<I", h.flags & ~cowfmt.CLEAN), must_refuse=True)
    flipped = _put(clean, cowfmt.OFF_FLAGS, "<I", h.flags ^ cowfmt.INDEX_ONLY)
    yield Variant("INDEX_ONLY flipped", flipped, must_refuse=True)
    yield Variant("unknown flag", _put(clean, cowfmt.OFF_FLAGS, "<I", h.flags | 1 << rng.randrange(3, 32)))
    for name, value in (("0", 0), ("inside header", 100), ("past fsize", h.fsize + 4096), ("2^64-1", U64)):
        yield Variant(f"fpos {name}", _put(clean, cowfmt.OFF_FPOS, "<Q", value))
    for name, value in (("0", 0), ("4096", 4096), ("size+1 block", size + 4096), ("2^63", 1 << 63)):
        yield Variant(f"fsize {name}", _put(clean, cowfmt.OFF_FSIZE, "<Q", value))
    yield Variant("seqid 0", _put(clean, cowfmt.OFF_SEQID, "<Q", 0))
    yield Variant("version 0", _put(clean, cowfmt.OFF_VERSION, "<Q", 0))
    yield Variant("version huge", _put(clean, cowfmt.OFF_VERSION, "<Q", U64))
    yield Variant("nr_changed_blocks huge", _put(clean, cowfmt.OFF_NR, "<Q", U64))


def _index_variants(clean: bytes, rng: random.Random, nblocks: int) -> Iterator[Variant]:
    h = cowfmt.CowHeader.unpack(clean[: cowfmt.HEADER_SIZE])
    block = rng.randrange(max(1, nblocks))
    at = cowfmt.entry_offset(block)
    if at + cowfmt.ENTRY_SIZE > len(clean):
        return
    blocks_in_file = len(clean) // cowfmt.BLOCK_SIZE
    if not h.index_only:
        yield Variant(f"entry {block} -> block 1 (the index)", _put(clean, at, "<Q", 1))
        yield Variant(f"entry {block} past the file", _put(clean, at, "<Q", blocks_in_file + 10))
        yield Variant(f"entry {block} -> 2^64-1", _put(clean, at, "<Q", U64))
        mapped = [b for b in range(min(nblocks, 4096)) if _entry(clean, b) > 1]
        if mapped and nblocks > 1:
            first, slot = mapped[0], _entry(clean, mapped[0])
            other = (first + 1 + rng.randrange(nblocks - 1)) % nblocks
            yield Variant(
                f"entries {first} and {other} share slot {slot}",
                _put(clean, cowfmt.entry_offset(other), "<Q", slot),
            )
    else:
        yield Variant(f"incremental entry {block} = 7", _put(clean, at, "<Q", 7))


def variants(clean: bytes, seed: int, nblocks: int) -> list[Variant]:
    """Every corruption kind once, with seeded choices; `nblocks` is the origin's 4 KiB block count."""
    rng = random.Random(seed)
    out = list(_header_variants(clean, rng))
    index_end = cowfmt.HEADER_REGION + nblocks * cowfmt.ENTRY_SIZE
    out += [
        Variant("truncated to 0", b"", must_refuse=True),
        Variant("truncated inside the header", clean[:40], must_refuse=True),
        Variant(
            "truncated inside the index",
            clean[: max(cowfmt.HEADER_REGION + 8, index_end // 2)],
            must_refuse=True,
        ),
    ]
    out += list(_index_variants(clean, rng, nblocks))
    return out
