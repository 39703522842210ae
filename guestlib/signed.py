"""A workload whose every written 4 KiB block says what it is, so a wrong block says how it is wrong.

Block layout: a 56-byte header, then a payload that is a pure function of the header fields.

=====  ====  =====================================================================
off    size  field
=====  ====  =====================================================================
0      8     magic ``DBDSIG01``
8      8     run id (derived from the workload seed)
16     8     stream (0 for a raw device, the file's number for file-level writes)
24     8     sequence number (one per write operation, from 1)
32     8     block offset (in the device, or in the file)
40     16    checksum: blake2b-128 of bytes 0-39 and the payload
56     4040  payload: SHAKE-128 of (run id, stream, block, seq)
=====  ====  =====================================================================

:func:`diagnose` / :func:`classify` compare a block read back with the sequence number expected at its
location and answer one of:

- ``ok``: exactly the expected block;
- ``stale``: an intact block of this run for this location, but an older write than expected;
- ``newer``: an intact block of this run for this location from a later write than expected (for a
  snapshot: a write made after the snapshot leaked into it), or a block of this run where none was expected;
- ``misplaced``: an intact block of this run that belongs to another location;
- ``torn``: a mix of writes: the checksum fails, or the header is gone but some 512-byte sector still
  matches the expected block;
- ``foreign``: not this run's data where this run's data was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
MAGIC = b"DBDSIG01"
_FIELDS = struct.Struct("<8sQQQQ")
_HEADER = struct.Struct("<8sQQQQ16s")
HEADER_SIZE = _HEADER.size
PAYLOAD_SIZE = BLOCK_SIZE - HEADER_SIZE
_KEY = struct.Struct("<QQQQ")

Verdict = Literal["ok", "stale", "newer", "misplaced", "torn", "foreign"]
VERDICTS: tuple[Verdict, ...] = ("ok", "stale", "newer", "misplaced", "torn", "foreign")


def run_id_for_seed(seed: int) -> int:
    """The run id used for a workload seed: a 64-bit hash, so different seeds do not collide."""
    digest = hashlib.blake2b(f"dbd-signed-run:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def payload(run_id: int, stream: int, block: int, seq: int) -> bytes:
    return hashlib.shake_128(_KEY.pack(run_id, stream, block, seq)).digest(PAYLOAD_SIZE)


def make_block(run_id: int, block: int, seq: int, stream: int = 0) -> bytes:
    """The exact 4096 bytes written for ``block`` by write number ``seq``."""
    fields = _FIELDS.pack(MAGIC, run_id, stream, seq, block)
    body = payload(run_id, stream, block, seq)
    checksum = hashlib.blake2b(fields + body, digest_size=16).digest()
    return fields + checksum + body


@dataclass(frozen=True)
class Signature:
    """The header of a block that starts with the magic; ``intact`` is whether its checksum holds."""

    run_id: int
    stream: int
    seq: int
    block: int
    intact: bool


def parse_block(data: bytes | bytearray | memoryview) -> Signature | None:
    """The signature of ``data``, or None when it does not start with the magic (or is short)."""
    raw = bytes(data)
    if len(raw) != BLOCK_SIZE or not raw.startswith(MAGIC):
        return None
    magic, run_id, stream, seq, block, checksum = _HEADER.unpack_from(raw, 0)
    del magic
    actual = hashlib.blake2b(raw[: _FIELDS.size] + raw[HEADER_SIZE:], digest_size=16).digest()
    return Signature(run_id, stream, seq, block, actual == checksum)


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    message: str

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def _sector_matches(data: bytes, expected: bytes) -> list[int]:
    return [
        i // SECTOR_SIZE
        for i in range(0, BLOCK_SIZE, SECTOR_SIZE)
        if data[i : i + SECTOR_SIZE] == expected[i : i + SECTOR_SIZE]
    ]


def diagnose(
    data: bytes | bytearray | memoryview,
    expected_seq_by_block: Mapping[int, int],
    *,
    at: int | None = None,
    run_id: int | None = None,
    stream: int = 0,
) -> Diagnosis:
    """Classify ``data`` read from block ``at`` against the expected sequence numbers.

    ``at`` is where the block was read; without it the block's own header names the location, so
    misplacement cannot be seen. ``run_id`` None accepts the run id found in the block.
    A location absent from ``expected_seq_by_block`` is expected to hold no block of this run.
    """
    raw = bytes(data)
    sig = parse_block(raw)
    ours = sig is not None and (run_id is None or sig.run_id == run_id) and sig.stream == stream
    loc = at if at is not None else (sig.block if sig is not None and ours else None)
    exp = None if loc is None else expected_seq_by_block.get(loc)
    if exp is None:
        return _unexpected_location(sig if ours else None, loc)
    rid = run_id if run_id is not None else (sig.run_id if sig is not None else None)
    if rid is not None:
        want = make_block(rid, loc if loc is not None else 0, exp, stream)
        if raw == want:
            return Diagnosis("ok", f"block {loc}: seq {exp} as expected")
    return _wrong_block(raw, sig if ours else None, sig, rid, loc, exp, stream)


def _unexpected_location(sig: Signature | None, loc: int | None) -> Diagnosis:
    if sig is None:
        return Diagnosis("ok", f"block {loc}: no block of this run expected and none found")
    if not sig.intact:
        return Diagnosis("torn", f"block {loc}: checksum of a block of this run fails (seq {sig.seq})")
    if loc is not None and sig.block != loc:
        return Diagnosis("misplaced", f"block {loc} holds block {sig.block} (seq {sig.seq})")
    return Diagnosis("newer", f"block {loc}: holds seq {sig.seq} where no write of this run was expected")


def _wrong_block(
    raw: bytes,
    ours: Signature | None,
    any_sig: Signature | None,
    rid: int | None,
    loc: int | None,
    exp: int,
    stream: int,
) -> Diagnosis:
    where = f"block {loc} (expected seq {exp})"
    if ours is None:
        if rid is not None and loc is not None and len(raw) == BLOCK_SIZE:
            sectors = _sector_matches(raw, make_block(rid, loc, exp, stream))
            if sectors:
                return Diagnosis(
                    "torn", f"{where}: header lost, but sectors {sectors} hold the expected data"
                )
        if any_sig is not None:
            return Diagnosis(
                "foreign",
                f"{where}: block of another run/stream (run {any_sig.run_id:#x} stream {any_sig.stream})",
            )
        return Diagnosis("foreign", f"{where}: not a signed block ({_preview(raw)})")
    if not ours.intact:
        return Diagnosis("torn", f"{where}: header says seq {ours.seq} block {ours.block} but checksum fails")
    if ours.block != loc:
        return Diagnosis("misplaced", f"{where}: holds block {ours.block} seq {ours.seq}")
    if ours.seq < exp:
        return Diagnosis("stale", f"{where}: holds older seq {ours.seq}")
    if ours.seq > exp:
        return Diagnosis("newer", f"{where}: holds later seq {ours.seq}")
    return Diagnosis("torn", f"{where}: intact header of the right seq but the payload differs")


def _preview(raw: bytes) -> str:
    if not any(raw):
        return "all zero"
    return f"starts {raw[:16].hex()}"


def classify(
    block: bytes | bytearray | memoryview,
    expected_seq_by_block: Mapping[int, int],
    *,
    at: int | None = None,
    run_id: int | None = None,
    stream: int = 0,
) -> Verdict:
    """The verdict of :func:`diagnose` alone."""
    return diagnose(block, expected_seq_by_block, at=at, run_id=run_id, stream=stream).verdict


# --------------------------------------------------------------------------------------------------
# Writers


class _AlignedBuffer:
    """Page-aligned scratch memory (O_DIRECT needs aligned user buffers)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)

    def view(self, length: int) -> memoryview:
        return memoryview(self.map)[:length]

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at byte {offset + done}")
        done += n


