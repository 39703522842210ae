"""The pytest plugin's collection behaviour (kernel parametrization, markers), without booting guests."""

from __future__ import annotations

import pytest

TESTS = """
import pytest

def test_uses_target(target):
    assert target.startswith("debian-")

def test_uses_guest(guest):
    pass

def test_plain():
    pass
"""


def test_kernel_option_parametrizes_and_marks(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_x=TESTS)
    res = pytester.runpytest("--kernel", "debian-6.1,debian-6.12", "--collect-only", "-q")
    out = res.stdout.str()
    for name in ("test_uses_target", "test_uses_guest"):
        assert f"test_x.py::{name}[debian-6.1]" in out and f"test_x.py::{name}[debian-6.12]" in out
    assert "test_x.py::test_plain\n" in out
    res = pytester.runpytest("--kernel", "debian-6.1", "-m", "guest and slow", "--collect-only", "-q")
    assert res.stdout.lines[0] == "test_x.py::test_uses_guest[debian-6.1]"
    assert "1/3 tests collected (2 deselected)" in res.stdout.str()


def test_target_fixture_default_kernel(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBD_KERNEL", raising=False)
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_x=TESTS)
    res = pytester.runpytest("-k", "uses_target or plain", "-q")
    res.assert_outcomes(passed=2, deselected=1)
