"""The model's own invariants under random operation sequences (Hypothesis state machine).

An independent "backup" is kept the way a user of the driver keeps one: a full copy of the first
snapshot, then update-img (apply the period's changed set from the new snapshot) at every
transition-to-snapshot. It must always equal the current snapshot, outside discarded blocks.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.model import ZEROES, Content, DeviceModel, Mode, ModelError, Period, blocks_of_sectors

NBLOCKS = 24


def _equal_outside(a: list[Content], b: list[Content], uncertain: set[int]) -> list[int]:
    return [i for i in range(len(a)) if i not in uncertain and a[i] != b[i]]


class ModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = DeviceModel(NBLOCKS)
        self.counter = 0
        self.written: set[int] = set()  # blocks written since the open COW file was created
        self.backup: list[Content] | None = None
        self.backup_uncertain: set[int] = set()
        self.last_seqid = 0

    @initialize(data=st.lists(st.binary(max_size=2), min_size=NBLOCKS, max_size=NBLOCKS))
    def initial_content(self, data: list[bytes]) -> None:
        self.m = DeviceModel(NBLOCKS, device=list(data))

    # -- I/O ---------------------------------------------------------------------------------------

    @rule(first=st.integers(0, NBLOCKS - 1), count=st.integers(0, 5), rewrite_same=st.booleans())
    def write(self, first: int, count: int, rewrite_same: bool) -> None:
        count = min(count, NBLOCKS - first)
        if rewrite_same and all(self.m.device[first + i] is not None for i in range(count)):
            data = [self.m.device[first + i] or b"" for i in range(count)]  # over-marking: same data
        else:
            data = []
            for _ in range(count):
                self.counter += 1
                data.append(b"w%d" % self.counter)
        self.m.write(first, data)
        if self.m.mode is not Mode.NONE:
            self.written.update(range(first, first + count))

    @rule(first=st.integers(0, NBLOCKS - 1), count=st.integers(1, 3))
    def discard(self, first: int, count: int) -> None:
        count = min(count, NBLOCKS - first)
        self.m.discard(first, count)
        if self.m.mode is not Mode.NONE:
            self.backup_uncertain.update(range(first, first + count))

    @rule(first=st.integers(0, NBLOCKS - 1), zeroes=st.lists(st.booleans(), min_size=1, max_size=3))
    def observed_discard(self, first: int, zeroes: list[bool]) -> None:
        """A discard whose result was read back: each block reads zeros or keeps its data."""
        count = min(len(zeroes), NBLOCKS - first)
        result = [ZEROES if zeroes[i] else self.m.device[first + i] for i in range(count)]
        changed = {first + i for i in range(count) if result[i] != self.m.device[first + i]}
        self.m.discard(first, count, result=result)
        if self.m.mode is not Mode.NONE:
            self.written.update(changed)
            assert changed <= self.m.changed
            assert set(range(first, first + count)) <= self.m.changed | self.m.maybe_changed

    @rule(first=st.integers(0, NBLOCKS - 1), count=st.integers(1, 3))
    def zero_out(self, first: int, count: int) -> None:
        count = min(count, NBLOCKS - first)
        self.m.zero_out(first, count)
        if self.m.mode is not Mode.NONE:
            self.written.update(range(first, first + count))

    @rule(first=st.integers(-1, NBLOCKS), count=st.integers(1, 3))
    def out_of_range_io_is_rejected(self, first: int, count: int) -> None:
        if first >= 0 and first + count <= NBLOCKS:
            return
        before = list(self.m.device)
        with pytest.raises(ValueError):
            self.m.write(first, [b"x"] * count)
        assert self.m.device == before

    # -- transitions -------------------------------------------------------------------------------

    @precondition(lambda self: self.m.mode is Mode.NONE)
    @rule()
    def setup_snapshot(self) -> None:
        self.m.setup_snapshot()
        assert (self.m.seqid, self.m.nr_changed_blocks) == (1, 0)
        self.last_seqid = 1
        self.written = set()
        self.backup = list(self.m.snapshot_image)  # the initial full copy (dd of /dev/datto0)
        self.backup_uncertain = set()

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule()
    def transition_to_incremental(self) -> None:
        changed, nr, seqid, uuid = self.m.changed, self.m.nr_changed_blocks, self.m.seqid, self.m.uuid
        self.m.transition_to_incremental()
        assert (self.m.changed, self.m.nr_changed_blocks, self.m.seqid, self.m.uuid) == (
            changed,
            nr,
            seqid,
            uuid,
        )

    @precondition(lambda self: self.m.mode is Mode.INCREMENTAL)
    @rule()
    def transition_to_snapshot(self) -> None:
        uuid = self.m.uuid
        period = self.m.transition_to_snapshot()
        self._check_period(period)
        assert self.m.seqid == period.seqid + 1 == self.last_seqid + 1
        assert self.m.uuid == uuid
        assert self.m.nr_changed_blocks == 0
        self.last_seqid = self.m.seqid
        self.written = set()
        assert self.backup is not None
        self.backup = period.apply(self.backup)  # update-img

    def _check_period(self, period: Period) -> None:
        before, after = list(period.image_before), list(period.image_after)
        # The defining property: the old image plus the changed blocks of the new snapshot is the new image.
        assert _equal_outside(period.apply(before), after, set(period.uncertain)) == []
        # Completeness: every block whose content differs is marked (unless discarded).
        differing = {b for b in range(NBLOCKS) if before[b] != after[b]} - period.uncertain
        assert differing <= period.changed
        # Precision: only written blocks are marked.
        assert period.changed <= self.written
        assert period.nr_changed_blocks == len(period.changed)

    @precondition(lambda self: self.m.mode is not Mode.NONE)
    @rule()
    def destroy(self) -> None:
        self.m.destroy()
        assert (self.m.seqid, self.m.nr_changed_blocks, self.m.changed) == (0, 0, frozenset())
        self.backup = None

    @rule(op=st.sampled_from(["setup", "to-inc", "to-snap", "destroy"]))
    def invalid_transitions_are_refused(self, op: str) -> None:
        valid = {
            "setup": Mode.NONE,
            "to-inc": Mode.SNAPSHOT,
            "to-snap": Mode.INCREMENTAL,
            "destroy": self.m.mode if self.m.mode is not Mode.NONE else None,
        }[op]
        if valid is self.m.mode:
            return
        action = {
            "setup": self.m.setup_snapshot,
            "to-inc": self.m.transition_to_incremental,
            "to-snap": self.m.transition_to_snapshot,
            "destroy": self.m.destroy,
        }[op]
        mode, seqid, changed = self.m.mode, self.m.seqid, self.m.changed
        with pytest.raises(ModelError):
            action()
        assert (self.m.mode, self.m.seqid, self.m.changed) == (mode, seqid, changed)

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def count_matches_marks(self) -> None:
        assert self.m.nr_changed_blocks == len(self.m.changed)
        assert self.m.changed <= self.written or self.m.mode is Mode.NONE

    @invariant()
    def snapshot_is_stable(self) -> None:
        if self.m.mode is not Mode.SNAPSHOT:
            return
        view, image = self.m.snapshot_view(), list(self.m.snapshot_image)
        assert _equal_outside(view, image, set(self.m.uncertain)) == []
        # Saved data exists exactly for the blocks written since the snapshot.
        assert set(self.m.saved_blocks()) == set(self.m.changed)

    @invariant()
    def changes_since_the_snapshot_are_marked(self) -> None:
        if self.m.mode is Mode.NONE:
            return
        base = self.m.base_image
        differing = {b for b in range(NBLOCKS) if base[b] != self.m.device[b]} - self.m.uncertain
        assert differing <= self.m.changed

    @invariant()
    def backup_chain_equals_the_snapshot(self) -> None:
        if self.m.mode is not Mode.SNAPSHOT or self.backup is None:
            return
        assert _equal_outside(self.backup, list(self.m.snapshot_image), self.backup_uncertain) == []


TestModel = ModelMachine.TestCase


def test_blocks_of_sectors_widens_to_whole_blocks() -> None:
    assert list(blocks_of_sectors(0, 8)) == [0]
    assert list(blocks_of_sectors(7, 2)) == [0, 1]
    assert list(blocks_of_sectors(8, 1)) == [1]
    assert list(blocks_of_sectors(3, 0)) == []
    assert list(blocks_of_sectors(5, 20)) == [0, 1, 2, 3]


def test_copy_on_write_keeps_the_first_original() -> None:
    m = DeviceModel(4)
    m.setup_snapshot()
    m.write(1, [b"a"])
    m.write(1, [b"b"])
    assert m.snapshot_view()[1] == b"init:1"
    assert m.device[1] == b"b"
    assert m.saved_blocks() == {1: b"init:1"}
    assert m.nr_changed_blocks == 1


def test_discard_is_untracked_and_uncertain() -> None:
    m = DeviceModel(4)
    m.setup_snapshot()
    m.discard(2, 1)
    assert m.changed == frozenset()
    assert m.uncertain == {2}
    assert m.snapshot_view()[2] is None


def test_zero_out_is_a_tracked_write() -> None:
    m = DeviceModel(4)
    m.setup_snapshot()
    m.zero_out(1, 2)
    assert m.device[1:3] == [ZEROES, ZEROES]
    assert m.snapshot_view()[1:3] == [b"init:1", b"init:2"]
    assert m.changed == {1, 2}


def test_observed_discard_tracks_changes_and_allows_marks_elsewhere() -> None:
    m = DeviceModel(4)
    m.setup_snapshot()
    m.discard(0, 2, result=[b"init:0", ZEROES])  # block 0 kept its data, block 1 reads zeros
    assert m.snapshot_view()[:2] == [b"init:0", b"init:1"]
    assert m.device[:2] == [b"init:0", ZEROES]
    assert (m.changed, m.maybe_changed, m.uncertain) == ({1}, {0}, frozenset())
    m.transition_to_incremental()
    m.write(0, [b"w"])  # a later write makes the mark required
    m.discard(3, 1, result=[b"init:3"])
    assert (m.changed, m.maybe_changed) == ({0, 1}, {3})
    period = m.transition_to_snapshot()
    assert (period.changed, period.maybe_changed) == ({0, 1}, {3})
    assert period.apply(list(period.image_before)) == list(period.image_after)
    assert m.maybe_changed == frozenset()
    with pytest.raises(ValueError):
        m.discard(0, 2, result=[None])


def test_power_cut_drops_the_tracer_and_keeps_the_device() -> None:
    m = DeviceModel(4)
    m.setup_snapshot()
    m.write(0, [b"a"])
    m.power_cut()
    assert (m.mode, m.seqid, m.changed, m.device[0]) == (Mode.NONE, 0, frozenset(), b"a")


def test_period_records_the_change_list() -> None:
    m = DeviceModel(8)
    m.setup_snapshot()
    m.write(0, [b"x"])
    m.transition_to_incremental()
    m.write(5, [b"y", b"z"])
    m.write(0, [])  # zero-length: not tracked
    period = m.transition_to_snapshot()
    assert (period.seqid, m.seqid) == (1, 2)
    assert period.changed == {0, 5, 6}
    assert period.nr_changed_blocks == 3
    assert period.apply(list(period.image_before)) == list(period.image_after)
    assert m.log[0] == ("setup-snapshot",)