@dataclass
class SignedState:
    """What a signed workload wrote: enough to check a device, image or snapshot afterwards."""

    run_id: int
    stream: int = 0
    next_seq: int = 1
    expected: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "stream": self.stream,
            "next_seq": self.next_seq,
            "expected": {str(k): v for k, v in sorted(self.expected.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedState:
        return cls(
            run_id=int(data["run_id"]),
            stream=int(data.get("stream", 0)),
            next_seq=int(data.get("next_seq", 1)),
            expected={int(k): int(v) for k, v in data["expected"].items()},
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SignedState:
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))


class SignedWriter:
    """Writes signed blocks to a device or file at block granularity, recording what it wrote.

    ``direct`` opens with O_DIRECT (aligned buffer); ``sync`` opens with O_DSYNC. A file is not
    created: pass an existing device or file (a file-level writer creates its files itself).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        state: SignedState,
        *,
        direct: bool = False,
        sync: bool = False,
        max_blocks: int = 256,
    ) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        if sync:
            flags |= os.O_DSYNC
        self.state = state
        self.max_blocks = max_blocks
        self._fd = os.open(os.fspath(path), flags)
        self._buf = _AlignedBuffer(max_blocks * BLOCK_SIZE)

    def write(self, first: int, count: int = 1) -> int:
        """Write blocks [first, first+count) as one request with a new sequence number; returns it."""
        if first < 0 or not 1 <= count <= self.max_blocks:
            raise ValueError(f"bad block range {first}+{count} (at most {self.max_blocks} blocks)")
        seq = self.state.next_seq
        self.state.next_seq += 1
        view = self._buf.view(count * BLOCK_SIZE)
        try:
            for i in range(count):
                view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = make_block(
                    self.state.run_id, first + i, seq, self.state.stream
                )
            _pwrite_all(self._fd, view, first * BLOCK_SIZE)
        finally:
            view.release()
        for i in range(count):
            self.state.expected[first + i] = seq
        return seq

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._buf.close()

    def __enter__(self) -> SignedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def random_writes(
    path: str | os.PathLike[str],
    seed: int,
    ops: int,
    *,
    first_block: int = 0,
    nblocks: int,
    max_run: int = 16,
    direct: bool = False,
    sync: bool = False,
    state: SignedState | None = None,
) -> SignedState:
    """``ops`` writes of 1..max_run blocks at seeded random places in [first_block, first_block+nblocks).

    The writes end with fsync. Pass the ``state`` of an earlier call to continue its sequence.
    """
    if nblocks <= 0:
        raise ValueError("nblocks must be positive")
    rng = random.Random(seed)
    state = state if state is not None else SignedState(run_id_for_seed(seed))
    with SignedWriter(path, state, direct=direct, sync=sync, max_blocks=max(1, max_run)) as writer:
        for _ in range(ops):
            count = rng.randint(1, min(max_run, nblocks))
            first = first_block + rng.randrange(0, nblocks - count + 1)
            writer.write(first, count)
        writer.fsync()
    return state


# --------------------------------------------------------------------------------------------------
# Checking


@dataclass
class CheckReport:
    """Verdict counts over every checked location, and the first few failures in location order."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    failures: list[tuple[str, int, str, str]] = field(default_factory=list)  # (where, block, verdict, why)
    max_failures: int = 20

    @property
    def ok(self) -> bool:
        return all(n == 0 for verdict, n in self.counts.items() if verdict != "ok")

    @property
    def message(self) -> str:
        if self.ok:
            return f"all {self.counts['ok']} signed blocks as expected"
        bad = ", ".join(f"{n} {v}" for v, n in self.counts.items() if n and v != "ok")
        where, block, verdict, why = self.failures[0]
        return f"{bad}; first: {where} block {block}: {verdict}: {why}"

    def add(self, where: str, block: int, diag: Diagnosis) -> None:
        self.counts[diag.verdict] += 1
        if not diag.ok and len(self.failures) < self.max_failures:
            self.failures.append((where, block, diag.verdict, diag.message))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "counts": dict(self.counts),
            "failures": [list(f) for f in self.failures],
        }


