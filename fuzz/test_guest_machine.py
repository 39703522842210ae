"""The consistency machine against a fake guest: a correct fake driver passes, each seeded driver bug
is found, and the exported regression file replays the failure (and passes on the correct driver).

The fake answers the agent protocol (fuzz/guest_machine.py, AgentClient) with its own small,
independent implementation of a tracer over the arena: a dict of blocks, a copy-on-write map in
snapshot mode, a changed set per COW file.
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

    def write(self, blocks: list[int], tokens: list[str]) -> int:
        for b, t in zip(blocks, tokens, strict=True):
            same = self.blocks.get(b) == t
            if self.mode == "snapshot" and b not in self.saved:
                self.saved[b] = self.blocks.get(b, "")
            if self.mode != "none" and not (same and self.bug == "skip-unchanged-writes"):
                self.changed.add(b)
            self.blocks[b] = t
        return len(blocks)

    def ctl(self, method: str, args: list[Any]) -> int:
        if method == "destroy":
            if self.mode == "none":
                return errno.ENOENT
            self.mode, self.seqid = "none", 0
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
        if op == "sh":
            cmd = req["cmd"]
            if cmd.startswith("umount"):
                self.mounted = False
            elif cmd.startswith("mount ") or "|| mount" in cmd:
                self.mounted = True
            return {"rc": 0, "out": "524288\n" if "getsz" in cmd else "", "err": ""}
        raise AssertionError(f"unexpected op {op}")


class FakeGuest:
    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver

    def run(self, cmd: str, timeout: float = 0) -> Result:
        m = re.match(r"printf '%s\\n' (.*) > \S+/in && cat \S+/out$", cmd, re.S)
        if m is None:  # the agent start command
            return Result("")
        quoted = m.group(1)  # shlex.quote's form: '...' with each ' written as '"'"'
        req = json.loads(quoted[1:-1].replace("'\"'\"'", "'") if quoted.startswith("'") else quoted)
        return Result(json.dumps({"ok": True, "result": self.driver.handle(req)}) + "\n")


def _env(bug: str = "") -> gm.Env:
    return gm.prepare(FakeGuest(FakeDriver(bug)), "/dev/vdb", "/mnt/vol")


def test_correct_fake_driver_passes() -> None:
    env = _env()
    result = gm.run_campaign(env, max_examples=30, steps=30)
    assert result.examples >= 30 and result.steps > 100


@pytest.mark.parametrize("bug", ["skip-unchanged-writes", "seqid-stuck", "stale-snapshot"])
def test_seeded_bug_is_found_shrunk_and_exported(bug: str, tmp_path: Path) -> None:
    env = _env(bug)
    with pytest.raises(AssertionError) as ei:
        gm.run_campaign(env, max_examples=200, steps=12, export_dir=tmp_path, kernel="fake")
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
