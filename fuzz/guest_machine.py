"""The consistency state machine: Hypothesis drives a real dattobd in a long-lived QEMU guest and
fuzz.model.DeviceModel predicts what must hold after every step.

The model's device is the *arena*: a file on the tracked ext4 whose physical blocks (FIEMAP) the
guest agent (guestlib/agent.py) writes raw, beside the filesystem, with O_DIRECT. Rules: raw writes
of fresh or unchanged content; raw discards (BLKDISCARD) and write-zeroes (BLKZEROOUT, fallocate
PUNCH_HOLE or ZERO_RANGE on the block device) of arena blocks; filesystem activity elsewhere on the
volume (file writes, appends, truncates that shrink or grow, deletes, renames, fallocate, punched
holes, zeroed ranges, fsync, sync); setup-snapshot (optionally with a backup image), a backup image
of the current snapshot, transition-to-incremental, transition-to-snapshot with a new COW file,
destroy, reconfigure, expand-cow-file, unmount + mount (dormancy and reactivation, with raw writes
while unmounted), reload without a reboot (unmount, destroy of the dormant tracer, reload of its
clean COW file, mount), every transition in a state where the driver must refuse it, and, rarely
(Env.boot_one_in, at most one per example, only with a tracer), a clean reboot or a power cut.

Invariants after every step: the tracer's info (existence, state, seqid, no error); the origin's
arena blocks are the model's device; in snapshot mode /dev/dattoN reads the model's snapshot view
of every arena block. At each transition-to-snapshot the closed COW file's index is parsed: the
arena blocks it marks are exactly the model's changed set (blocks a discard left unchanged may be
marked too), and its header carries the seqid; if a backup image of the previous snapshot exists,
update-img (pydbd.updateimg, run in the agent) applies the closed COW file to it and the image's
arena blocks must then equal the new snapshot. (Only the arena: the rest of a whole image would
differ legitimately where the COW files' own untracked writes went.)

Discards: what the device reads after a BLKDISCARD depends on the device and the driver (ours drops
discards during a snapshot; the data disk, raw with discard=unmap, reads zeros where one reaches
it). The agent reads the blocks back right after the discard and the model takes that as their new
content (fuzz.model, "observed" discards): a block whose content changed must have been copied
before (snapshot unchanged) and be marked; one that did not change may or may not be marked. So the
oracle stays strict (every later check knows the exact content) and sound for any device.
Write-zeroes has a defined result (zeros) and is modelled as a tracked write.

Boots: a clean reboot (Guest.reboot: the volume is unmounted, the tracer goes dormant with a clean
COW file) is followed by reload-snapshot/reload-incremental before the volume's mount, which must
bring the tracer back (unverified state 5/4 first, then 3/2) with the same seqid, change list and
snapshot. A power cut (QMP system_reset) keeps every completed O_DIRECT write (the model's device);
the reload of the COW file left dirty must be refused at the mount (state 5/4, error -EINVAL) and
the tracer is destroyed: the model has no tracer afterwards. The agent is restarted after a boot.

Steps run through one agent process per guest, so an example costs seconds, not a boot (except the
rare boot steps). Each example starts from a clean slate (no tracer, arena rewritten to its initial
content), then possibly sets up a snapshot with a backup and goes incremental (recorded as steps).
A failing example is shrunk by Hypothesis and exported as a standalone pytest file under
tests/regressions/ (see export_regression) that replays the same steps on any `--kernel`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import pprint
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fuzz.model import ZEROES, Content, DeviceModel, Mode
from guestlib.cowchain import CHAIN  # the COW files whose extents the oracles exempt
from harness.oracles import SPURIOUS_BOUND

ARENA_BLOCKS = 48
MINOR = 0
AGENT_DIR = "/run/dbd-agent"
COW_MIB = 8
DISK_MIB = 256  # the data disk of tests/guest/test_consistency_fuzz.py and the regressions
REPO = Path(__file__).resolve().parent.parent
REGRESSIONS_DIR = REPO / "tests" / "regressions"
IMAGE = "/var/tmp/dbd-fuzz.img"  # the backup image: on the guest's root disk, not the tracked volume
# State values of the info ioctl (spec §2.1): active snapshot, active incremental; unverified ones.
STATE_OF_MODE = {Mode.SNAPSHOT: 3, Mode.INCREMENTAL: 2}
UNVERIFIED_STATE_OF_MODE = {Mode.SNAPSHOT: 5, Mode.INCREMENTAL: 4}
# Boots after a reset have spent 25-105 s in the kernel's early init under TCG on a busy host (see
# EARLY_BOOT_LOCKUP): more than the harness's default boot timeout (120 s).
BOOT_TIMEOUT = 300.0
# A soft lockup of PID 1 before userspace: the kernel's own early boot starved of host CPU (TCG on a
# busy host, seen freeing init memory after a reboot); the module is not loaded yet.
EARLY_BOOT_LOCKUP = r"soft lockup - CPU#\d+ stuck for \d+s! \[swapper/\d+:1\]"
OBSERVED = b"digest:"  # model content read back after a discard: b"digest:" + its digest
ZERO_TOKEN = ZEROES.decode()  # guestlib.agent.ZERO_TOKEN
# How zero_out reaches the device (guestlib.agent.TRIM_IOCTLS / TRIM_FALLOCATE).
ZERO_HOWS = ["zeroout", "punch_hole", "zero_range"]


class GuestLike(Protocol):
    def run(self, cmd: str, timeout: float = ...) -> Any: ...


class RebootableGuest(GuestLike, Protocol):
    """What the boot rules need besides `run` (harness.guest.Guest has all three)."""

    def reboot(self, wait: bool = ..., timeout: float = ...) -> None: ...

    def power_cut(self, wait: bool = ..., timeout: float = ...) -> None: ...

    def load_module(self) -> Any: ...


class AgentCallError(AssertionError):
    """The agent could not run a step (not a property violation of the driver, but still a failure)."""


@functools.lru_cache(maxsize=65536)
def token_digest(token: str) -> str:
    """Digest of the 4 KiB block a token stands for (the same function as guestlib.agent's)."""
    if token == ZERO_TOKEN:
        return hashlib.sha256(bytes(4096)).hexdigest()[:16]
    seed = hashlib.sha256(token.encode()).digest()
    return hashlib.sha256((seed * (4096 // len(seed)))[:4096]).hexdigest()[:16]


def content_digest(content: Content) -> str:
    """Digest of a model block: a token, ZEROES, or content observed after a discard."""
    if content is not None and content.startswith(OBSERVED):
        return content[len(OBSERVED) :].decode()
    return token_digest((content or b"").decode())


def observed_content(current: Content, digest: str) -> Content:
    """The model content for a block the device now reads as `digest` (it was `current`)."""
    if digest == content_digest(current):
        return current
    if digest == token_digest(ZERO_TOKEN):
        return ZEROES
    return OBSERVED + digest.encode()


class AgentClient:
    """Host side of guestlib/agent.py: one request line in, one reply line out, through two FIFOs."""

    def __init__(self, guest: GuestLike) -> None:
        self.guest = guest
        self.calls = 0

    def start(self) -> None:
        d = AGENT_DIR
        r = self.guest.run(
            f"mkdir -p {d} && (cd / && PYTHONPATH=/src setsid python3 -m guestlib agent {d} "
            f"</dev/null >{d}.log 2>&1 &) && "
            f"for i in $(seq 200); do [ -p {d}/out ] && [ -s {d}/pid ] && exit 0; sleep 0.1; done; "
            f"cat {d}.log; exit 1",
            timeout=60,
        )
        if r.rc != 0:
            raise AgentCallError(f"the guest agent did not start: {r.stdout} {r.stderr}")

    def call(self, op: str, timeout: float = 300, **kwargs: Any) -> Any:
        line = json.dumps({"op": op, **kwargs})
        r = self.guest.run(
            f"printf '%s\\n' {shlex.quote(line)} > {AGENT_DIR}/in && cat {AGENT_DIR}/out", timeout=timeout
        )
        self.calls += 1
        if r.rc != 0 or not r.stdout.strip():
            raise AgentCallError(f"agent {op}: no reply (rc {r.rc}): {r.stderr.strip()}")
        reply = json.loads(r.stdout.strip().splitlines()[-1])
        if not reply.get("ok"):
            raise AgentCallError(f"agent {op} {kwargs}: {reply.get('error')}")
        return reply.get("result")

    def sh(self, cmd: str) -> dict[str, Any]:
        out = self.call("sh", cmd=cmd)
        assert isinstance(out, dict)
        return out

    def check_sh(self, cmd: str) -> str:
        out = self.sh(cmd)
        if out["rc"] != 0:
            raise AgentCallError(f"{cmd!r} failed (rc {out['rc']}): {out['err'].strip()}")
        return str(out["out"])


@dataclass
class Env:
    """The guest-side facts a machine needs; made once per guest by `prepare`."""

    client: AgentClient
    device: str  # the tracked block device, e.g. /dev/vdb
    mountpoint: str
    device_sectors: int
    snapdev: str = f"/dev/datto{MINOR}"
    arena: list[int] = field(default_factory=list)  # device 4 KiB blocks of the arena
    # Boot rules (clean reboot, power cut): 0 = never; N = in about one example out of N (at most
    # one boot per example). They need a guest with reboot/power_cut/load_module.
    boot_one_in: int = 0
    trace: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # steps of the last example
    examples: int = 0
    steps: int = 0
    boots: int = 0
    small_caches: int = 0  # setups and reconfigures with room for at most one index section
    precision_checks: int = 0  # closed COW files checked over the whole device (change_list_traced)
    most_spurious: int = 0  # the most marked blocks one of them had beyond what was traced

    @property
    def guest(self) -> RebootableGuest:
        g = self.client.guest
        assert hasattr(g, "reboot"), "the boot rules need a guest that can reboot"
        return g  # type: ignore[return-value]


def prepare(guest: GuestLike, device: str, mountpoint: str, *, boot_one_in: int = 0) -> Env:
    """Start the agent and lay out the arena on the mounted filesystem at mountpoint."""
    client = AgentClient(guest)
    client.start()
    sectors = int(client.check_sh(f"blockdev --getsz {device}").strip())
    arena = client.call("arena", path=f"{mountpoint}/arena", device=device, blocks=ARENA_BLOCKS)
    return Env(client, device, mountpoint, sectors, arena=arena, boot_one_in=boot_one_in)


class ConsistencyMachine(RuleBasedStateMachine):
    env: ClassVar[Env | None] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.env is not None, "ConsistencyMachine.env is set by run_campaign/replay"
        self.e: Env = self.env
        self.c = self.e.client
        self.m = DeviceModel(ARENA_BLOCKS, device=[f"init:{i}".encode() for i in range(ARENA_BLOCKS)])
        self.counter = 0
        self.cow_n = 0
        self.cow: str | None = None
        self.image_seqid: int | None = None  # the backup image equals the snapshot of this seqid
        self.may_boot = False  # drawn per example by reset (Env.boot_one_in)
        self.booted = False  # at most one boot per example
        # The current period began at a marker in this boot's block trace (guestlib.discards), so
        # the precision oracle can judge its change list over the whole device.
        self.period_traced = False
        self.e.trace = []
        self.e.examples += 1

    def _step(self, name: str, **kwargs: Any) -> None:
        self.e.trace.append((name, kwargs))
        self.e.steps += 1

    def _count_cache(self, cache_bytes: int) -> None:
        if 0 < cache_bytes <= 64 << 10:
            self.e.small_caches += 1

    def _cow_path(self) -> str:
        self.cow_n += 1
        return f"{self.e.mountpoint}/cow-{self.cow_n}"

    def _ctl(self, method: str, *args: Any) -> int:
        rc = self.c.call("ctl", method=method, args=list(args))
        assert isinstance(rc, int)
        return rc

    # -- a clean slate per example ------------------------------------------------------------
    # The first choice of a strategy is what the examples Hypothesis tries first (the short
    # derandomized CI round: 4 examples on every kernel) and shrinks to: a snapshot with a
    # 1-byte cache, which holds no index section (spec 4.6), so that write-back and read-back run in
    # every round. 0 (the default cache) is what every other guest test uses.
    @initialize(
        start=st.sampled_from(["snapshot", "incremental", "none"]),
        boot_draw=st.integers(0, 1 << 16),
        cache_bytes=st.sampled_from([1, 0]),
    )
    def reset(self, start: str = "none", boot_draw: int = 1, cache_bytes: int = 0) -> None:
        """No tracer, the arena at its initial content; then (`start`) set up a snapshot with a
        backup, and go incremental: as recorded steps, so that replays need no arguments here."""
        e = self.e
        # Hypothesis favours 0 and boundary values: a seeded draw makes "one in N" hold.
        self.may_boot = e.boot_one_in > 0 and random.Random(boot_draw).randrange(e.boot_one_in) == 0
        if self.c.call("info", minor=MINOR) is not None:
            self._ctl("destroy", MINOR)
        self.c.check_sh(
            f"mountpoint -q {e.mountpoint} || mount {e.device} {e.mountpoint}; "
            f"rm -f {e.mountpoint}/cow-* {IMAGE} {CHAIN}; rm -rf {e.mountpoint}/files; sync"
        )
        self.c.call(
            "write", blocks=list(range(ARENA_BLOCKS)), tokens=[f"init:{i}" for i in range(ARENA_BLOCKS)]
        )
        if start != "none":
            self.setup_snapshot(cache_bytes=cache_bytes, backup=True)
        if start == "incremental":
            self.transition_to_incremental()

    # -- I/O ------------------------------------------------------------------------------------
    def _write(self, first: int, count: int, same: bool = False) -> None:
        count = min(count, ARENA_BLOCKS - first)
        if same:
            tokens = []
            for i in range(count):
                content = self.m.device[first + i] or b""
                if content.startswith(OBSERVED):
                    break  # read back after a discard: not a content a write can reproduce
                tokens.append(content.decode())
            count = len(tokens)
        else:
            tokens = []
            for _ in range(count):
                self.counter += 1
                tokens.append(f"w{self.counter}")
        self.c.call("write", blocks=list(range(first, first + count)), tokens=tokens)
        self.m.write(first, [t.encode() for t in tokens])

    @rule(first=st.integers(0, ARENA_BLOCKS - 1), count=st.integers(1, 8))
    def write(self, first: int, count: int) -> None:
        self._step("write", first=first, count=count)
        self._write(first, count)

    @rule(first=st.integers(0, ARENA_BLOCKS - 1), count=st.integers(1, 4))
    def rewrite_same_content(self, first: int, count: int) -> None:
        """A write that changes nothing must still be tracked (the tracer cannot know)."""
        self._step("rewrite_same_content", first=first, count=count)
        self._write(first, count, same=True)

    @rule(seed=st.integers(0, 2**16), count=st.integers(1, 6), fsync=st.booleans())
    def file_activity(self, seed: int, count: int, fsync: bool) -> None:
        self._step("file_activity", seed=seed, count=count, fsync=fsync)
        self.c.call("files", directory=f"{self.e.mountpoint}/files", seed=seed, count=count, fsync=fsync)

    @rule()
    def sync(self) -> None:
        self._step("sync")
        self.c.check_sh("sync")

    def _observe(self, first: int, digests: list[str]) -> list[Content]:
        return [observed_content(self.m.device[first + i], d) for i, d in enumerate(digests)]

    @rule(first=st.integers(0, ARENA_BLOCKS - 1), count=st.integers(1, 8))
    def discard(self, first: int, count: int) -> None:
        """BLKDISCARD of arena blocks beside the filesystem. What the device then reads is read back
        (the origin may keep the data or read zeros): a block that changed must have been copied
        first in snapshot mode and be marked; one that did not may be marked (fuzz.model)."""
        self._step("discard", first=first, count=count)
        count = min(count, ARENA_BLOCKS - first)
        got = self.c.call("trim", blocks=list(range(first, first + count)), how="discard")
        self.m.discard(first, count, result=self._observe(first, got["digests"]))

    @rule(first=st.integers(0, ARENA_BLOCKS - 1), count=st.integers(1, 8), how=st.sampled_from(ZERO_HOWS))
    def zero_out(self, first: int, count: int, how: str) -> None:
        """Write-zeroes of arena blocks (BLKZEROOUT, or fallocate PUNCH_HOLE / ZERO_RANGE on the
        device): defined zeros, tracked like a data write. If the device refuses it, whatever it
        did is read back and modelled like a discard."""
        self._step("zero_out", first=first, count=count, how=how)
        count = min(count, ARENA_BLOCKS - first)
        got = self.c.call("trim", blocks=list(range(first, first + count)), how=how)
        if got["errno"] == 0:
            self.m.zero_out(first, count)
        else:
            self.m.discard(first, count, result=self._observe(first, got["digests"]))

    # -- tracer transitions -----------------------------------------------------------------------
    @precondition(lambda self: self.m.mode is Mode.NONE)
    # Cache sizes in bytes: 1 and 64 KiB leave room for no index section and one (spec 4.6), so
    # sections are written back and read again all the time; 0 is the default. 1 first: see reset.
    @rule(cache_bytes=st.sampled_from([1, 0, 1 << 20, 4 << 20]), backup=st.booleans())
    def setup_snapshot(self, cache_bytes: int, backup: bool = False) -> None:
        self._step("setup_snapshot", cache_bytes=cache_bytes, backup=backup)
        self._count_cache(cache_bytes)
        self.cow = self._cow_path()
        self.c.call("trace_mark", taken=False)
        rc = self._ctl("setup_snapshot", self.e.device, self.cow, MINOR, COW_MIB, cache_bytes)
        if rc == 0:
            self.c.call("trace_mark", taken=True)
            self.period_traced = True
        assert rc == 0, f"setup-snapshot failed with errno {rc} ({errno.errorcode.get(rc)})"
        self.m.setup_snapshot()
        if backup:
            self._backup()

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule()
    def transition_to_incremental(self) -> None:
        self._step("transition_to_incremental")
        rc = self._ctl("transition_to_incremental", MINOR)
        assert rc == 0, f"transition-to-incremental failed with errno {rc}"
        self.m.transition_to_incremental()

    @precondition(lambda self: self.m.mode is Mode.INCREMENTAL)
    @rule(delete_old=st.booleans())
    def transition_to_snapshot(self, delete_old: bool) -> None:
        self._step("transition_to_snapshot", delete_old=delete_old)
        old, self.cow = self.cow, self._cow_path()
        traced, self.period_traced = self.period_traced, False
        self.c.call("trace_mark", taken=False)
        rc = self._ctl("transition_to_snapshot", self.cow, MINOR, COW_MIB)
        assert rc == 0, f"transition-to-snapshot failed with errno {rc}"
        self.c.call("trace_mark", taken=True)
        self.period_traced = True
        period = self.m.transition_to_snapshot()
        got = self.c.call("cow_index", path=old, device_sectors=self.e.device_sectors)
        want = sorted(period.changed)
        missing = sorted(set(want) - set(got["marked"]))
        extra = sorted(set(got["marked"]) - set(want) - period.maybe_changed)
        assert not missing, f"closed COW file {old} misses changed arena blocks {missing}"
        assert not extra, f"closed COW file {old} marks arena blocks nobody wrote: {extra}"
        assert got["seqid"] == period.seqid, f"{old}: seqid {got['seqid']}, expected {period.seqid}"
        assert got["nr_changed"] >= len(want), f"{old}: nr_changed_blocks {got['nr_changed']} < {len(want)}"
        if traced:  # the whole device: the arena check above is exact, this bounds everything else
            precision = self.c.call("change_list_traced", cow=old, max_spurious=SPURIOUS_BOUND)
            assert precision["ok"], f"closed COW file {old}: {precision['message']}"
            self.e.precision_checks += 1
            self.e.most_spurious = max(self.e.most_spurious, precision["details"]["spurious"])
        if self.image_seqid == period.seqid:
            assert old is not None
            self._update_image(old)
        if delete_old:
            self.c.check_sh(f"rm -f {shlex.quote(str(old))}")

    def _update_image(self, old_cow: str) -> None:
        """update-img with the closed COW file: the image must become the new snapshot."""
        r = self.c.call("update_img", snapshot=self.e.snapdev, cow=old_cow, image=IMAGE)
        assert r["rc"] == 0, f"update-img {old_cow} failed with {r['rc']}: {r['err'].strip()}"
        got = self.c.call("digests", path=IMAGE)
        view = [content_digest(c) for c in self.m.snapshot_view()]
        bad = [i for i, (a, b) in enumerate(zip(got, view, strict=True)) if a != b]
        assert not bad, (
            f"after update-img with {old_cow} the image's arena blocks {bad} differ from the snapshot"
        )
        self.image_seqid = self.m.seqid

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT and self.image_seqid != self.m.seqid)
    @rule()
    def backup(self) -> None:
        """A backup image of the snapshot (a sparse file of the device's size holding the arena's
        blocks: a full copy costs seconds); every later transition-to-snapshot applies the closed
        COW file to it with update-img."""
        self._step("backup")
        self._backup()

    def _backup(self) -> None:
        got = self.c.call("backup", source=self.e.snapdev, image=IMAGE, full=False)
        view = [content_digest(c) for c in self.m.snapshot_view()]
        bad = [i for i, (a, b) in enumerate(zip(got, view, strict=True)) if a != b]
        assert not bad, f"the backup of {self.e.snapdev} differs in arena blocks {bad}"
        self.image_seqid = self.m.seqid

    @precondition(lambda self: self.m.mode is not Mode.NONE)
    @rule()
    def destroy(self) -> None:
        self._step("destroy")
        rc = self._ctl("destroy", MINOR)
        assert rc == 0, f"destroy failed with errno {rc}"
        self.m.destroy()
        self.c.check_sh(f"rm -f {self.e.mountpoint}/cow-* {IMAGE}")
        self.cow = None
        self.image_seqid = None

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule(cache_bytes=st.sampled_from([1, 0, 64 << 10, 8 << 20]))
    def reconfigure(self, cache_bytes: int) -> None:
        self._step("reconfigure", cache_bytes=cache_bytes)
        self._count_cache(cache_bytes)
        assert self._ctl("reconfigure", MINOR, cache_bytes) == 0

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule(mib=st.integers(1, 4))
    def expand_cow_file(self, mib: int) -> None:
        self._step("expand_cow_file", mib=mib)
        assert self._ctl("expand_cow_file", MINOR, mib) == 0
        self.c.call("chain_record")  # the expansion's own writes lie in the file's new extents

    @rule(
        op=st.sampled_from(
            ["setup_snapshot", "transition_to_incremental", "transition_to_snapshot", "destroy"]
        )
    )
    def refused_transition(self, op: str) -> None:
        """A transition the current state does not allow: refused with a documented errno."""
        valid = {
            "setup_snapshot": Mode.NONE,
            "transition_to_incremental": Mode.SNAPSHOT,
            "transition_to_snapshot": Mode.INCREMENTAL,
        }
        if (op == "destroy" and self.m.mode is not Mode.NONE) or valid.get(op) is self.m.mode:
            return  # valid here: the rule above covers it
        self._step("refused_transition", op=op)
        cow = f"{self.e.mountpoint}/cow-refused"
        args: dict[str, tuple[Any, ...]] = {
            "setup_snapshot": (self.e.device, cow, MINOR, COW_MIB, 0),
            "transition_to_incremental": (MINOR,),
            "transition_to_snapshot": (cow, MINOR, COW_MIB),
            "destroy": (MINOR,),
        }
        rc = self._ctl(op, *args[op])
        allowed = {errno.EINVAL, errno.ENOENT, errno.EBUSY}
        assert rc in allowed, f"{op} in mode {self.m.mode.value}: errno {rc}, expected one of {allowed}"
        self.c.check_sh(f"rm -f {cow}")

    @precondition(lambda self: self.m.mode is not Mode.NONE)
    @rule(writes=st.lists(st.tuples(st.integers(0, ARENA_BLOCKS - 1), st.integers(1, 4)), max_size=2))
    def unmount_and_mount(self, writes: list[tuple[int, int]]) -> None:
        """Dormancy and reactivation; raw writes while unmounted are still tracked."""
        self._step("unmount_and_mount", writes=[list(w) for w in writes])
        mnt = self.e.mountpoint
        self.c.check_sh(f"umount {mnt}")
        info = self.c.call("info", minor=MINOR)
        assert info is not None and not info["state"] & 2, f"not dormant after umount: {info}"
        for first, count in writes:
            self._write(first, count)
        self.c.check_sh(f"mount {self.e.device} {mnt}")

    # -- boots (rare: see Env.boot_one_in) ---------------------------------------------------------
    def _boot(self, kind: str) -> None:
        """Reboot or cut the power, load the module, restart the agent; reload the tracer (if any)
        before the volume's mount, which activates it (clean) or fails it with -EINVAL (the COW
        file's header is dirty after a power cut, spec §4.4, §7)."""
        e, mode = self.e, self.m.mode
        self.booted = True
        self.period_traced = False  # the boot ends the trace
        watcher = getattr(e.guest, "watcher", None)  # harness.guest.Guest's console watcher
        expected = watcher.expect(EARLY_BOOT_LOCKUP) if watcher is not None else None
        try:
            if kind == "clean_reboot":
                e.guest.reboot(timeout=BOOT_TIMEOUT)
            else:
                e.guest.power_cut(timeout=BOOT_TIMEOUT)
        finally:
            if watcher is not None and expected is not None:
                watcher.end_expectation(expected)
        e.boots += 1
        e.guest.load_module()
        self.c.start()
        self._reload(mode)
        self.c.check_sh(f"mkdir -p {e.mountpoint} && mount {e.device} {e.mountpoint}")
        arena = self.c.call(
            "arena", path=f"{e.mountpoint}/arena", device=e.device, blocks=ARENA_BLOCKS, create=False
        )
        if arena != e.arena:
            raise AgentCallError(f"the arena file moved across the {kind}: {arena} != {e.arena}")
        if kind == "power_cut" and mode is not Mode.NONE:
            info = self.c.call("info", minor=MINOR)
            want = UNVERIFIED_STATE_OF_MODE[mode]
            assert info is not None and (info["state"], info["error"]) == (want, -errno.EINVAL), (
                f"a reload of the COW file left dirty by a power cut was not refused: {info}"
            )
            assert self._ctl("destroy", MINOR) == 0
            self.c.check_sh(f"rm -f {e.mountpoint}/cow-* {IMAGE}")
            self.cow, self.image_seqid = None, None
        if kind == "power_cut":
            self.m.power_cut()

    def _reload(self, mode: Mode) -> None:
        """reload-snapshot/reload-incremental of the current COW file: an unverified tracer (5/4)."""
        if mode is Mode.NONE:
            return
        e = self.e
        assert self.cow is not None and self.cow.startswith(e.mountpoint + "/")
        method = "reload_snapshot" if mode is Mode.SNAPSHOT else "reload_incremental"
        rc = self._ctl(method, e.device, self.cow[len(e.mountpoint) :], MINOR, 0)
        assert rc == 0, f"{method} failed with errno {rc}"
        info = self.c.call("info", minor=MINOR)
        want = UNVERIFIED_STATE_OF_MODE[mode]
        assert info is not None and (info["state"], info["error"]) == (want, 0), f"after {method}: {info}"

    @precondition(lambda self: self.m.mode is not Mode.NONE)
    @rule()
    def destroy_dormant_and_reload(self) -> None:
        """Reload without a reboot: unmount (dormant: the COW file is closed with a clean header),
        destroy the dormant tracer (the file is kept, doc/compat.md defect 18), reload the file and
        mount: the tracer must come back in the same mode with the same seqid, change list and
        snapshot, as after a clean reboot."""
        self._step("destroy_dormant_and_reload")
        mnt = self.e.mountpoint
        self.c.check_sh(f"umount {mnt}")
        info = self.c.call("info", minor=MINOR)
        assert info is not None and not info["state"] & 2, f"not dormant after umount: {info}"
        assert self._ctl("destroy", MINOR) == 0, "destroy of a dormant tracer failed"
        assert self.c.call("info", minor=MINOR) is None, "the tracer survived destroy"
        self._reload(self.m.mode)
        self.c.check_sh(f"mount {self.e.device} {mnt}")

    @precondition(lambda self: self.may_boot and not self.booted and self.m.mode is not Mode.NONE)
    @rule()
    def clean_reboot(self) -> None:
        """A clean reboot: the tracer comes back by reload in the same mode, seqid, change list and
        snapshot; every arena write survives."""
        self._step("clean_reboot")
        self._boot("clean_reboot")

    @precondition(lambda self: self.may_boot and not self.booted and self.m.mode is not Mode.NONE)
    @rule()
    def power_cut(self) -> None:
        """A power cut (QMP system_reset): every completed O_DIRECT write survives; the tracer's
        reload is refused (dirty COW file) and it is destroyed."""
        self._step("power_cut")
        self._boot("power_cut")

    # -- what must hold after every step ---------------------------------------------------------
    @invariant()
    def driver_matches_model(self) -> None:
        s = self.c.call("state", minor=MINOR, snapdev=self.e.snapdev)
        info = s["info"]
        if self.m.mode is Mode.NONE:
            assert info is None, f"a tracer exists on minor {MINOR} after destroy: {info}"
        else:
            assert info is not None, f"minor {MINOR} vanished in mode {self.m.mode.value}"
            assert info["error"] == 0, f"tracer failed with {info['error']}"
            assert info["state"] == STATE_OF_MODE[self.m.mode], (
                f"state {info['state']} in {self.m.mode.value}"
            )
            assert info["seqid"] == self.m.seqid, f"seqid {info['seqid']}, model {self.m.seqid}"
        want_origin = [content_digest(c) for c in self.m.device]
        bad = [i for i, (a, b) in enumerate(zip(s["origin"], want_origin, strict=True)) if a != b]
        assert not bad, f"origin arena blocks {bad} do not hold what was written"
        if self.m.mode is Mode.SNAPSHOT:
            assert s["snapshot"] is not None, f"{self.e.snapdev} missing in snapshot mode"
            view = [content_digest(c) for c in self.m.snapshot_view()]
            bad = [i for i, (a, b) in enumerate(zip(s["snapshot"], view, strict=True)) if a != b]
            assert not bad, f"{self.e.snapdev}: arena blocks {bad} differ from the snapshot's point in time"


def machine_settings(max_examples: int, steps: int, database_dir: Path | None, derandomize: bool) -> settings:
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=derandomize,
        database=DirectoryBasedExampleDatabase(str(database_dir)) if database_dir else None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        report_multiple_bugs=False,  # one shrunk example: the one export_regression writes
        # no "explain" phase: it replays the shrunk example many more times to annotate it
        phases=[p for p in Phase if p is not Phase.explain],
    )


@dataclass
class CampaignResult:
    examples: int
    steps: int
    seconds: float
    regression: Path | None = None

    def line(self) -> str:
        rate = 60.0 / self.seconds if self.seconds else 0.0
        return (
            f"consistency fuzzing: {self.examples} examples, {self.steps} steps in {self.seconds:.0f} s "
            f"({self.examples * rate:.1f} examples/min, {self.steps * rate:.0f} steps/min)"
        )


def run_campaign(
    env: Env,
    *,
    max_examples: int,
    steps: int = 25,
    database_dir: Path | None = None,
    derandomize: bool = True,
    kernel: str = "",
    export_dir: Path | None = None,
) -> CampaignResult:
    """Run the machine; on a failure export the shrunk example (export_dir) and re-raise."""
    ConsistencyMachine.env = env
    start = time.monotonic()
    try:
        run_state_machine_as_test(
            ConsistencyMachine, settings=machine_settings(max_examples, steps, database_dir, derandomize)
        )
    except BaseException as exc:
        if export_dir is not None and env.trace:
            path = export_regression(export_dir, env.trace, kernel, f"{type(exc).__name__}: {exc}")
            exc.add_note(f"shrunk example exported as {path} (replays with pytest {path} --kernel {kernel})")
        raise
    finally:
        ConsistencyMachine.env = None
    return CampaignResult(env.examples, env.steps, time.monotonic() - start)


def replay(env: Env, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run recorded steps one by one, checking the invariants after the reset and every step."""
    ConsistencyMachine.env = env
    try:
        m = ConsistencyMachine()
        m.reset()
        m.driver_matches_model()
        for name, kwargs in steps:
            args = {k: [tuple(x) for x in v] if k == "writes" else v for k, v in kwargs.items()}
            getattr(m, name)(**args)
            m.driver_matches_model()
    finally:
        ConsistencyMachine.env = None


def export_regression(
    directory: Path, trace: list[tuple[str, dict[str, Any]]], kernel: str, error: str
) -> Path:
    """Write <directory>/test_consistency_<digest>.py replaying `trace`; returns its path."""
    body = pprint.pformat([(name, kwargs) for name, kwargs in trace], width=100)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    path = directory / f"test_consistency_{digest}.py"
    quotes = '"' * 3
    first_error = (error.strip().splitlines() or ["(no message)"])[0][:300].replace(quotes, "'''")
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = f"found on {kernel or '?'}, {time.strftime('%Y-%m-%d')}"
    lines = [
        f"{quotes}Consistency-fuzzer finding, shrunk by Hypothesis ({found}).",
        "",
        f"It failed with: {first_error}",
        "",
        f"Replays on any kernel: pytest {shown} --kernel <target>",
        quotes,
        "",
        "from __future__ import annotations",
        "",
        "import pytest",
        "",
        "from fuzz.guest_machine import prepare, replay",
        "from harness.guest import Guest",
        "from harness.pytest_plugin import Volume",
        "from harness.qemu import DiskSpec",
        "",
        f"STEPS = {body}",
        "",
        "",
        f"@pytest.mark.guest_config(disks=[DiskSpec({DISK_MIB})])",
        "def test_replay(module_guest: Guest, ext4_volume: Volume) -> None:",
        "    env = prepare(module_guest, ext4_volume.device, ext4_volume.mountpoint)",
        "    replay(env, [(name, kwargs) for name, kwargs in STEPS])",
        "",
    ]
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def steps_text(trace: list[tuple[str, dict[str, Any]]]) -> str:
    return "\n".join(
        f"{n:3}. {name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
        for n, (name, kw) in enumerate(trace, 1)
    )


__all__ = [
    "AgentClient",
    "CampaignResult",
    "ConsistencyMachine",
    "Env",
    "export_regression",
    "prepare",
    "replay",
    "run_campaign",
    "steps_text",
]
