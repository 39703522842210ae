"""The pytest plugin's collection behaviour (kernel parametrization, markers), without booting guests."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inner pytest runs record guest durations: keep them out of the real harness cache."""
    monkeypatch.setenv("DBD_CACHE_DIR", str(tmp_path / "private-cache"))


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


DEEP_TESTS = """
import pytest

def test_everywhere(target):
    pass

@pytest.mark.deep
def test_deep(target):
    pass

@pytest.mark.debugkernel
def test_debug_too(target):
    pass

@pytest.mark.debugonly
def test_debug_only(target):
    pass

@pytest.mark.long
@pytest.mark.deep
def test_long(target):
    pass
"""


def _collected(pytester: pytest.Pytester, *args: str) -> tuple[set[str], str]:
    """(test ids collected, pytest's output) for DEEP_TESTS with these options."""
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_d=DEEP_TESTS)
    res = pytester.runpytest(*args, "--collect-only", "-q")
    out = res.stdout.str()
    return {line.split("::")[1] for line in res.stdout.lines if line.startswith("test_d.py::")}, out


def test_deep_tests_run_on_the_default_kernel_only_with_kernel_all(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness import images

    monkeypatch.delenv("DBD_DEEP_ON", raising=False)
    debug = [k for k in images.all_targets() if images.is_debug_target(k)]
    plain = [k for k in images.all_targets() if k not in debug]
    assert debug, "the matrix has a debug kernel target"
    everywhere = {f"test_everywhere[{k}]" for k in plain}
    everywhere |= {f"test_debug_too[{k}]" for k in images.all_targets()}
    on_debug = {f"test_debug_only[{k}]" for k in debug}
    monkeypatch.delenv("DBD_LONG", raising=False)
    ids, out = _collected(pytester, "--kernel", "all")
    assert ids == everywhere | on_debug | {f"test_deep[{images.default_target()}]"}
    # deselected: deep on the other plain kernels, everything unmarked on debug, debugonly on plain,
    # and the long test everywhere
    every = len(plain) + len(debug)
    assert f"({(len(plain) - 1) + 2 * len(debug) + len(plain) + every} deselected)" in out
    ids, _ = _collected(pytester, "--kernel", "all", "--deep-on", "all")
    assert ids == everywhere | on_debug | {f"test_deep[{k}]" for k in plain}


def test_naming_kernels_runs_deep_tests_on_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBD_DEEP_ON", raising=False)
    ids, _ = _collected(pytester, "--kernel", "debian-6.12")
    assert ids == {"test_everywhere[debian-6.12]", "test_deep[debian-6.12]", "test_debug_too[debian-6.12]"}
    args = ("--kernel", "debian-5.10,debian-7.2", "--deep-on", "debian-7.2")
    ids, _ = _collected(pytester, *args)
    assert "test_deep[debian-5.10]" not in ids and "test_deep[debian-7.2]" in ids
    header = pytester.runpytest(*args, "--collect-only").stdout.str()
    assert "all tests on debian-7.2; without the deep ones on debian-5.10" in header
    assert "long ones deselected (--long)" in header


def test_long_tests_run_only_with_the_long_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBD_DEEP_ON", raising=False)
    monkeypatch.delenv("DBD_LONG", raising=False)
    ids, _ = _collected(pytester, "--kernel", "debian-6.1")
    assert "test_long[debian-6.1]" not in ids and "test_deep[debian-6.1]" in ids
    ids, _ = _collected(pytester, "--kernel", "debian-6.1,debian-6.12", "--deep-on", "debian-6.1", "--long")
    assert "test_long[debian-6.1]" in ids and "test_long[debian-6.12]" not in ids  # still deep
    monkeypatch.setenv("DBD_LONG", "1")
    ids, _ = _collected(pytester, "--kernel", "debian-6.1")
    assert "test_long[debian-6.1]" in ids


SOAK_TESTS = """
import pytest

@pytest.mark.soak
def test_soak(target):
    pass

@pytest.mark.debugkernel(soak=True)
def test_debug_soak(target):
    pass

@pytest.mark.debugkernel
def test_debug_every_change(target):
    pass
"""


def test_soak_tier_runs_only_with_the_soak_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`soak` tests and, on a debug kernel, `debugkernel(soak=True)` ones need --soak (DBD_SOAK=1);
    on a stock kernel debugkernel(soak=True) is an ordinary test."""
    from harness import images

    debug = next(k for k in images.all_targets() if images.is_debug_target(k))
    kernels = f"debian-6.1,{debug}"
    monkeypatch.delenv("DBD_SOAK", raising=False)
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_s=SOAK_TESTS)

    def ids(*args: str) -> set[str]:
        res = pytester.runpytest("--kernel", kernels, *args, "--collect-only", "-q")
        return {line.split("::")[1] for line in res.stdout.lines if line.startswith("test_s.py::")}

    every_change = {"test_debug_soak[debian-6.1]", "test_debug_every_change[debian-6.1]"}
    every_change.add(f"test_debug_every_change[{debug}]")
    assert ids() == every_change
    soaked = every_change | {"test_soak[debian-6.1]", f"test_debug_soak[{debug}]"}
    assert ids("--soak") == soaked
    header = pytester.runpytest("--kernel", kernels, "--collect-only").stdout.str()
    assert "soak ones deselected (--soak)" in header
    monkeypatch.setenv("DBD_SOAK", "1")
    assert ids() == soaked


SCENARIO_TESTS = """
def _scenario(request, blocks):
    request.node.user_properties.extend([("oracle_scenario", 1), ("oracle_blocks_verified", blocks),
                                         ("oracle_crash_points", 1), ("oracle_checks_passed", 2)])

def test_good(request):
    _scenario(request, 10)

def test_bad(request):
    _scenario(request, 5)
    assert False

def test_not_a_scenario():
    pass
"""


def test_summary_line_counts_scenarios_blocks_and_failures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_s=SCENARIO_TESTS)
    res = pytester.runpytest()
    res.assert_outcomes(passed=2, failed=1)
    assert (
        "oracle scenarios: 2 run, 1 failed; 15 blocks verified, 4 checks passed, 2 crash points checked"
        in res.stdout.str()
    )


ORDER_TESTS = """
def test_short(guest):
    pass

def test_long(guest):
    pass

def test_new(guest):
    pass

def test_host():
    pass
"""


def test_guest_tests_run_longest_first_by_last_known_duration(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBD_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "guest-test-durations.json").write_text(
        json.dumps({"test_o.py::test_short[debian-6.1]": 5.0, "test_o.py::test_long[debian-6.1]": 300.0})
    )
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_o=ORDER_TESTS)
    res = pytester.runpytest("--kernel", "debian-6.1", "--collect-only", "-q")
    names = [line.split("::")[1] for line in res.stdout.lines if line.startswith("test_o.py::")]
    # host tests first, then guests: 300 s, unknown (counts as 90 s), 5 s
    assert names == ["test_host", "test_long[debian-6.1]", "test_new[debian-6.1]", "test_short[debian-6.1]"]
    monkeypatch.setenv("DBD_SHORTEST_FIRST", "1")  # ci/mutation: the first failure comes sooner
    res = pytester.runpytest("--kernel", "debian-6.1", "--collect-only", "-q")
    names = [line.split("::")[1] for line in res.stdout.lines if line.startswith("test_o.py::")]
    assert names == ["test_host", "test_short[debian-6.1]", "test_new[debian-6.1]", "test_long[debian-6.1]"]


def test_durations_seed_orders_a_cold_cache_and_the_cache_overrides_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import harness.pytest_plugin as plugin

    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps({"test_o.py::test_new[debian-6.1]": 400.0, "test_o.py::test_long[debian-6.1]": 300.0})
    )
    monkeypatch.setattr(plugin, "DURATIONS_SEED", seed)
    monkeypatch.setenv("DBD_CACHE_DIR", str(tmp_path / "cache"))
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_o=ORDER_TESTS)

    def order() -> list[str]:
        res = pytester.runpytest_inprocess("--kernel", "debian-6.1", "--collect-only", "-q")
        return [line.split("::")[1] for line in res.stdout.lines if line.startswith("test_o.py::")]

    # no cache yet: the seed alone orders them (test_short unknown: 90 s)
    assert order() == ["test_host", "test_new[debian-6.1]", "test_long[debian-6.1]", "test_short[debian-6.1]"]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "guest-test-durations.json").write_text(
        json.dumps({"test_o.py::test_new[debian-6.1]": 1.0})
    )
    # what this machine measured wins over the seed
    assert order() == ["test_host", "test_long[debian-6.1]", "test_short[debian-6.1]", "test_new[debian-6.1]"]


def test_under_xdist_each_failure_is_named_as_it_happens(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(
        test_x="def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'the first line'\n"
    )
    res = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    out = res.stdout.str()
    line = "FAILED test_x.py::test_bad (call): AssertionError: the first line"
    assert line in out, out
    assert out.index(line) < out.index("short test summary"), "named only in the summary"


def test_the_header_names_the_module_under_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    pytester.makepyfile(test_x="def test_plain():\n    pass\n")
    plain = pytester.runpytest_subprocess("--collect-only").stdout.str()
    assert "module under test: kernel/ (this repository)" in plain
    (tmp_path / "built").mkdir()
    out = pytester.runpytest_subprocess(
        "test_x.py", "--collect-only", f"--ko={tmp_path / 'built'}"
    ).stdout.str()
    assert f"module under test: --ko {tmp_path / 'built'}" in out
    res = pytester.runpytest_subprocess("test_x.py", "--collect-only", f"--ko={tmp_path / 'missing.ko'}")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ko" in res.stderr.str() and "neither a .ko file nor a directory" in res.stderr.str()
