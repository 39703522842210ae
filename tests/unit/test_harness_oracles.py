"""harness.oracles: guestlib's JSON verdicts become test failures and counts (fake guest, no QEMU)."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from harness.guest import CommandResult, Guest
from harness.oracles import GuestlibError, OracleFailure, Oracles, Tally


class FakeGuest:
    """Answers every command with the next queued (rc, stdout); records the commands."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float = 0) -> CommandResult:
        self.commands.append(cmd)
        rc, out = self.answers.pop(0)
        return CommandResult(stdout=out, stderr="Traceback: boom" if rc == 2 else "", rc=rc)


def _oracles(*answers: tuple[int, dict[str, Any] | str]) -> tuple[Oracles, FakeGuest]:
    fake = FakeGuest(*[(rc, a if isinstance(a, str) else json.dumps(a) + "\n") for rc, a in answers])
    return Oracles(cast(Guest, fake), Tally(), context="seed 7; rerun: pytest x --seed 7"), fake


def test_passing_checks_are_counted() -> None:
    o, fake = _oracles(
        (0, {"oracle": "snapshot-stability", "ok": True, "message": "m", "details": {"blocks": 40960}}),
        (0, {"oracle": "cow-structure", "ok": True, "message": "m", "details": {"compared": 12}}),
        (0, {"ok": True, "message": "all 5 signed blocks", "counts": {"ok": 5, "stale": 0}}),
    )
    o.stability("/root/h0", "/root/h1")
    o.cow_structure("/mnt/ro/.datto", "/dev/datto0", "--seqid", 1)
    o.signed_check("/dev/vdb", "/root/s.json")
    o.crash_point()
    assert o.tally == Tally(blocks_verified=40960 + 12 + 5, crash_points=1, checks_passed=3)
    assert fake.commands[1].endswith("guestlib cow-structure /mnt/ro/.datto /dev/datto0 --seqid 1")
    assert dict(o.tally.properties())["oracle_blocks_verified"] == 40977


def test_failed_check_names_oracle_block_and_seed() -> None:
    verdict = {
        "oracle": "change-list",
        "ok": False,
        "message": "block 9 differs but is not marked",
        "first_block": 9,
    }
    o, _ = _oracles((1, verdict))
    with pytest.raises(OracleFailure) as exc:
        o.change_list("/root/h0", "/root/h1", "/mnt/vol/.datto")
    text = str(exc.value)
    assert "oracle change-list failed (first wrong block 9)" in text and "rerun: pytest x --seed 7" in text
    assert o.tally.checks_passed == 0


@pytest.mark.parametrize("answer", [(2, {"ok": False, "error": "no such file"}), (0, "not json"), (0, "")])
def test_unusable_runs_are_errors_not_verdicts(answer: tuple[int, dict[str, Any] | str]) -> None:
    o, _ = _oracles(answer)
    with pytest.raises(GuestlibError, match="guestlib fsck failed to run"):
        o.fsck("/dev/vdb", "ext4")
