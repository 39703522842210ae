"""update-img: apply the blocks changed during an incremental period to an image of the previous snapshot.

Usage: ``update-img [--dry-run] [--verify] [--progress|--no-progress] <snapshot> <cow file> <image file>``
(``update-img --help`` prints it on stdout and exits 0).

The COW file is the *old* (now index-only) file released by transition-to-snapshot; the snapshot
device is the new snapshot of the same series. Every block whose index entry is non-zero is copied
from the snapshot to the image at the same offset. Checks, output lines and exit codes follow the
upstream tool (spec 6.2): wrong argument count -> usage on stderr, exit 22; open failures exit with
the errno; magic, uuid or seqid mismatch -> one-line message, exit 22.

Differences from upstream
-------------------------
* The exit status is 1 when any block copy failed (upstream exits 0 and only counts the errors).
* A snapshot path that does not resolve to ``/dev/datto<N>`` is always an error (exit 22); upstream
  may exit 0 there because errno can be 0.
* Adjacent changed blocks are copied with one read and one write of up to 4 MiB (reusing one buffer)
  instead of 4 KiB at a time. When a coalesced copy fails, its blocks are retried one by one so the
  error count is still per block.
* When the snapshot size is not a multiple of 4096, the final partial block is copied (short) instead of
  failing on the short read.
* A COW index shorter than the snapshot needs is rejected (exit 22) before anything is written.
* ``--help`` prints the usage line on stdout and exits 0 (upstream: usage on stderr, exit 22), and
  the usage line lists the options.
* A progress line (blocks done / total, MB/s) is drawn on stderr when stderr is a TTY
  (``--progress`` / ``--no-progress`` force it on or off).
* ``--dry-run`` lists the runs of blocks that would be copied and writes nothing (the image is opened
  read-only). ``--verify`` re-reads every written range from the image and compares it with what was
  written; a mismatch is reported and makes the exit status 1.
* The snapshot ranges about to be copied are announced to the kernel (POSIX_FADV_WILLNEED, up to
  32 MiB ahead) so scattered blocks are read with many requests in flight instead of one at a time.
* Memory use is bounded (two 4 MiB buffers and one 512 KiB index chunk) whatever the index size.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from pydbd.cow import BLOCK_SIZE, MAGIC, CowFile, CowFormatError, CowHeader, entry_offset

MAX_IO = 4 * 1024 * 1024
MAX_RUN_BLOCKS = MAX_IO // BLOCK_SIZE
# How far ahead of the copy reads are queued (page cache, not process memory).
PREFETCH_BYTES = 32 * 1024 * 1024
USAGE = (
    "Usage: {prog} [--dry-run] [--verify] [--progress|--no-progress] "
    "<snapshot device> <cow file> <image file>"
)
OPTIONS = {"--dry-run", "--verify", "--progress", "--no-progress"}
_SNAPSHOT_NAME = re.compile(r"/dev/datto(\d+)")

PwriteFn = Callable[[int, memoryview, int], int]


class SnapshotInfo(Protocol):
    """What update-img needs from INFO: the series uuid and the snapshot's sequence id."""

    @property
    def uuid(self) -> bytes: ...

    @property
    def seqid(self) -> int: ...


