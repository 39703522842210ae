"""The consistency machine against a fake guest: a correct fake driver passes, each seeded driver bug
is found, and the exported regression file replays the failure (and passes on the correct driver).

The fake answers the agent protocol (fuzz/guest_machine.py, AgentClient) with its own small,
independent implementation of a tracer over the arena: a dict of blocks, a copy-on-write map in
snapshot mode, a changed set per COW file; discards and write-zeroes as our module handles them
(a discard is dropped during a snapshot, marked and reaching the device, which reads zeros, in
incremental mode); an update-img over a backup image; reboots and power cuts with reloads.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fuzz import guest_machine as gm


@dataclass
class Result:
    stdout: str
    stderr: str = ""
    rc: int = 0


@dataclass
class FakeDriver:
    """A tracer over the arena blocks; `bug` names one seeded defect (or "")."""

    bug: str = ""
    blocks: dict[int, str] = field(default_factory=dict)  # arena index -> token
    mode: str = "none"
    seqid: int = 0
    saved: dict[int, str] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # closed COW files
    cow: str = ""
    mounted: bool = True
    image: dict[int, str] = field(default_factory=dict)  # the backup image's arena blocks
    pending: dict[str, Any] | None = None  # tracer state kept in the COW file across a boot
    unverified: dict[str, Any] | None = None  # reloaded, waiting for the mount

    def write(self, blocks: list[int], tokens: list[str], track: bool = True) -> int:
        for b, t in zip(blocks, tokens, strict=True):
            same = self.blocks.get(b) == t
            if self.mode == "snapshot" and b not in self.saved and track:
                self.saved[b] = self.blocks.get(b, "")
            if self.mode != "none" and not (same and self.bug == "skip-unchanged-writes") and track:
                self.changed.add(b)
            self.blocks[b] = t
        return len(blocks)

    def trim(self, blocks: list[int], how: str) -> dict[str, Any]:
        """Like our module: write-zeroes is a write; a discard is dropped during a snapshot, marked
        in incremental mode, and the device reads zeros where it reached it."""
        zeros = [gm.ZERO_TOKEN] * len(blocks)
        if how != "discard":
            self.write(blocks, zeros, track=self.bug != "zeroout-untracked")
        elif (self.mode, self.bug) in (("snapshot", "discard-no-cow"), ("incremental", "discard-unmarked")):
            self.write(blocks, zeros, track=False)
        elif self.mode != "snapshot":
            self.write(blocks, zeros)
        return {"errno": 0, "digests": [gm.token_digest(self.blocks.get(b, "")) for b in blocks]}

    def view(self) -> dict[int, str]:
        return {**self.blocks, **self.saved}

    def update_img(self, cow: str) -> dict[str, Any]:
        marked = self.files[cow]["marked"]
        for b in marked[:-1] if self.bug == "update-img-skips-last" else marked:
            self.image[b] = self.view().get(b, "")
        return {"rc": 0, "out": "", "err": ""}

    def boot(self, clean: bool) -> None:
        self.pending = None
        if self.mode != "none":
            self.pending = {"mode": self.mode, "seqid": self.seqid, "saved": self.saved,
                            "changed": self.changed, "cow": self.cow, "dirty": not clean}  # fmt: skip
        self.mode, self.mounted, self.unverified = "none", False, None

    def mount(self) -> None:
        self.mounted = True
        u = self.unverified
        if u is None or u["error"]:
            return
        if u["dirty"] and self.bug != "power-cut-reload-accepted":
            u["error"] = -errno.EINVAL
            return
        self.mode, self.seqid, self.saved, self.changed, self.cow = (
            u["mode"], u["seqid"], u["saved"], u["changed"], u["cow"]
        )  # fmt: skip
        if self.bug.startswith("reload-forgets-changes"):
            self.changed = set()
        self.unverified = None

    def ctl(self, method: str, args: list[Any]) -> int:
        if method == "destroy":
            if self.mode == "none" and self.unverified is None:
                return errno.ENOENT
            if self.mode != "none" and not self.mounted:  # dormant: the closed COW file is clean
                self.pending = {"mode": self.mode, "seqid": self.seqid, "saved": self.saved,
                                "changed": self.changed, "cow": self.cow, "dirty": False}  # fmt: skip
            self.mode, self.seqid, self.unverified = "none", 0, None
            return 0
        if method in ("reload_snapshot", "reload_incremental"):
            if self.mode != "none" or self.unverified is not None:
                return errno.EBUSY
            p = self.pending or {
                "mode": "incremental",
                "seqid": 1,
                "saved": {},
                "changed": set(),
                "dirty": True,
            }
            mode = "snapshot" if method == "reload_snapshot" else "incremental"
            dirty = p["dirty"] or p["mode"] != mode
            self.unverified = {**p, "cow": "/mnt/vol" + args[1], "mode": mode, "dirty": dirty, "error": 0}
            return 0
        if method == "setup_snapshot":
            if self.mode != "none":
                return errno.EBUSY
            self.mode, self.seqid, self.cow = "snapshot", 1, args[1]
            self.saved, self.changed = {}, set()
            return 0
        if method == "transition_to_incremental":
            if self.mode != "snapshot":
                return errno.EINVAL if self.mode != "none" else errno.ENOENT
            self.mode, self.saved = "incremental", {}
            return 0
        if method == "transition_to_snapshot":
            if self.mode != "incremental":
                return errno.EINVAL if self.mode != "none" else errno.ENOENT
            marked = sorted(self.changed)
            self.files[self.cow] = {"marked": marked, "seqid": self.seqid, "nr_changed": len(self.changed)}
            self.mode, self.cow, self.saved, self.changed = "snapshot", args[0], {}, set()
            self.seqid += 0 if self.bug == "seqid-stuck" else 1
            return 0
        if method in ("reconfigure", "expand_cow_file"):
            return 0 if self.mode == "snapshot" else errno.EINVAL
        raise AssertionError(f"unexpected ctl {method}")

    def state(self) -> dict[str, Any]:
        info = None
        if self.unverified is not None:
            u = self.unverified
            info = {
                "state": {"snapshot": 5, "incremental": 4}[u["mode"]],
                "error": u["error"],
                "seqid": u["seqid"],
            }
        if self.mode != "none":
            state = {"snapshot": 3, "incremental": 2}[self.mode] & (~2 if not self.mounted else ~0)
            info = {"state": state, "error": 0, "seqid": self.seqid}
        origin = [gm.token_digest(self.blocks.get(i, "")) for i in range(gm.ARENA_BLOCKS)]
        snap = None
        if self.mode == "snapshot":
            view = {**self.blocks, **self.saved}
            if self.bug == "stale-snapshot" and self.saved:
                view[min(self.saved)] = self.blocks[min(self.saved)]
            snap = [gm.token_digest(view.get(i, "")) for i in range(gm.ARENA_BLOCKS)]
        return {"info": info, "origin": origin, "snapshot": snap}

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.pop("op")
        if op == "write":
            return self.write(req["blocks"], req["tokens"])
        if op == "ctl":
            return self.ctl(req["method"], req["args"])
        if op == "info":
            return self.state()["info"]
        if op == "state":
            return self.state()
        if op == "cow_index":
            return {**self.files[req["path"]], "uuid": "00", "flags": 1, "version": 1}
        if op in ("files", "arena"):
            return list(range(gm.ARENA_BLOCKS)) if op == "arena" else req["count"]
        if op == "trim":
            return self.trim(req["blocks"], req["how"])
        if op == "backup":
            self.image = {b: self.view().get(b, "") for b in range(gm.ARENA_BLOCKS)}
            return self.handle({"op": "digests", "path": req["image"]})
        if op == "update_img":
            return self.update_img(req["cow"])
        if op == "digests":
            assert req["path"] == gm.IMAGE
            return [gm.token_digest(self.image.get(i, "")) for i in range(gm.ARENA_BLOCKS)]
        if op in ("trace_mark", "chain_record"):
            return None
        if op == "change_list_traced":  # the whole device, from the block trace
            if self.bug == "spurious-marks":
                return {"ok": False, "message": f"4866 blocks of {req['cow']} are marked but not written"}
            return {"ok": True, "message": "", "details": {"spurious": 0}}
        if op == "sh":
            cmd = req["cmd"]
            if cmd.startswith("umount"):
                self.mounted = False
            elif re.search(r"(^|&& |\|\| )mount ", cmd):
                self.mount()
            return {"rc": 0, "out": "524288\n" if "getsz" in cmd else "", "err": ""}
        raise AssertionError(f"unexpected op {op}")


class FakeGuest:
    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.boots = 0

    def reboot(self, wait: bool = True, timeout: float = 0) -> None:
        self.boots += 1
        self.driver.boot(clean=True)

    def power_cut(self, wait: bool = True, timeout: float = 0) -> None:
        self.boots += 1
        self.driver.boot(clean=False)

    def load_module(self) -> str:
        return "dattobd.ko"

    def run(self, cmd: str, timeout: float = 0) -> Result:
        m = re.match(r"printf '%s\\n' (.*) > \S+/in && cat \S+/out$", cmd, re.S)
        if m is None:  # the agent start command
            return Result("")
        quoted = m.group(1)  # shlex.quote's form: '...' with each ' written as '"'"'
        req = json.loads(quoted[1:-1].replace("'\"'\"'", "'") if quoted.startswith("'") else quoted)
        return Result(json.dumps({"ok": True, "result": self.driver.handle(req)}) + "\n")


def _env(bug: str = "", boot_one_in: int = 1) -> gm.Env:
    return gm.prepare(FakeGuest(FakeDriver(bug)), "/dev/vdb", "/mnt/vol", boot_one_in=boot_one_in)


def test_correct_fake_driver_passes() -> None:
    env = _env(boot_one_in=2)
    result = gm.run_campaign(env, max_examples=40, steps=30)
    assert result.examples >= 40 and result.steps > 100
    assert env.boots > 0, "no example rebooted or cut the power"


def test_derandomized_round_sets_up_tiny_index_caches() -> None:
    """The CI round is derandomized; it must still set up snapshots whose index cache holds no
    section, else the write-back and read-back paths would only run in random campaigns."""
    for examples in (2, 4):  # the debug kernel's round and the others' (test_consistency_fuzz.py)
        env = _env(boot_one_in=0)
        gm.run_campaign(env, max_examples=examples, steps=15, derandomize=True)
        assert env.small_caches > 0, f"{examples} examples"


def test_boot_rules_are_off_by_default() -> None:
    env = gm.prepare(FakeGuest(FakeDriver()), "/dev/vdb", "/mnt/vol")
    gm.run_campaign(env, max_examples=20, steps=30)
    assert env.boots == 0


# Bugs Hypothesis finds (derandomized), shrinks and exports within the test's budget.
SEARCHED_BUGS = [
    "skip-unchanged-writes",
    "seqid-stuck",
    "stale-snapshot",
    "discard-no-cow",
    "discard-unmarked",
    "zeroout-untracked",
    "update-img-skips-last",
    "power-cut-reload-accepted",
]  # reload-forgets-changes needs a deeper example: found at the edge of this budget, so replay only
SETUP = ("setup_snapshot", {"cache_bytes": 0, "backup": False})
TO_INC = ("transition_to_incremental", {})
TO_SNAP = ("transition_to_snapshot", {"delete_old": False})
WRITE = ("write", {"first": 3, "count": 2})
# A seeded bug per invariant of the newer rules, with steps that expose it (shrinking them by
# search costs minutes on a fake: the search tests above cover the mechanism).
REPLAYED_BUGS = {
    "discard-no-cow": [SETUP, ("discard", {"first": 1, "count": 3})],
    # passes a discard down in incremental mode without marking it
    "discard-unmarked": [SETUP, TO_INC, ("discard", {"first": 5, "count": 2}), TO_SNAP],
    # write-zeroes neither copied nor marked
    "zeroout-untracked": [SETUP, ("zero_out", {"first": 0, "count": 1, "how": "punch_hole"})],
    # (the tool, not the driver) update-img does not copy the last changed block
    "update-img-skips-last": [("setup_snapshot", {"cache_bytes": 0, "backup": True}), TO_INC, WRITE, TO_SNAP],
    # a reload after a clean reboot starts with an empty change list
    "reload-forgets-changes": [SETUP, TO_INC, WRITE, ("clean_reboot", {}), TO_SNAP],
    # the same after destroy of the dormant tracer and a reload, without a reboot
    "reload-forgets-changes-no-boot": [SETUP, TO_INC, WRITE, ("destroy_dormant_and_reload", {}), TO_SNAP],
    # the dirty COW file left by a power cut is accepted by the reload
    "power-cut-reload-accepted": [SETUP, TO_INC, WRITE, ("power_cut", {})],
    # marks thousands of blocks outside the arena that nobody wrote (a COW file's zero-fill, say)
    "spurious-marks": [SETUP, TO_INC, WRITE, TO_SNAP],
}


@pytest.mark.parametrize(("bug", "steps"), list(REPLAYED_BUGS.items()), ids=list(REPLAYED_BUGS))
def test_seeded_bug_is_caught_on_replay(
    bug: str, steps: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    with pytest.raises(AssertionError):
        gm.replay(_env(bug), steps)
    gm.replay(_env(), steps)  # the correct driver passes the same steps
    exported = gm.export_regression(tmp_path, steps, "fake", "seeded")
    namespace: dict[str, Any] = {}
    exec(exported.read_text().split("\n\n@pytest.mark")[0], namespace)
    assert [(name, kwargs) for name, kwargs in namespace["STEPS"]] == steps


@pytest.mark.parametrize("bug", SEARCHED_BUGS)
def test_seeded_bug_is_found_shrunk_and_exported(bug: str, tmp_path: Path) -> None:
    env = _env(bug, boot_one_in=1 if "power-cut" in bug else 0)
    with pytest.raises(AssertionError) as ei:
        gm.run_campaign(env, max_examples=500, steps=14, export_dir=tmp_path, kernel="fake")
    [exported] = list(tmp_path.glob("test_consistency_*.py"))
    assert any("exported as" in note for note in getattr(ei.value, "__notes__", []))
    text = exported.read_text()
    compile(text, str(exported), "exec")  # a valid pytest file
    namespace: dict[str, Any] = {}
    exec(text.split("\n\n@pytest.mark")[0], namespace)  # header, imports and STEPS
    steps = [(name, kwargs) for name, kwargs in namespace["STEPS"]]
    assert 0 < len(steps) <= 8, f"not shrunk: {gm.steps_text(steps)}"
    with pytest.raises(AssertionError):
        gm.replay(_env(bug), steps)  # the regression test fails on the buggy driver...
    gm.replay(_env(), steps)  # ...and passes on a correct one
