"""The consistency state machine: Hypothesis drives a real dattobd in a long-lived QEMU guest and
fuzz.model.DeviceModel predicts what must hold after every step.

The model's device is the *arena*: a file on the tracked ext4 whose physical blocks (FIEMAP) the
guest agent (guestlib/agent.py) writes raw, beside the filesystem, with O_DIRECT. Rules: raw writes
of fresh or unchanged content, filesystem activity elsewhere on the volume (file writes, truncates,
deletes, fsync, sync), setup-snapshot, transition-to-incremental, transition-to-snapshot with a new
COW file, destroy, reconfigure, expand-cow-file, unmount + mount (dormancy and reactivation, with
raw writes while unmounted), and every transition in a state where the driver must refuse it.

Invariants after every step: the tracer's info (existence, state, seqid, no error); the origin's
arena blocks are the model's device; in snapshot mode /dev/dattoN reads the model's snapshot view
of every arena block. At each transition-to-snapshot the closed COW file's index is parsed: the
arena blocks it marks are exactly the model's changed set, and its header carries the seqid.

Steps run through one agent process per guest, so an example costs seconds, not a boot. Each
example starts from a clean slate (no tracer, arena rewritten to its initial content). A failing
example is shrunk by Hypothesis and exported as a standalone pytest file under tests/regressions/
(see export_regression) that replays the same steps on any `--kernel`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import pprint
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from hypothesis import HealthCheck, settings
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

from fuzz.model import DeviceModel, Mode

ARENA_BLOCKS = 48
MINOR = 0
AGENT_DIR = "/run/dbd-agent"
COW_MIB = 8
DISK_MIB = 256  # the data disk of tests/guest/test_consistency_fuzz.py and the regressions
REPO = Path(__file__).resolve().parent.parent
REGRESSIONS_DIR = REPO / "tests" / "regressions"
# State values of the info ioctl (spec §2.1): active snapshot, active incremental.
STATE_OF_MODE = {Mode.SNAPSHOT: 3, Mode.INCREMENTAL: 2}


class GuestLike(Protocol):
    def run(self, cmd: str, timeout: float = ...) -> Any: ...


class AgentCallError(AssertionError):
    """The agent could not run a step (not a property violation of the driver, but still a failure)."""


@functools.lru_cache(maxsize=65536)
def token_digest(token: str) -> str:
    """Digest of the 4 KiB block a token stands for (the same function as guestlib.agent's)."""
    seed = hashlib.sha256(token.encode()).digest()
    return hashlib.sha256((seed * (4096 // len(seed)))[:4096]).hexdigest()[:16]


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
    trace: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # steps of the last example
    examples: int = 0
    steps: int = 0


def prepare(guest: GuestLike, device: str, mountpoint: str) -> Env:
    """Start the agent and lay out the arena on the mounted filesystem at mountpoint."""
    client = AgentClient(guest)
    client.start()
    sectors = int(client.check_sh(f"blockdev --getsz {device}").strip())
    client.call("arena", path=f"{mountpoint}/arena", device=device, blocks=ARENA_BLOCKS)
    return Env(client, device, mountpoint, sectors)


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
        self.e.trace = []
        self.e.examples += 1

    def _step(self, name: str, **kwargs: Any) -> None:
        self.e.trace.append((name, kwargs))
        self.e.steps += 1

    def _cow_path(self) -> str:
        self.cow_n += 1
        return f"{self.e.mountpoint}/cow-{self.cow_n}"

    def _ctl(self, method: str, *args: Any) -> int:
        rc = self.c.call("ctl", method=method, args=list(args))
        assert isinstance(rc, int)
        return rc

    # -- a clean slate per example ------------------------------------------------------------
    @initialize()
    def reset(self) -> None:
        e = self.e
        if self.c.call("info", minor=MINOR) is not None:
            self._ctl("destroy", MINOR)
        self.c.check_sh(
            f"mountpoint -q {e.mountpoint} || mount {e.device} {e.mountpoint}; "
            f"rm -f {e.mountpoint}/cow-*; rm -rf {e.mountpoint}/files; sync"
        )
        self.c.call(
            "write", blocks=list(range(ARENA_BLOCKS)), tokens=[f"init:{i}" for i in range(ARENA_BLOCKS)]
        )

    # -- I/O ------------------------------------------------------------------------------------
    def _write(self, first: int, count: int, same: bool = False) -> None:
        count = min(count, ARENA_BLOCKS - first)
        if same:
            tokens = [(self.m.device[first + i] or b"").decode() for i in range(count)]
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

    # -- tracer transitions -----------------------------------------------------------------------
    @precondition(lambda self: self.m.mode is Mode.NONE)
    @rule(cache_mib=st.sampled_from([0, 1, 4]))
    def setup_snapshot(self, cache_mib: int) -> None:
        self._step("setup_snapshot", cache_mib=cache_mib)
        self.cow = self._cow_path()
        rc = self._ctl("setup_snapshot", self.e.device, self.cow, MINOR, COW_MIB, cache_mib << 20)
        assert rc == 0, f"setup-snapshot failed with errno {rc} ({errno.errorcode.get(rc)})"
        self.m.setup_snapshot()

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
        rc = self._ctl("transition_to_snapshot", self.cow, MINOR, COW_MIB)
        assert rc == 0, f"transition-to-snapshot failed with errno {rc}"
        period = self.m.transition_to_snapshot()
        got = self.c.call("cow_index", path=old, device_sectors=self.e.device_sectors)
        want = sorted(period.changed)
        missing = sorted(set(want) - set(got["marked"]))
        extra = sorted(set(got["marked"]) - set(want))
        assert not missing, f"closed COW file {old} misses changed arena blocks {missing}"
        assert not extra, f"closed COW file {old} marks arena blocks nobody wrote: {extra}"
        assert got["seqid"] == period.seqid, f"{old}: seqid {got['seqid']}, expected {period.seqid}"
        assert got["nr_changed"] >= len(want), f"{old}: nr_changed_blocks {got['nr_changed']} < {len(want)}"
        if delete_old:
            self.c.check_sh(f"rm -f {shlex.quote(str(old))}")

    @precondition(lambda self: self.m.mode is not Mode.NONE)
    @rule()
    def destroy(self) -> None:
        self._step("destroy")
        rc = self._ctl("destroy", MINOR)
        assert rc == 0, f"destroy failed with errno {rc}"
        self.m.destroy()
        self.c.check_sh(f"rm -f {self.e.mountpoint}/cow-*")
        self.cow = None

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule(cache_mib=st.sampled_from([0, 2, 8]))
    def reconfigure(self, cache_mib: int) -> None:
        self._step("reconfigure", cache_mib=cache_mib)
        assert self._ctl("reconfigure", MINOR, cache_mib << 20) == 0

    @precondition(lambda self: self.m.mode is Mode.SNAPSHOT)
    @rule(mib=st.integers(1, 4))
    def expand_cow_file(self, mib: int) -> None:
        self._step("expand_cow_file", mib=mib)
        assert self._ctl("expand_cow_file", MINOR, mib) == 0

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
        want_origin = [token_digest((c or b"").decode()) for c in self.m.device]
        bad = [i for i, (a, b) in enumerate(zip(s["origin"], want_origin, strict=True)) if a != b]
        assert not bad, f"origin arena blocks {bad} do not hold what was written"
        if self.m.mode is Mode.SNAPSHOT:
            assert s["snapshot"] is not None, f"{self.e.snapdev} missing in snapshot mode"
            view = [token_digest((c or b"").decode()) for c in self.m.snapshot_view()]
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