class UpdateError(Exception):
    """A fatal failure: ``message`` goes to stderr and ``code`` (an errno value) is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------------
# Default lookups (replaced by tests)


def default_minor_resolver(snapshot: str) -> int:
    """Minor number of the snapshot device named by ``snapshot`` after resolving symlinks."""
    real = os.path.realpath(snapshot)
    match = _SNAPSHOT_NAME.fullmatch(real)
    if match is None:
        raise UpdateError(errno.EINVAL, f"snapshot {snapshot} ({real}) is not a /dev/datto<minor> device")
    return int(match.group(1))


def default_info_lookup(minor: int) -> Any:
    # Imported lazily: host tests inject their own lookup and never need the control device.
    from pydbd.control import Control

    with Control() as ctl:
        return ctl.info(minor)


# --------------------------------------------------------------------------------------------------
# Argument handling


@dataclass(frozen=True)
class Arguments:
    snapshot: str
    cow: str
    image: str
    dry_run: bool = False
    verify: bool = False
    progress: bool | None = None


def wants_help(args: list[str]) -> bool:
    """``--help`` given as an option (before any ``--``)."""
    return "--help" in (args[: args.index("--")] if "--" in args else args)


def parse_args(args: list[str]) -> Arguments | None:
    """Split options from the three positionals; None means a usage error."""
    flags: set[str] = set()
    positional: list[str] = []
    only_positional = False
    for arg in args:
        if not only_positional and arg == "--":
            only_positional = True
        elif not only_positional and arg.startswith("--"):
            if arg not in OPTIONS:
                return None
            flags.add(arg)
        else:
            positional.append(arg)
    if len(positional) != 3 or {"--progress", "--no-progress"} <= flags:
        return None
    progress = True if "--progress" in flags else False if "--no-progress" in flags else None
    snapshot, cow, image = positional
    return Arguments(
        snapshot, cow, image, dry_run="--dry-run" in flags, verify="--verify" in flags, progress=progress
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point. ``argv`` excludes the program name; None means ``sys.argv[1:]``."""
    # Like upstream, the usage line names argv[0]; run as `python -m pydbd.updateimg` that would be
    # this file's path, so the installed command's name is shown instead.
    prog = sys.argv[0] if argv is None and not sys.argv[0].endswith(".py") else "update-img"
    args = sys.argv[1:] if argv is None else argv
    if wants_help(args):
        print(USAGE.format(prog=prog))
        return 0
    parsed = parse_args(args)
    if parsed is None:
        print(USAGE.format(prog=prog), file=sys.stderr)
        return errno.EINVAL
    return run(
        parsed.snapshot,
        parsed.cow,
        parsed.image,
        info_lookup=None,
        minor_resolver=None,
        dry_run=parsed.dry_run,
        verify=parsed.verify,
        progress=parsed.progress,
    )


# --------------------------------------------------------------------------------------------------
# The update


@dataclass
class CopyStats:
    changed: int = 0
    errors: int = 0
    mismatches: int = 0
    bytes_copied: int = 0


