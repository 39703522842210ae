"""Oracles that decide whether a backup taken with the driver is exactly right.

Each oracle is a function returning an :class:`OracleResult` (``.ok``, ``.message``, and for block
oracles ``.first_block``, the first block that is wrong). They never raise on a wrong answer: only
on unusable input (a missing file, mismatched hash arrays lengths are reported, not raised).

(a) :func:`snapshot_stability`    two hash arrays of one snapshot device taken at different times
(b) :func:`point_in_time`         files read from a mounted snapshot vs the manifest fsynced before setup;
    :func:`fsck`                  ``e2fsck -fn`` / ``xfs_repair -n`` of the snapshot device
(c) :func:`change_list_complete`  every block differing between snapshots N and N+1 is marked in COW N;
    :func:`update_img_matches`    image N + update-img == snapshot N+1
(d) :func:`cow_structure`         a finalized COW file's data blocks, counters and identity
(e) :func:`nothing_lost`          every fsynced file survived a fault
"""

from __future__ import annotations

import bisect
import io
import os
import subprocess
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guestlib import blockhash, churn
from guestlib.blockhash import BLOCK_SIZE
from pydbd import cow as cowfmt
from pydbd import updateimg

SECTOR = cowfmt.SECTOR_SIZE

# Runs a command and returns (exit status, combined output); injectable for tests.
Runner = Callable[[Sequence[str]], tuple[int, str]]


@dataclass
class OracleResult:
    name: str
    ok: bool
    message: str
    first_block: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "oracle": self.name,
            "ok": self.ok,
            "message": self.message,
            "first_block": self.first_block,
            "details": self.details,
        }


def _digest_hex(digests: bytes, block: int) -> str:
    d = blockhash.digest_at(digests, block)
    return d.hex() if d else "(absent)"


# --------------------------------------------------------------------------------------------------
# (a) snapshot stability


def snapshot_stability(earlier: bytes, later: bytes) -> OracleResult:
    """The snapshot device must read the same at both times: every block digest equal."""
    first = blockhash.first_difference(earlier, later)
    nb = blockhash.block_count(earlier)
    if first is None:
        return OracleResult("snapshot-stability", True, f"all {nb} blocks unchanged", details={"blocks": nb})
    total = sum(1 for _ in blockhash.iter_differing_blocks(earlier, later))
    if blockhash.block_count(later) != nb:
        why = f"snapshot size changed from {nb} to {blockhash.block_count(later)} blocks"
    else:
        why = (
            f"block {first} changed between the two reads "
            f"(digest {_digest_hex(earlier, first)} then {_digest_hex(later, first)})"
        )
    return OracleResult(
        "snapshot-stability",
        False,
        f"{why}; {total} blocks differ in all",
        first_block=first,
        details={"differing": total, "blocks": nb},
    )


# --------------------------------------------------------------------------------------------------
# (b) point-in-time truth and (e) nothing lost


def _tree_failure(name: str, what: str, problems: list[str]) -> OracleResult | None:
    if not problems:
        return None
    return OracleResult(
        name, False, f"{what}: {problems[0]} ({len(problems)} problems)", details={"problems": problems[:50]}
    )


def point_in_time(
    snapshot_root: str | os.PathLike[str],
    manifest: Mapping[str, str | None],
    *,
    fsck_device: str | None = None,
    fstype: str | None = None,
    runner: Runner | None = None,
) -> OracleResult:
    """Files read from the mounted snapshot equal the manifest fsynced before setup (deleted ones absent).

    With ``fsck_device`` (and ``fstype`` ext2/3/4 or xfs) the device is also checked read-only.
    """
    failed = _tree_failure(
        "point-in-time", "snapshot is not the state at setup", churn.compare_tree(snapshot_root, manifest)
    )
    if failed is not None:
        return failed
    live = sum(1 for v in manifest.values() if v is not None)
    message = f"all {live} files as fsynced before setup, {len(manifest) - live} deleted names absent"
    if fsck_device is not None:
        checked = fsck(fsck_device, fstype or "ext4", runner=runner)
        if not checked.ok:
            return OracleResult(
                "point-in-time", False, f"{message}, but {checked.message}", details=checked.details
            )
        message += f"; {checked.message}"
    return OracleResult("point-in-time", True, message)


