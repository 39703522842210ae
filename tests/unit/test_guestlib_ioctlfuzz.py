"""guestlib.ioctlfuzz against fake drivers: what counts as a finding (no kernel, no guest)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from guestlib import ioctlfuzz
from pydbd import abi

EMPTY = json.dumps({"version": "0.12.1", "devices": []})


def _paths(tmp_path: Path) -> ioctlfuzz.Paths:
    return ioctlfuzz.Paths("/dev/vdb", str(tmp_path))


def _failing(code: int) -> ioctlfuzz.IoctlFn:
    def ioctl(fd: int, request: int, arg: int) -> int:
        raise OSError(code, os.strerror(code))

    return ioctl


def _fuzz(
    tmp_path: Path,
    seed: int,
    calls: int,
    ioctl: ioctlfuzz.IoctlFn,
    read_state: Callable[[], str] = lambda: EMPTY,
    privileged: bool = True,
) -> ioctlfuzz.FuzzReport:
    return ioctlfuzz.fuzz(
        seed, calls, _paths(tmp_path), privileged=privileged, ioctl=ioctl, read_state=read_state, ctl_fd=-1
    )


def test_documented_failures_are_not_findings(tmp_path: Path) -> None:
    report = _fuzz(tmp_path, 1, 300, _failing(errno.EINVAL))
    assert report.ok, report.findings
    assert len(report.calls) == 300
    ops = {c.op.split()[0] for c in report.calls}
    assert {"setup-snapshot", "destroy", "info", "reconfigure-auto-expand", "unknown"} <= ops
    out = report.to_json()
    assert out["results"] == {"EINVAL": 300} and out["ok"]


def test_same_seed_same_calls(tmp_path: Path) -> None:
    def run(seed: int) -> list[tuple[str, str]]:
        r = _fuzz(tmp_path, seed, 80, _failing(errno.EINVAL))
        # unterminated-string addresses differ between runs; compare everything else
        return [(c.op, json.dumps({k: v for k, v in c.args.items()}, sort_keys=True)) for c in r.calls]

    a, b = run(5), run(5)
    assert [(op, args) for op, args in a if "unterminated" not in args] == [
        (op, args) for op, args in b if "unterminated" not in args
    ]
    assert run(6) != a


def test_undocumented_errno_is_a_finding(tmp_path: Path) -> None:
    report = _fuzz(tmp_path, 2, 10, _failing(errno.ENOTTY))
    assert not report.ok and "undocumented errno ENOTTY" in report.findings[0]


def test_failed_call_that_changes_state_is_a_finding(tmp_path: Path) -> None:
    states = iter([EMPTY] + [json.dumps({"devices": [{"minor": i, "state": 3}]}) for i in range(100)])
    report = _fuzz(tmp_path, 3, 5, _failing(errno.EBUSY), lambda: next(states))
    assert not report.ok and "failed with EBUSY but changed /proc/datto-info" in report.findings[0]


def test_moving_change_counter_is_not_a_state_change(tmp_path: Path) -> None:
    counter = iter(range(1000))

    def state() -> str:
        return json.dumps({"devices": [{"minor": 0, "state": 2, "nr_changed_blocks": next(counter)}]})

    report = _fuzz(tmp_path, 4, 50, _failing(errno.EINVAL), state)
    assert report.ok, report.findings
    assert any("used 0" in str(c.args.get("minor")) for c in report.calls), (
        "existing minors must be fuzzed too"
    )


def test_unprivileged_calls_must_all_get_eperm(tmp_path: Path) -> None:
    ok = _fuzz(tmp_path, 5, 40, _failing(errno.EPERM), privileged=False)
    assert ok.ok
    bad = _fuzz(tmp_path, 5, 40, _failing(errno.EINVAL), privileged=False)
    assert not bad.ok and "without CAP_SYS_ADMIN gave EINVAL, not EPERM" in bad.findings[0]


def test_successful_setup_is_remembered_for_cleanup(tmp_path: Path) -> None:
    def driver(fd: int, request: int, arg: int) -> int:
        if request == abi.IOCTL_SETUP_SNAP and arg:
            return 0
        raise OSError(errno.EINVAL, "no")

    report = _fuzz(tmp_path, 7, 400, driver)
    assert report.created, "some setup-snapshot calls succeed with this driver"


@pytest.mark.parametrize("length", [1, 100, 4096, 5000])
def test_unterminated_string_ends_at_a_guard_page(length: int) -> None:
    mem = ioctlfuzz.Memory()
    addr = mem.unterminated(length)
    assert ctypes.string_at(addr, length) == b"a" * length
    assert (addr + length) % os.sysconf("SC_PAGE_SIZE") == 0, "the string must end exactly at the guard page"


def test_fixtures_make_every_special_file(tmp_path: Path) -> None:
    ioctlfuzz.make_fixtures(_paths(tmp_path))
    ioctlfuzz.make_fixtures(_paths(tmp_path))  # idempotent
    kinds = {p.name: p for p in tmp_path.iterdir()}
    assert kinds["fuzz-loop"].is_symlink() and kinds["fuzz-bdev-link"].is_symlink()
    assert kinds["fuzz-fifo"].is_fifo() and kinds["fuzz-sock"].is_socket()