def run(
    snapshot: str,
    cow: str,
    image: str,
    *,
    info_lookup: Callable[[int], Any] | None = None,
    minor_resolver: Callable[[str], int] | None = None,
    dry_run: bool = False,
    verify: bool = False,
    progress: bool | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    pwrite: PwriteFn = os.pwrite,
) -> int:
    """Perform the update and return the exit status.

    ``info_lookup(minor)`` must return an object with ``uuid`` (16 bytes) and ``seqid``;
    ``minor_resolver(path)`` maps the snapshot path to its minor. ``pwrite`` is the image writer
    (a seam for fault injection).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        return _update(
            snapshot,
            cow,
            image,
            _Settings(
                info_lookup=info_lookup or default_info_lookup,
                minor_resolver=minor_resolver or default_minor_resolver,
                dry_run=dry_run,
                verify=verify,
                progress=err.isatty() if progress is None else progress,
                out=out,
                err=err,
                pwrite=pwrite,
            ),
        )
    except UpdateError as exc:
        print(f"update-img: {exc.message}", file=err)
        return exc.code


@dataclass(frozen=True)
class _Settings:
    info_lookup: Callable[[int], Any]
    minor_resolver: Callable[[str], int]
    dry_run: bool
    verify: bool
    progress: bool
    out: TextIO
    err: TextIO
    pwrite: PwriteFn


def _update(snapshot: str, cow: str, image: str, s: _Settings) -> int:
    with contextlib.ExitStack() as stack:
        snap_fd = _open(stack, snapshot, os.O_RDONLY, "snapshot")
        cow_fd = _open(stack, cow, os.O_RDONLY, "cow file")
        img_fd = _open(stack, image, os.O_RDONLY if s.dry_run else os.O_RDWR, "image file")
        info = _lookup_info(_resolve_minor(snapshot, s.minor_resolver), s.info_lookup)
        cow_file = _load_cow(cow_fd, cow)
        check_series(cow_file.header, info)
        snap_size = _size_of(snap_fd, snapshot)
        nblocks = -(-snap_size // BLOCK_SIZE)
        print(f"snapshot is {nblocks} blocks large", file=s.out, flush=True)
        entries = _index_entries(cow_file, snap_size)
        if s.dry_run:
            return _dry_run(cow_file.iter_changed_runs(0, entries), s.out)
        return _copy(cow_file, entries, snap_fd, img_fd, snap_size, s)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack never swallows


def _copy(cow_file: CowFile, entries: int, snap_fd: int, img_fd: int, snap_size: int, s: _Settings) -> int:
    print("copying blocks", file=s.out, flush=True)
    copier = _Copier(snap_fd, img_fd, snap_size, s)
    runs = cow_file.iter_changed_runs(0, entries, MAX_RUN_BLOCKS)
    try:
        stats = copier.copy_all(prefetched(snap_fd, runs, snap_size), -(-snap_size // BLOCK_SIZE))
    except OSError as exc:
        # Block copy failures are counted inside the copier; this is the index itself failing.
        raise _os_failure(exc, "error reading cow file index") from exc
    except CowFormatError as exc:
        raise UpdateError(errno.EINVAL, f"error reading cow file index: {exc.message}") from exc
    print(f"copying complete: {stats.changed} blocks changed, {stats.errors} errors", file=s.out, flush=True)
    if stats.mismatches:
        print(f"update-img: verify failed: {stats.mismatches} blocks differ", file=s.err)
    return 1 if stats.errors or stats.mismatches else 0


def _open(stack: contextlib.ExitStack, path: str, flags: int, what: str) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_failure(exc, f"error opening {what} {path}") from exc
    stack.callback(os.close, fd)
    return fd


def _os_failure(exc: OSError, context: str) -> UpdateError:
    # Upstream exits with errno; an OSError without one must still fail.
    return UpdateError(exc.errno or errno.EIO, f"{context}: {exc.strerror or exc}")


def _resolve_minor(snapshot: str, resolver: Callable[[str], int]) -> int:
    try:
        return resolver(snapshot)
    except OSError as exc:
        raise _os_failure(exc, f"error resolving snapshot {snapshot}") from exc
    except ValueError as exc:
        raise UpdateError(errno.EINVAL, f"error resolving snapshot {snapshot}: {exc}") from exc


def _lookup_info(minor: int, lookup: Callable[[int], Any]) -> SnapshotInfo:
    try:
        info: SnapshotInfo = lookup(minor)
    except OSError as exc:
        raise _os_failure(exc, f"error getting info for snapshot minor {minor}") from exc
    return info


def _load_cow(fd: int, name: str) -> CowFile:
    try:
        return CowFile.from_fd(fd, name)
    except CowFormatError as exc:
        raise UpdateError(errno.EINVAL, f"error reading cow file header: {exc.message}") from exc
    except OSError as exc:
        raise _os_failure(exc, "error reading cow file header") from exc


def check_series(header: CowHeader, info: SnapshotInfo) -> None:
    """The COW file must belong to the snapshot's series and be the one just before it."""
    if header.magic != MAGIC:
        raise UpdateError(errno.EINVAL, f"invalid magic number {header.magic} in cow file (expected {MAGIC})")
    if bytes(info.uuid) != header.uuid:
        raise UpdateError(
            errno.EINVAL,
            f"cow file uuid {header.uuid.hex()} does not match snapshot uuid {bytes(info.uuid).hex()}",
        )
    if header.seqid != info.seqid - 1:
        raise UpdateError(
            errno.EINVAL,
            f"cow file seqid {header.seqid} is not the one before the snapshot's seqid {info.seqid}",
        )


def _size_of(fd: int, name: str) -> int:
    # SEEK_END works for block devices, whose st_size is 0, as well as for plain files.
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise _os_failure(exc, f"error getting size of {name}") from exc