def nothing_lost(
    root: str | os.PathLike[str],
    manifest: Mapping[str, str | None],
    *,
    volatile: Collection[str] = (),
    check_deleted: bool = True,
) -> OracleResult:
    """After a fault every fsynced file is present with its content (paths in ``volatile`` skipped)."""
    problems = churn.compare_tree(root, manifest, skip=frozenset(volatile), check_deleted=check_deleted)
    failed = _tree_failure("nothing-lost", "fsynced data lost", problems)
    if failed is not None:
        return failed
    checked = sum(1 for p in manifest if p not in volatile)
    return OracleResult("nothing-lost", True, f"all {checked} fsynced paths as expected")


def _run(argv: Sequence[str]) -> tuple[int, str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def fsck_command(device: str, fstype: str) -> list[str]:
    if fstype == "xfs":
        return ["xfs_repair", "-n", device]
    if fstype in ("ext2", "ext3", "ext4"):
        return ["e2fsck", "-fn", device]
    raise ValueError(f"no read-only checker for file system type {fstype!r}")


def fsck(device: str, fstype: str, *, runner: Runner | None = None) -> OracleResult:
    """Read-only consistency check; exit status 0 is clean for both checkers."""
    argv = fsck_command(device, fstype)
    code, output = (runner or _run)(argv)
    tail = output.strip().splitlines()[-5:]
    if code == 0:
        return OracleResult("fsck", True, f"{argv[0]} found {device} clean")
    return OracleResult(
        "fsck",
        False,
        f"{' '.join(argv)} exited {code}: {' | '.join(tail)}",
        details={"exit": code, "output": output[-4000:]},
    )


# --------------------------------------------------------------------------------------------------
# (c) change-list completeness and update-img


def _marked_blocks(cow_path: str | os.PathLike[str], nblocks: int) -> Iterator[int]:
    with cowfmt.CowFile(cow_path) as cf:
        available = max(0, (cf.file_size - cowfmt.HEADER_REGION) // cowfmt.ENTRY_SIZE)
        for block, _ in cf.iter_changed(0, min(nblocks, available)):
            yield block


def touches(block: int, extents: Sequence[tuple[int, int]]) -> bool:
    """Does 4 KiB block ``block`` overlap one of the sorted, merged (byte offset, length) extents?"""
    lo = block * BLOCK_SIZE
    i = bisect.bisect_right(extents, (lo + BLOCK_SIZE - 1, 1 << 62)) - 1
    return i >= 0 and extents[i][0] + extents[i][1] > lo


def _merged_runs(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, count in sorted(runs):
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], first + count - out[-1][0]))
        else:
            out.append((first, count))
    return out