def _read_block(fd: int, block: int) -> bytes:
    return os.pread(fd, BLOCK_SIZE, block * BLOCK_SIZE)


def check(path: str | os.PathLike[str], state: SignedState, report: CheckReport | None = None) -> CheckReport:
    """Classify every location ``state`` expects a block at, reading from ``path`` (device or file)."""
    report = report if report is not None else CheckReport()
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        for block in sorted(state.expected):
            diag = diagnose(
                _read_block(fd, block), state.expected, at=block, run_id=state.run_id, stream=state.stream
            )
            report.add(os.fspath(path), block, diag)
    finally:
        os.close(fd)
    return report


# --------------------------------------------------------------------------------------------------
# File-level workload inside a mounted filesystem


@dataclass
class SignedFilesState:
    """Signed files below a directory: relative path -> the state of that file (stream = file number)."""

    run_id: int
    files: dict[str, SignedState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "files": {p: s.to_json() for p, s in sorted(self.files.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedFilesState:
        files = {p: SignedState.from_json(s) for p, s in data["files"].items()}
        return cls(run_id=int(data["run_id"]), files=files)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SignedFilesState:
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))


def random_file_writes(
    directory: str | os.PathLike[str],
    seed: int,
    ops: int,
    *,
    files: int = 4,
    max_file_blocks: int = 64,
    max_run: int = 8,
    direct: bool = False,
) -> SignedFilesState:
    """Seeded block writes into ``files`` files ``sig<N>.dat`` below ``directory``; every file is fsynced
    at the end, then the directory, so the returned state is durable."""
    rng = random.Random(seed)
    result = SignedFilesState(run_id_for_seed(seed))
    root = os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    writers: dict[str, SignedWriter] = {}
    try:
        for number in range(1, files + 1):
            name = f"sig{number}.dat"
            full = os.path.join(root, name)
            os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
            result.files[name] = SignedState(result.run_id, stream=number)
            writers[name] = SignedWriter(full, result.files[name], direct=direct, max_blocks=max_run)
        names = sorted(writers)
        for _ in range(ops):
            name = rng.choice(names)
            count = rng.randint(1, min(max_run, max_file_blocks))
            writers[name].write(rng.randrange(0, max_file_blocks - count + 1), count)
        for writer in writers.values():
            writer.fsync()
        _fsync_dir(root)
    finally:
        for writer in writers.values():
            writer.close()
    return result


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_files(directory: str | os.PathLike[str], state: SignedFilesState) -> CheckReport:
    """Classify every written block of every file; a missing file counts each expected block foreign."""
    report = CheckReport()
    for name, file_state in sorted(state.files.items()):
        full = os.path.join(os.fspath(directory), name)
        if not os.path.exists(full):
            for block in sorted(file_state.expected):
                report.add(full, block, Diagnosis("foreign", "file is missing"))
            continue
        check(full, file_state, report)
    return report
