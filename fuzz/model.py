"""A pure-Python model of a tracked block device, its snapshot and its change lists (spec §2.1, §3, §4).

The model predicts, for any sequence of writes, discards and tracer transitions:
- what ``/dev/dattoN`` reads (copy-on-write: the content at snapshot time for blocks written since,
  the live device otherwise), see :meth:`DeviceModel.snapshot_view`;
- which blocks the COW file of each period marks (every block touched by a data write while the
  tracer is active; discards are not tracked) and its ``nr_changed_blocks``;
- the seqid/uuid series: seqid 1 at setup, +1 per transition-to-snapshot, one uuid per series.

Blocks hold opaque ``bytes`` tokens (a guest driver maps them to real 4 KiB contents); ``ZEROES``
stands for a block of zero bytes (write-zeroes: BLKZEROOUT, fallocate ZERO_RANGE/PUNCH_HOLE on the
device), which is tracked like any data write (spec §3). A discarded block's content depends on the
device: thin or zeroing devices may return zeros or the old data. Upstream does not track discards
(spec §9.11); our module marks them in incremental mode and completes them without touching the
origin during a snapshot (doc/compat.md, defect 11). Two ways to model a discard:

* unobserved (``discard(first, count)``): the content becomes unknown (``None``) and the blocks
  *uncertain*: a snapshot or an update-img result may legitimately differ there;
* observed (``discard(first, count, result=...)``, what the consistency fuzzer does): the caller
  reads the device right after the discard and passes what it now holds. A block whose content
  changed was written as far as any backup is concerned: it is tracked exactly like a write
  (copy-on-write first in snapshot mode, marked in the COW file). A block whose content did not
  change may or may not be marked (``maybe_changed``): a driver that drops the discard and one that
  passes it to a device that ignores it are both right. Both upstream's and our behaviour satisfy
  this strict oracle wherever the discard did not change the data; upstream fails it where it did.

Invalid transitions raise :class:`ModelError`, as the driver answers EINVAL/ENOENT/EBUSY.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

Content = bytes | None
SECTORS_PER_BLOCK = 8
ZEROES = b"<zeroes>"  # a 4 KiB block of zero bytes


class ModelError(Exception):
    """The operation is not valid in the current state (the driver would refuse it)."""


class Mode(enum.Enum):
    NONE = "none"  # no tracer
    SNAPSHOT = "snapshot"  # state 3: /dev/dattoN exists
    INCREMENTAL = "incremental"  # state 2: changes are only marked


@dataclass(frozen=True)
class Period:
    """One closed COW file: the changes between snapshot ``seqid`` and snapshot ``seqid + 1``."""

    seqid: int
    uuid: int
    changed: frozenset[int]
    nr_changed_blocks: int
    uncertain: frozenset[int]
    image_before: tuple[Content, ...]
    image_after: tuple[Content, ...]
    maybe_changed: frozenset[int] = frozenset()  # discarded, content unchanged: marks allowed

    def apply(self, image: Sequence[Content]) -> list[Content]:
        """What update-img makes of ``image``: changed blocks copied from the new snapshot."""
        return [self.image_after[b] if b in self.changed else image[b] for b in range(len(image))]


def blocks_of_sectors(first_sector: int, count: int) -> range:
    """The 4 KiB blocks a write of ``count`` sectors at ``first_sector`` touches (widened to blocks)."""
    if count <= 0:
        return range(0)
    return range(first_sector // SECTORS_PER_BLOCK, (first_sector + count - 1) // SECTORS_PER_BLOCK + 1)


@dataclass
class DeviceModel:
    nblocks: int
    device: list[Content] = field(default_factory=list)
    mode: Mode = Mode.NONE
    seqid: int = 0
    uuid: int = 0
    periods: list[Period] = field(default_factory=list)
    log: list[tuple[object, ...]] = field(default_factory=list)
    _saved: dict[int, Content] = field(default_factory=dict)  # snapshot mode: block -> original content
    _changed: set[int] = field(default_factory=set)  # non-zero entries of the open COW file
    _uncertain: set[int] = field(default_factory=set)
    _maybe: set[int] = field(default_factory=set)  # observed discards that changed nothing
    _image: list[Content] = field(default_factory=list)  # content when the current snapshot was taken
    _series: int = 0

    def __post_init__(self) -> None:
        if self.nblocks <= 0:
            raise ValueError("a device needs at least one block")
        if not self.device:
            self.device = [b"init:%d" % b for b in range(self.nblocks)]
        if len(self.device) != self.nblocks:
            raise ValueError(f"initial content has {len(self.device)} blocks, expected {self.nblocks}")

    # -- I/O -------------------------------------------------------------------------------------

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.nblocks:
            raise ValueError(f"blocks {first}+{count} outside a {self.nblocks}-block device")

    def _track(self, block: int) -> None:
        if self.mode is Mode.SNAPSHOT and block not in self._saved:
            self._saved[block] = self.device[block]  # copy-on-write: the first write wins
        if self.mode is not Mode.NONE:
            self._changed.add(block)

    def write(self, first: int, data: Sequence[bytes]) -> None:
        """Write ``len(data)`` blocks from ``first``; a zero-length write is not tracked."""
        self._check_range(first, len(data))
        self.log.append(("write", first, tuple(data)))
        for i, content in enumerate(data):
            self._track(first + i)
            self.device[first + i] = content

    def zero_out(self, first: int, count: int) -> None:
        """Write-zeroes of ``count`` blocks: a tracked write of ``ZEROES``."""
        self._check_range(first, count)
        self.log.append(("zero-out", first, count))
        for block in range(first, first + count):
            self._track(block)
            self.device[block] = ZEROES

    def discard(self, first: int, count: int, result: Sequence[Content] | None = None) -> None:
        """Discard blocks. Without ``result`` their content becomes unknown and uncertain; with it
        (what the device reads right after the discard) a changed block is tracked like a write and
        an unchanged one may or may not be marked (see the module docstring)."""
        self._check_range(first, count)
        if result is not None and len(result) != count:
            raise ValueError(f"discard of {count} blocks observed {len(result)} results")
        self.log.append(("discard", first, count) if result is None else ("discard", first, tuple(result)))
        for i, block in enumerate(range(first, first + count)):
            if result is None:
                self.device[block] = None
                if self.mode is not Mode.NONE:
                    self._uncertain.add(block)
            elif result[i] != self.device[block]:
                self._track(block)
                self.device[block] = result[i]
            elif self.mode is not Mode.NONE and block not in self._changed:
                self._maybe.add(block)

    # -- tracer transitions ----------------------------------------------------------------------

    def _require(self, mode: Mode, op: str) -> None:
        if self.mode is not mode:
            raise ModelError(f"{op} needs mode {mode.value}, the tracer is in mode {self.mode.value}")

    def setup_snapshot(self) -> None:
        self._require(Mode.NONE, "setup-snapshot")
        self.log.append(("setup-snapshot",))
        self._series += 1
        self.mode, self.seqid, self.uuid = Mode.SNAPSHOT, 1, self._series
        self._new_file()

    def _new_file(self) -> None:
        self._saved, self._changed, self._uncertain, self._maybe = {}, set(), set(), set()
        self._image = list(self.device)

    def transition_to_incremental(self) -> None:
        """Drop the snapshot, keep the COW file (index only): marks, seqid and count carry over."""
        self._require(Mode.SNAPSHOT, "transition-to-incremental")
        self.log.append(("transition-to-incremental",))
        self.mode = Mode.INCREMENTAL
        self._saved = {}

    def transition_to_snapshot(self) -> Period:
        """Take the next snapshot; the old COW file is closed as the change list of the period."""
        self._require(Mode.INCREMENTAL, "transition-to-snapshot")
        self.log.append(("transition-to-snapshot",))
        period = Period(
            seqid=self.seqid,
            uuid=self.uuid,
            changed=frozenset(self._changed),
            nr_changed_blocks=self.nr_changed_blocks,
            uncertain=frozenset(self._uncertain),
            image_before=tuple(self._image),
            image_after=tuple(self.device),
            maybe_changed=frozenset(self._maybe - self._changed),
        )
        self.periods.append(period)
        self.mode = Mode.SNAPSHOT
        self.seqid += 1
        self._new_file()
        return period

    def destroy(self) -> None:
        if self.mode is Mode.NONE:
            raise ModelError("destroy: no tracer")
        self.log.append(("destroy",))
        self.mode, self.seqid, self.uuid = Mode.NONE, 0, 0
        self._saved, self._changed, self._uncertain, self._maybe, self._image = {}, set(), set(), set(), []

    def power_cut(self) -> None:
        """The machine lost power: the tracer is gone (its COW file is dirty and a reload of it is
        refused); the device keeps every completed write."""
        self.log.append(("power-cut",))
        self.mode, self.seqid, self.uuid = Mode.NONE, 0, 0
        self._saved, self._changed, self._uncertain, self._maybe, self._image = {}, set(), set(), set(), []

    # -- predictions -----------------------------------------------------------------------------

    @property
    def changed(self) -> frozenset[int]:
        """Blocks marked in the open COW file."""
        return frozenset(self._changed)

    @property
    def nr_changed_blocks(self) -> int:
        """Entries that went from 0 to non-zero in the open COW file (spec §4.2)."""
        return len(self._changed)

    @property
    def maybe_changed(self) -> frozenset[int]:
        """Blocks the open COW file may mark although they are not required: observed discards that
        changed nothing (unless a write marked them too)."""
        return frozenset(self._maybe - self._changed)

    @property
    def uncertain(self) -> frozenset[int]:
        """Blocks discarded while tracked: their snapshot/update-img content is unpredictable."""
        return frozenset(self._uncertain)

    @property
    def base_image(self) -> tuple[Content, ...]:
        """The device content when the snapshot of the open COW file was taken (both active modes)."""
        if self.mode is Mode.NONE:
            raise ModelError("base_image: no tracer")
        return tuple(self._image)

    @property
    def snapshot_image(self) -> tuple[Content, ...]:
        """The device content when the current snapshot was taken."""
        self._require(Mode.SNAPSHOT, "snapshot_image")
        return tuple(self._image)

    def snapshot_view(self) -> list[Content]:
        """What /dev/dattoN reads now: saved data for written blocks, the live device otherwise."""
        self._require(Mode.SNAPSHOT, "snapshot_view")
        return [self._saved[b] if b in self._saved else self.device[b] for b in range(self.nblocks)]

    def saved_blocks(self) -> dict[int, Content]:
        """Snapshot mode: block -> the data its COW entry must point at."""
        self._require(Mode.SNAPSHOT, "saved_blocks")
        return dict(self._saved)