def _index_entries(cow_file: CowFile, snap_size: int) -> int:
    """Number of index entries to read: one per (possibly partial) snapshot block.

    The entry of a trailing partial block may lie past a truncated index; it is then taken as 0.
    Any other shortfall means the COW file does not describe this snapshot.
    """
    wanted = -(-snap_size // BLOCK_SIZE)
    if cow_file.file_size < entry_offset(0):
        raise UpdateError(
            errno.EINVAL,
            f"cow file ends at byte {cow_file.file_size}, inside its {entry_offset(0)}-byte header: "
            "it holds no index",
        )
    available = max(0, (cow_file.file_size - entry_offset(0)) // 8)
    if available < snap_size // BLOCK_SIZE:
        raise UpdateError(
            errno.EINVAL,
            f"cow index has {available} entries but the snapshot needs {wanted} "
            f"(file ends at byte {cow_file.file_size})",
        )
    return min(wanted, available)


def _dry_run(runs: Iterator[tuple[int, int]], out: TextIO) -> int:
    print("dry run: listing the blocks that would be copied", file=out)
    changed = 0
    for first, count in runs:
        print(f"would copy blocks {first}-{first + count - 1} ({count} blocks)", file=out)
        changed += count
    print(f"dry run complete: {changed} blocks changed, nothing written", file=out, flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# Block copying


def prefetched(
    fd: int, runs: Iterator[tuple[int, int]], size: int, window: int = PREFETCH_BYTES
) -> Iterator[tuple[int, int]]:
    """Pass ``runs`` through, asking the kernel to start reading each one ``window`` bytes ahead.

    A synchronous pread per scattered block keeps one request in flight, so the copy runs at the
    device's latency. POSIX_FADV_WILLNEED queues asynchronous reads into the page cache, which lets the
    device work on many blocks at once while this process copies the earlier ones.
    """
    pending: collections.deque[tuple[int, int]] = collections.deque()
    ahead = 0
    for first, count in runs:
        length = max(0, min(count * BLOCK_SIZE, size - first * BLOCK_SIZE))
        _advise_willneed(fd, first * BLOCK_SIZE, length)
        pending.append((first, count))
        ahead += length
        while ahead > window:
            done = pending.popleft()
            ahead -= done[1] * BLOCK_SIZE
            yield done
    yield from pending


def _advise_willneed(fd: int, offset: int, length: int) -> None:
    # Only a hint: a file system or device that cannot take it is copied without prefetching.
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        return


class _Copier:
    """Copies runs of blocks from snapshot to image through one reused buffer."""

    def __init__(self, snap_fd: int, img_fd: int, snap_size: int, s: _Settings) -> None:
        self.snap_fd = snap_fd
        self.img_fd = img_fd
        self.snap_size = snap_size
        self.s = s
        self.buf = memoryview(bytearray(MAX_IO))
        self.check = memoryview(bytearray(MAX_IO)) if s.verify else None
        self.stats = CopyStats()

    def copy_all(self, runs: Iterator[tuple[int, int]], nblocks: int) -> CopyStats:
        bar = _Progress(self.s.err, nblocks) if self.s.progress else None
        for first, count in runs:
            self.stats.changed += count
            self._copy_run(first, count)
            if bar is not None:
                bar.update(first + count, self.stats.bytes_copied)
        if bar is not None:
            bar.finish(self.stats.bytes_copied)
        return self.stats

    def _copy_run(self, first: int, count: int) -> None:
        try:
            self._transfer(first, count)
        except OSError:
            # Retry block by block so one bad block does not count its whole run as failed.
            for block in range(first, first + count):
                self._copy_single(block)

    def _copy_single(self, block: int) -> None:
        try:
            self._transfer(block, 1)
        except OSError as exc:
            self.stats.errors += 1
            print(f"update-img: error copying block {block}: {exc.strerror or exc}", file=self.s.err)

    def _transfer(self, first: int, count: int) -> None:
        offset = first * BLOCK_SIZE
        length = min(count * BLOCK_SIZE, self.snap_size - offset)
        data = self.buf[:length]
        _read_exact(self.snap_fd, data, offset)
        _write_exact(self.img_fd, data, offset, self.s.pwrite)
        self.stats.bytes_copied += length
        if self.check is not None:
            self._verify(first, data, offset)

    def _verify(self, first: int, data: memoryview, offset: int) -> None:
        assert self.check is not None
        back = self.check[: len(data)]
        _read_exact(self.img_fd, back, offset)
        if back == data:
            return
        for i in range(0, len(data), BLOCK_SIZE):
            if back[i : i + BLOCK_SIZE] != data[i : i + BLOCK_SIZE]:
                self.stats.mismatches += 1
                print(
                    f"update-img: verify: block {first + i // BLOCK_SIZE} differs after writing",
                    file=self.s.err,
                )


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read at byte {offset + done}")
        done += n


def _write_exact(fd: int, view: memoryview, offset: int, pwrite: PwriteFn) -> None:
    done = 0
    while done < len(view):
        n = pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at byte {offset + done}")
        done += n


class _Progress:
    """A single self-overwriting status line, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO, total_blocks: int) -> None:
        self.stream = stream
        self.total = max(1, total_blocks)
        self.start = time.monotonic()
        self.last_draw = 0.0

    def update(self, position: int, copied: int) -> None:
        now = time.monotonic()
        if now - self.last_draw >= 0.1:
            self.last_draw = now
            self._draw(position, copied, now)

    def finish(self, copied: int) -> None:
        self._draw(self.total, copied, time.monotonic())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, position: int, copied: int, now: float) -> None:
        fraction = min(1.0, position / self.total)
        filled = int(fraction * 30)
        rate = copied / max(now - self.start, 1e-9) / 1e6
        bar = "#" * filled + "." * (30 - filled)
        self.stream.write(f"\r[{bar}] {position}/{self.total} blocks {fraction:6.1%} {rate:8.1f} MB/s")
        self.stream.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
