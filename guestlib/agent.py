"""A long-lived guest process that runs the consistency fuzzer's steps (``python3 -m guestlib agent``).

Starting python3 under TCG costs most of a second; a Hypothesis example is dozens of steps. The
agent is started once per guest and serves requests through two FIFOs: the host's shell command
writes one JSON request line to ``<dir>/in`` and reads one JSON reply line from ``<dir>/out``
(see fuzz/guest_machine.py, class Agent). A request is ``{"op": NAME, ...}``; the reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "errno": N}``.

The arena: a file on the tracked filesystem, fully written and fsynced, whose physical 4 KiB
blocks (from FIEMAP) are the model's device. Raw writes go to the block device at those blocks,
beside the filesystem, which never reads or rewrites them: the filesystem stays consistent while
the fuzzer controls the exact blocks the tracer sees, and reads of /dev/dattoN at the same blocks
are the snapshot the model predicts.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

from guestlib.churn import fallocate
from pydbd import cow as cowfmt
from pydbd.control import Control

BLOCK = 4096
ZERO_TOKEN = "<zeroes>"  # fuzz.model.ZEROES: a block of zero bytes
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
BLKDISCARD = 0x1277  # _IO(0x12, 119): uint64 range[2] = {start, length} in bytes
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x1, 0x2, 0x10
# How op_trim reaches the device: an ioctl or a fallocate(2) mode on the block device.
TRIM_IOCTLS = {"discard": BLKDISCARD, "zeroout": BLKZEROOUT}
TRIM_FALLOCATE = {
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,  # blkdev: write-zeroes, may unmap
    "zero_range": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,  # blkdev: write-zeroes, no unmap
}
# Extents whose physical location is not plain data on the device: refuse such an arena.
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_BAD = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | FIEMAP_EXTENT_UNWRITTEN  # unknown, delalloc, ...


class AgentError(Exception):
    pass


def block_content(token: str) -> bytes:
    """The 4 KiB a model token stands for (distinct tokens give distinct blocks; ZERO_TOKEN zeros)."""
    if token == ZERO_TOKEN:
        return bytes(BLOCK)
    seed = hashlib.sha256(token.encode()).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def token_digest(token: str) -> str:
    return digest(block_content(token))


def fiemap_extents(path: str, *, allow_unwritten: bool = False) -> list[tuple[int, int]]:
    """(physical byte offset, byte length) of every extent of a fully written file (FIEMAP, synced);
    with ``allow_unwritten``, preallocated extents count too (a COW file's, which the driver writes
    beneath the filesystem)."""
    bad = FIEMAP_EXTENT_BAD & ~FIEMAP_EXTENT_UNWRITTEN if allow_unwritten else FIEMAP_EXTENT_BAD
    size = os.stat(path).st_size
    out: list[tuple[int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            count = 64
            buf = bytearray(32 + 56 * count)
            struct.pack_into("=QQIIII", buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, count, 0)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            (mapped,) = struct.unpack_from("=I", buf, 20)
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                logical, physical, length, _r1, _r2, flags = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                if flags & bad:
                    raise AgentError(f"{path}: extent at {logical} is not plain data (flags {flags:#x})")
                out.append((physical, length))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last:
                break
    return out


def device_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """(first device block, count) of each run of consecutive device blocks, in the given order."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def whole_blocks(extents: list[tuple[int, int]]) -> list[int]:
    """Device 4 KiB blocks lying wholly inside one extent (a 1 KiB-block filesystem may straddle)."""
    out: list[int] = []
    for physical, length in extents:
        first = -(-physical // BLOCK)
        out.extend(range(first, (physical + length) // BLOCK))
    return out


class Agent:
    def __init__(self) -> None:
        self.arena: list[int] = []
        self.device = ""
        self.buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants

    # -- ops -----------------------------------------------------------------------------------
    def op_arena(self, path: str, device: str, blocks: int, create: bool = True) -> list[int]:
        """Create the arena file (or, not `create`, map an existing one: after a reboot) and return
        the device blocks of the model (`blocks` of them).

        The file is written with data (not fallocated: unwritten extents are not plain data) and
        twice the size needed, since only 4 KiB device blocks wholly inside it are used."""
        if create:
            with open(path, "wb") as f:
                for i in range(2 * blocks + 4):
                    f.write(block_content(f"arena:{i}"))
                f.flush()
                os.fsync(f.fileno())
        usable = whole_blocks(fiemap_extents(path))
        if len(usable) < blocks:
            raise AgentError(f"{path}: only {len(usable)} whole 4 KiB device blocks, {blocks} needed")
        self.arena = usable[:blocks]
        self.device = device
        return self.arena

    def _pread(self, fd: int, block: int) -> bytes:
        n = os.preadv(fd, [self.buf], block * BLOCK)
        if n != BLOCK:
            raise AgentError(f"short read of block {block}: {n} bytes")
        return bytes(self.buf)

    def op_write(self, blocks: list[int], tokens: list[str]) -> int:
        """O_DIRECT writes of model blocks (arena indexes) with the tokens' contents."""
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        try:
            for index, token in zip(blocks, tokens, strict=True):
                self.buf[:] = block_content(token)
                os.pwritev(fd, [self.buf], self.arena[index] * BLOCK)
        finally:
            os.close(fd)
        return len(blocks)

    def op_trim(self, blocks: list[int], how: str) -> dict[str, Any]:
        """Discard or zero model blocks (arena indexes) on the device, beside the filesystem: `how`
        is "discard" (BLKDISCARD), "zeroout" (BLKZEROOUT), "punch_hole" or "zero_range" (fallocate
        on the block device). One call per run of consecutive device blocks. Returns the errno of
        the first failing call (0: all done; the rest are then skipped) and the digests of the
        blocks as the device reads them afterwards."""
        if how not in TRIM_IOCTLS and how not in TRIM_FALLOCATE:
            raise AgentError(f"unknown trim {how!r}")
        failed = 0
        fd = os.open(self.device, os.O_WRONLY)
        try:
            for first, count in device_runs([self.arena[i] for i in blocks]):
                try:
                    if how in TRIM_IOCTLS:
                        fcntl.ioctl(fd, TRIM_IOCTLS[how], struct.pack("=QQ", first * BLOCK, count * BLOCK))
                    else:
                        fallocate(fd, TRIM_FALLOCATE[how], first * BLOCK, count * BLOCK)
                except OSError as e:
                    failed = e.errno or errno.EIO
                    break
        finally:
            os.close(fd)
        fd = os.open(self.device, os.O_RDONLY | os.O_DIRECT)
        try:
            digests = [digest(self._pread(fd, self.arena[i])) for i in blocks]
        finally:
            os.close(fd)
        return {"errno": failed, "digests": digests}

    def op_digests(self, path: str) -> list[str]:
        """Digest of every arena block as `path` (origin or /dev/dattoN) reads it, bypassing caches."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return [digest(self._pread(fd, b)) for b in self.arena]
        finally:
            os.close(fd)

    def op_backup(self, source: str, image: str, full: bool) -> list[str]:
        """A backup image of `source` (a snapshot device): the whole device (`full`), or a sparse
        file of the device's size holding only the arena's blocks. Returns the digests of the
        image's arena blocks."""
        src = os.open(source, os.O_RDONLY | os.O_DIRECT)
        try:
            size = os.lseek(src, 0, os.SEEK_END)
            with open(image, "wb") as out:
                out.truncate(size)
                if full:
                    chunk = mmap.mmap(-1, 1 << 20)
                    for off in range(0, size, len(chunk)):
                        n = os.preadv(src, [chunk], off)
                        out.seek(off)
                        out.write(chunk[:n])
                else:
                    for b in self.arena:
                        out.seek(b * BLOCK)
                        out.write(self._pread(src, b))
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(src)
        return self.op_digests(image)

    def op_update_img(self, snapshot: str, cow: str, image: str) -> dict[str, Any]:
        """pydbd's update-img (in this process: no interpreter start-up) on `image`."""
        import io

        from pydbd import updateimg

        out, err = io.StringIO(), io.StringIO()
        rc = updateimg.run(snapshot, cow, image, progress=False, out=out, err=err)
        return {"rc": rc, "out": out.getvalue()[-4000:], "err": err.getvalue()[-4000:]}

    def op_ctl(self, method: str, args: list[Any]) -> int:
        """One pydbd Control call; the errno it failed with, or 0."""
        try:
            with Control() as c:
                getattr(c, method)(*args)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def op_info(self, minor: int) -> dict[str, Any] | None:
        try:
            with Control() as c:
                i = c.info(minor)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return {"state": i.state, "error": i.error, "seqid": i.seqid, "uuid": i.uuid_hex,
                "nr_changed": i.nr_changed_blocks, "cow": i.cow, "version": i.version}  # fmt: skip

    def op_state(self, minor: int, snapdev: str) -> dict[str, Any]:
        """One round trip for the invariants: tracer info, origin digests, snapshot digests (if any)."""
        info = self.op_info(minor)
        snap = self.op_digests(snapdev) if os.path.exists(snapdev) else None
        return {"info": info, "origin": self.op_digests(self.device), "snapshot": snap}

    def op_cow_index(self, path: str, device_sectors: int) -> dict[str, Any]:
        """A closed COW file: the arena indexes it marks, its header's seqid, uuid, counts, flags."""
        where = {b: i for i, b in enumerate(self.arena)}
        with cowfmt.CowFile(path, device_sectors) as cf:
            marked = sorted(where[b] for b, _v in cf.iter_changed() if b in where)
            h = cf.header
            return {"marked": marked, "seqid": h.seqid, "uuid": h.uuid.hex(), "flags": h.flags,
                    "nr_changed": h.nr_changed_blocks, "version": h.version}  # fmt: skip

    def op_trace_mark(self, taken: bool) -> None:
        """A marker of the tracked device in the block trace (started here if it is not running):
        its next COW file's creation begins, or (``taken``) its snapshot exists, whose COW files
        are then recorded in the chain (guestlib.discards, guestlib.cowchain)."""
        from guestlib import cowchain, discards

        discards.start()
        discards.mark(discards.mark_for(os.stat(self.device).st_rdev, taken=taken))
        if taken:
            cowchain.record_live()

    def op_chain_record(self) -> None:
        """Record the COW files in use (after an expansion: its new extents)."""
        from guestlib import cowchain

        cowchain.record_live()

    def op_change_list_traced(self, cow: str, max_spurious: int) -> dict[str, Any]:
        """The precision oracle on a closed COW file over the whole device: every block written
        below the filesystem in its period is marked, at most ``max_spurious`` others."""
        from guestlib import cowchain, oracles, period

        exempt = cowchain.exempt_for(cow)
        return oracles.change_list_traced(cow, *period.written_below(cow), exempt=exempt,
                                          max_spurious=max_spurious).to_json()  # fmt: skip

    def op_sh(self, cmd: str) -> dict[str, Any]:
        import subprocess

        p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, errors="replace", check=False)
        return {"rc": p.returncode, "out": p.stdout[-4000:], "err": p.stderr[-4000:]}

    def op_files(self, directory: str, seed: int, count: int, fsync: bool) -> int:
        """Filesystem activity beside the arena on up to 16 small files: (re)write, append, truncate
        (shrink or grow), delete, rename, fallocate (growing the file or keeping its size), punch a
        hole, zero a range; each file fsynced after its operation when `fsync`."""
        import random

        rng = random.Random(seed)
        os.makedirs(directory, exist_ok=True)
        for _ in range(count):
            name = os.path.join(directory, f"f{rng.randrange(16)}")
            action = rng.randrange(9)
            if action == 3 and os.path.exists(name):
                os.unlink(name)
                continue
            if action == 4 and os.path.exists(name):
                os.replace(name, os.path.join(directory, f"f{rng.randrange(16)}"))
                continue
            exists = os.path.exists(name)
            with open(name, "r+b" if exists and action >= 5 else "ab" if action == 1 else "wb") as f:
                if action == 5:  # allocate, maybe past the end (KEEP_SIZE) or growing the file
                    fallocate(f.fileno(), rng.choice([0, FALLOC_FL_KEEP_SIZE]), rng.randrange(0, 64 * 1024),
                              rng.randrange(1, 64 * 1024))  # fmt: skip
                elif action in (6, 7) and exists:  # punch a hole / zero a range inside the file
                    size = os.fstat(f.fileno()).st_size
                    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if action == 6 else FALLOC_FL_ZERO_RANGE
                    if size:
                        off = rng.randrange(size)
                        fallocate(f.fileno(), mode, off, rng.randrange(1, size - off + 1))
                elif action == 8:  # truncate without writing: shrink or grow (a sparse tail)
                    f.truncate(rng.randrange(0, 96 * 1024))
                else:
                    f.write(os.urandom(rng.randrange(1, 64 * 1024)))
                    if action == 2:
                        f.truncate(rng.randrange(0, 16 * 1024))
                if fsync:
                    os.fsync(f.fileno())
        return count


def serve(directory: str) -> None:
    agent = Agent()
    ops: dict[str, Callable[..., Any]] = {
        name[3:]: getattr(agent, name) for name in dir(agent) if name.startswith("op_")
    }
    inp, outp = os.path.join(directory, "in"), os.path.join(directory, "out")
    for p in (inp, outp):
        if not os.path.exists(p):
            os.mkfifo(p)
    with open(os.path.join(directory, "pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    done = False
    while not done:
        with open(inp) as f:
            line = f.readline()
        if not line.strip():
            continue
        reply: dict[str, Any]
        try:
            req = json.loads(line)
            op = req.pop("op")
            done = op == "quit"
            reply = {"ok": True, "result": None if done else ops[op](**req)}
        except Exception as e:  # every failure goes back to the host, which decides
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
        with open(outp, "w") as f:
            f.write(json.dumps(reply) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m guestlib agent DIR", file=sys.stderr)
        return 2
    os.makedirs(argv[0], exist_ok=True)
    serve(argv[0])
    return 0