def _ranges(blocks: Sequence[int]) -> str:
    """``3-7, 12`` for blocks 3, 4, 5, 6, 7, 12."""
    out: list[str] = []
    for b in blocks:
        if out and out[-1].split("-")[-1] == str(b - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ", ".join(out)


def _subtract(runs: Sequence[tuple[int, int]], minus: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the merged ``runs`` outside the merged ``minus`` runs."""
    out: list[tuple[int, int]] = []
    j = 0
    for first, count in runs:
        pos, end = first, first + count
        while j < len(minus) and minus[j][0] + minus[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(minus) and minus[k][0] < end:
            if minus[k][0] > pos:
                out.append((pos, minus[k][0] - pos))
            pos = max(pos, minus[k][0] + minus[k][1])
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def _in_runs(block: int, runs: Sequence[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(runs, (block, 1 << 62)) - 1
    return i >= 0 and block < runs[i][0] + runs[i][1]


def change_list_complete(
    snap_n: bytes,
    snap_n1: bytes,
    cow_path: str | os.PathLike[str],
    *,
    exempt: Sequence[tuple[int, int]] = (),
    discarded: Sequence[tuple[int, int]] = (),
    max_spurious: int | None = None,
    max_listed: int = 50,
) -> OracleResult:
    """Every block that differs between snapshot N and N+1 must be marked in the COW file of period N,
    except blocks of the chain's COW files (``exempt``, device byte extents): the driver writes
    those beneath the filesystem and does not report them (doc/compat.md).

    Unmarked differing blocks fail. Marked blocks that did not change (spurious: rewrites with the
    same data, metadata churn, or blocks the driver itself wrote and reported) are counted:
    ``details["precision"]`` is the share of marked blocks that really changed, and more than
    ``max_spurious`` of them fail (a change list must cost what changed, not what the volume holds).
    Unchanged marked blocks that a discard covered (``discarded``: (first block, count) runs traced
    below the filesystem, see guestlib.discards) are counted apart as ``discarded``: a discard marks
    its range, whatever the device reads there afterwards.
    """
    nblocks = max(blockhash.block_count(snap_n), blockhash.block_count(snap_n1))
    own = sorted(exempt)
    diffs = (b for b in blockhash.iter_differing_blocks(snap_n, snap_n1) if not touches(b, own))
    marked = _marked_blocks(cow_path, nblocks)
    missed: list[int] = []
    n_missed = n_diff = n_marked = hits = n_discarded = 0
    discard_runs = _merged_runs(discarded)
    spurious_blocks: list[int] = []
    d = next(diffs, None)
    m = next(marked, None)
    while d is not None or m is not None:
        if d is not None and (m is None or d < m):
            n_diff += 1
            n_missed += 1
            if len(missed) < max_listed:
                missed.append(d)
            d = next(diffs, None)
        elif m is not None and (d is None or m < d):
            n_marked += 1
            if _in_runs(m, discard_runs):
                n_discarded += 1
            elif len(spurious_blocks) < max_listed:
                spurious_blocks.append(m)
            m = next(marked, None)
        else:
            n_diff += 1
            n_marked += 1
            hits += 1
            d = next(diffs, None)
            m = next(marked, None)
    precision = hits / n_marked if n_marked else 1.0
    details: dict[str, Any] = {
        "blocks": nblocks,
        "differing": n_diff,
        "marked": n_marked,
        "missed": n_missed,
        "missed_blocks": missed,
        "over_marked": n_marked - hits,
        "discarded": n_discarded,
        "spurious": n_marked - hits - n_discarded,
        "spurious_blocks": spurious_blocks,
        "precision": precision,
    }
    if n_missed:
        first = missed[0]
        return OracleResult(
            "change-list",
            False,
            f"block {first} differs between snapshot N and N+1 "
            f"({_digest_hex(snap_n, first)} -> {_digest_hex(snap_n1, first)}) but is not marked in "
            f"{os.fspath(cow_path)}; {n_missed} of {n_diff} differing blocks missed",
            first_block=first,
            details=details,
        )
    spurious = n_marked - hits - n_discarded
    if max_spurious is not None and spurious > max_spurious:
        return OracleResult(
            "change-list",
            False,
            f"{spurious} blocks of {os.fspath(cow_path)} are marked but did not change between snapshot "
            f"N and N+1 and were not written, discarded or zeroed by the workload (bound "
            f"{max_spurious}); {n_marked} marked, {hits} of "
            f"them changed, {n_discarded} discarded, precision {precision:.3f}; the first: "
            f"{_ranges(spurious_blocks)}",
            details=details,
        )
    return OracleResult(
        "change-list",
        True,
        f"all {n_diff} differing blocks marked; {n_marked} marked, {spurious} spurious, "
        f"{n_discarded} discarded, precision {precision:.3f}",
        details=details,
    )


def change_list_traced(
    cow_path: str | os.PathLike[str],
    traced: Sequence[tuple[int, int]],
    also_explains: Sequence[tuple[int, int]] = (),
    *,
    exempt: Sequence[tuple[int, int]] = (),
    nblocks: int | None = None,
    max_spurious: int | None = None,
    max_listed: int = 50,
) -> OracleResult:
    """The change list of period N against what the workload did below the filesystem in that
    period (``traced``: (first block, count) runs of writes, discards and write-zeroes, see
    guestlib.discards), without reading either snapshot, so it costs the same on any volume size.
    Every traced block outside ``exempt`` (the chain's COW file extents, byte runs) must be marked;
    more than ``max_spurious`` marked blocks that were not traced fail. ``also_explains`` (what came
    after the next snapshot's marker) may explain a marked block but need not be marked: the
    transition writes the previous change list for update-img after its freeze."""
    runs = _merged_runs(traced)
    explained = _merged_runs([*traced, *also_explains])
    own_blocks = _merged_runs(
        [
            (start // BLOCK_SIZE, -(-(start + length) // BLOCK_SIZE) - start // BLOCK_SIZE)
            for start, length in exempt
        ]
    )
    marked = list(_marked_blocks(cow_path, nblocks if nblocks is not None else 1 << 62))
    spurious = [b for b in marked if not _in_runs(b, explained)]
    missed_runs = _subtract(_subtract(runs, _merged_runs([(b, 1) for b in marked])), own_blocks)
    n_missed = sum(count for _, count in missed_runs)
    missed = [b for first, count in missed_runs for b in range(first, min(first + count, first + max_listed))]
    missed = missed[:max_listed]
    details: dict[str, Any] = {
        "marked": len(marked),
        "traced": sum(count for _, count in runs),
        "missed": n_missed,
        "missed_blocks": missed,
        "spurious": len(spurious),
        "spurious_blocks": spurious[:max_listed],
    }
    name, where = "change-list-traced", os.fspath(cow_path)
    if n_missed:
        return OracleResult(
            name,
            False,
            f"block {missed[0]} was written below the filesystem but is not marked in {where}; "
            f"{n_missed} such blocks: {_ranges(missed)}",
            first_block=missed[0],
            details=details,
        )
    if max_spurious is not None and len(spurious) > max_spurious:
        return OracleResult(
            name,
            False,
            f"{len(spurious)} blocks of {where} are marked but the workload did not write, discard or "
            f"zero them (bound {max_spurious}); the first: {_ranges(spurious[:max_listed])}",
            first_block=spurious[0],
            details=details,
        )
    return OracleResult(
        name,
        True,
        f"all {details['traced']} traced blocks marked; {len(marked)} marked, {len(spurious)} spurious",
        details=details,
    )


def update_img_matches(
    snapshot: str,
    cow_path: str,
    image: str,
    *,
    exempt: Sequence[tuple[int, int]] = (),
    info_lookup: Callable[[int], Any] | None = None,
    minor_resolver: Callable[[str], int] | None = None,
) -> OracleResult:
    """Run update-img (pydbd.updateimg.run) on ``image`` (a copy of snapshot N) with ``cow_path`` (COW N)
    from ``snapshot`` (snapshot N+1); then the image must equal the snapshot outside ``exempt`` (the
    extents of the chain's COW files, see :func:`image_matches`).

    The lookups default to the real driver; host tests inject them.
    """
    out, err = io.StringIO(), io.StringIO()
    code = updateimg.run(
        snapshot,
        cow_path,
        image,
        info_lookup=info_lookup,
        minor_resolver=minor_resolver,
        progress=False,
        out=out,
        err=err,
    )
    details: dict[str, Any] = {"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    if code != 0:
        return OracleResult(
            "update-img", False, f"update-img exited {code}: {err.getvalue().strip()}", details=details
        )
    result = image_matches(image, snapshot, exempt)
    result.details.update(details)
    return OracleResult("update-img", result.ok, f"updated image vs snapshot N+1: {result.message}",
                        result.first_block, result.details)  # fmt: skip


_COMPARE_CHUNK = 1 << 20


def image_matches(image: str, snapshot: str, exempt: Sequence[tuple[int, int]] = ()) -> OracleResult:
    """A backup image must equal the snapshot on every 4 KiB block, except in the sectors of
    ``exempt``: the device extents (byte offset, length) of the COW files of the chain, which the
    driver writes beneath the filesystem without reporting them, and which a snapshot reads as
    zeros while they are its own (doc/compat.md, "What a backup image holds")."""
    extents = sorted(exempt)
    fa = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    fb = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size_a, size_b = blockhash.device_size(fa), blockhash.device_size(fb)
        nblocks = -(-size_b // BLOCK_SIZE)
        details: dict[str, Any] = {"blocks": nblocks, "exempt_extents": len(extents)}
        if size_a != size_b:
            why = f"image is {size_a} bytes, the snapshot {size_b}"
            return OracleResult("image", False, why, details=details)
        inside = 0
        for offset in range(0, size_b, _COMPARE_CHUNK):
            a, b = os.pread(fa, _COMPARE_CHUNK, offset), os.pread(fb, _COMPARE_CHUNK, offset)
            if a == b:
                continue
            for pos in range(0, len(b), BLOCK_SIZE):
                x, y = a[pos : pos + BLOCK_SIZE], b[pos : pos + BLOCK_SIZE]
                if x == y:
                    continue
                block = (offset + pos) // BLOCK_SIZE
                own = own_sectors_mask(block, extents) if extents else 0
                if own and _without_sectors(x, own) == _without_sectors(y, own):
                    inside += 1
                    continue
                details["differing_in_cow_extents"] = inside
                label = _difference_label(x, y, own)
                return OracleResult(
                    "image",
                    False,
                    f"block {block} differs (image {blockhash.block_digest(x).hex()}, snapshot "
                    f"{blockhash.block_digest(y).hex()}{label})",
                    first_block=block,
                    details=details,
                )
        details["differing_in_cow_extents"] = inside
        return OracleResult(
            "image",
            True,
            f"all {nblocks} blocks equal outside the {len(extents)} COW file extents "
            f"({inside} blocks inside them differ)",
            details=details,
        )
    finally:
        os.close(fa)
        os.close(fb)


def marked_blocks_match(image: str, snapshot: str, cow_path: str) -> OracleResult:
    """The blocks ``cow_path`` marks read the same in ``image`` and ``snapshot``: what update-img
    copied is right, checked without reading the rest of a large volume."""
    fa = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    fb = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        n = 0
        for block in _marked_blocks(cow_path, 1 << 62):
            x, y = os.pread(fa, BLOCK_SIZE, block * BLOCK_SIZE), os.pread(fb, BLOCK_SIZE, block * BLOCK_SIZE)
            n += 1
            if x != y:
                return OracleResult(
                    "marked-blocks",
                    False,
                    f"marked block {block} differs (image {blockhash.block_digest(x).hex()}, snapshot "
                    f"{blockhash.block_digest(y).hex()}{_difference_label(x, y, 0)})",
                    first_block=block,
                    details={"compared": n},
                )
        return OracleResult("marked-blocks", True, f"all {n} marked blocks equal", details={"compared": n})
    finally:
        os.close(fa)
        os.close(fb)


def _difference_label(image_block: bytes, snapshot_block: bytes, own: int) -> str:
    """What a differing block looks like: an all-zero side, or a block that straddles a COW file."""
    notes = []
    if not any(image_block):
        notes.append("the image's block is all zeros")
    if not any(snapshot_block):
        notes.append("the snapshot's block is all zeros")
    if own:
        notes.append("the block straddles a COW file's extent")
    return "; " + "; ".join(notes) if notes else ""


def _blocks_of(path: str) -> int:
    """4 KiB blocks of a file or block device (a partial last block counts)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return -(-blockhash.device_size(fd) // BLOCK_SIZE)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# (d) COW structure


def _snapshot_block(fd: int, block: int) -> bytes:
    return os.pread(fd, BLOCK_SIZE, block * BLOCK_SIZE)


def own_sectors_mask(block: int, own_extents: Sequence[tuple[int, int]]) -> int:
    """Bit k set: sector k of 4 KiB device block ``block`` lies in one of ``own_extents`` (device
    byte offset, length; sorted), i.e. belongs to the COW file itself."""
    lo, hi = block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE
    mask = 0
    i = max(0, bisect.bisect_right(own_extents, (lo, 1 << 62)) - 1)
    while i < len(own_extents) and own_extents[i][0] < hi:
        start, length = own_extents[i]
        first, last = max(start, lo), min(start + length, hi)
        for s in range((first - lo) // SECTOR, (last - lo + SECTOR - 1) // SECTOR):
            mask |= 1 << s
        i += 1
    return mask


def cow_structure(
    cow_path: str | os.PathLike[str],
    snapshot: str | os.PathLike[str],
    *,
    device_sectors: int | None = None,
    written: Iterable[int] | None = None,
    exact_written: bool = False,
    expected_seqid: int | None = None,
    expected_uuid: bytes | None = None,
    own_extents: Sequence[tuple[int, int]] = (),
) -> OracleResult:
    """Check a finalized (clean) COW file of a snapshot period against the snapshot it preserved.

    - pydbd.cow.verify passes (with ``device_sectors``, default: the snapshot's size);
    - every mapped entry's data block (at entry × 4096 in the file) equals the snapshot's block,
      except in the sectors of ``own_extents`` (the COW file's own place on the device, when it
      lives there): a 4 KiB block can straddle the file (1 KiB-block filesystems); its preserved
      copy then holds what the file held at the first write (data the driver wrote there since),
      while the snapshot shows the file as it was when taken;
    - nr_changed_blocks equals the number of non-zero entries;
    - seqid / uuid equal the expected values when given;
    - every block in ``written`` is marked (a written block without an entry means the snapshot would
      show the new data); with ``exact_written`` a marked block that was not written also fails
      (use it for raw-device workloads, where nothing else writes).

    ``snapshot`` is the snapshot device or a saved image of it. An index-only file has no data, so
    the data check is skipped (and said so).
    """
    cow_name = os.fspath(cow_path)
    snap_fd = os.open(os.fspath(snapshot), os.O_RDONLY | os.O_CLOEXEC)
    try:
        snap_size = blockhash.device_size(snap_fd)
        sectors = device_sectors if device_sectors is not None else snap_size // cowfmt.SECTOR_SIZE
        report = cowfmt.verify(cow_name, sectors)
        if not report.ok:
            first = report.violations[0] if report.violations else None
            return OracleResult(
                "cow-structure",
                False,
                f"{cow_name} fails the format rules ({report.violations_total} violations): {first}",
                details={"violations": [str(v) for v in report.violations[:50]]},
            )
        header = report.header
        assert header is not None
        problem = _identity_problem(header, expected_seqid, expected_uuid)
        if problem:
            return OracleResult("cow-structure", False, f"{cow_name}: {problem}")
        with cowfmt.CowFile(cow_name, sectors) as cf:
            return _check_entries(cf, snap_fd, written, exact_written, sorted(own_extents))
    finally:
        os.close(snap_fd)


def _identity_problem(header: cowfmt.CowHeader, seqid: int | None, uuid: bytes | None) -> str | None:
    if seqid is not None and header.seqid != seqid:
        return f"seqid is {header.seqid}, expected {seqid}"
    if uuid is not None and header.uuid != uuid:
        return f"uuid is {header.uuid.hex()}, expected {uuid.hex()}"
    return None


def _check_entries(
    cf: cowfmt.CowFile,
    snap_fd: int,
    written: Iterable[int] | None,
    exact: bool,
    own_extents: Sequence[tuple[int, int]],
) -> OracleResult:
    header = cf.header
    marked: set[int] = set()
    compared = 0
    for block, value in cf.iter_changed():
        marked.add(block)
        if header.index_only or value == cowfmt.MARKER:
            continue
        stored = cf.read_slot(value)
        expected = _snapshot_block(snap_fd, block)
        compared += 1
        own = own_sectors_mask(block, own_extents) if own_extents else 0
        if own:
            stored, expected = _without_sectors(stored, own), _without_sectors(expected, own)
        if stored[: len(expected)] != expected:
            return _data_mismatch(cf.path, block, value, stored, expected)
    return _check_counts(cf, marked, compared, written, exact)


def _without_sectors(block: bytes, mask: int) -> bytes:
    """The block with the sectors of ``mask`` zeroed (so that they compare equal)."""
    out = bytearray(block)
    for s in range(BLOCK_SIZE // SECTOR):
        if mask >> s & 1:
            out[s * SECTOR : (s + 1) * SECTOR] = bytes(SECTOR)
    return bytes(out)


def _data_mismatch(path: str, block: int, value: int, stored: bytes, expected: bytes) -> OracleResult:
    return OracleResult(
        "cow-structure",
        False,
        f"{path}: entry of block {block} maps data block {value}, whose content "
        f"({blockhash.block_digest(stored).hex()}) is not the snapshot's block {block} "
        f"({blockhash.block_digest(expected).hex()})",
        first_block=block,
    )


def _check_counts(
    cf: cowfmt.CowFile, marked: set[int], compared: int, written: Iterable[int] | None, exact: bool
) -> OracleResult:
    header = cf.header
    if header.nr_changed_blocks != len(marked):
        return OracleResult(
            "cow-structure",
            False,
            f"{cf.path}: nr_changed_blocks is {header.nr_changed_blocks}, index has {len(marked)} entries",
        )
    written_set = set(written) if written is not None else set()
    unmarked = sorted(written_set - marked)
    if unmarked:
        return OracleResult(
            "cow-structure",
            False,
            f"{cf.path}: block {unmarked[0]} was written but has no entry ({len(unmarked)} such blocks)",
            first_block=unmarked[0],
            details={"unmarked": unmarked[:50]},
        )
    extra = sorted(marked - written_set) if written is not None else []
    if exact and extra:
        return OracleResult(
            "cow-structure",
            False,
            f"{cf.path}: block {extra[0]} has an entry but was not written ({len(extra)} such blocks)",
            first_block=extra[0],
            details={"extra": extra[:50]},
        )
    data_note = "index-only: no data to compare" if header.index_only else f"{compared} data blocks match"
    return OracleResult(
        "cow-structure",
        True,
        f"{cf.path}: valid, {len(marked)} entries, {data_note}, seqid {header.seqid}",
        details={"entries": len(marked), "compared": compared, "extra_marked": len(extra)},
    )
