"""Accelerator choice: a hanging or broken KVM must fall back to TCG within the probe bound."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import accel


def _script(tmp_path: Path, body: str) -> str:
    p = tmp_path / "fake-qemu"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def kvm_dev(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"  # any read/write file passes the access() check
    dev.write_text("")
    return dev


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBD_ACCEL", raising=False)


def test_hanging_qemu_falls_back_to_tcg_within_bound(tmp_path: Path, kvm_dev: Path) -> None:
    pidfile = tmp_path / "child.pid"
    qemu = _script(tmp_path, f"sleep 300 & echo $! > {pidfile}; wait")
    t0 = time.monotonic()
    verdict = accel.select_accel(
        Path("/nonexistent/vmlinux"), qemu=qemu, kvm_device=kvm_dev, cache_dir=tmp_path / "c", timeout=1.5
    )
    elapsed = time.monotonic() - t0
    assert verdict == "tcg"
    assert elapsed < 1.5 + 3
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert _gone_or_zombie(child)  # the whole process group was killed


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_verdict_is_cached_per_boot(tmp_path: Path, kvm_dev: Path) -> None:
    counter = tmp_path / "runs"
    qemu = _script(
        tmp_path, f"echo run >> {counter}; echo 'Linux version 6.1'; echo 'Kernel panic - not syncing'"
    )
    cache = tmp_path / "c"
    kw = dict(qemu=qemu, kvm_device=kvm_dev, cache_dir=cache, timeout=5)
    assert accel.select_accel(Path("/k"), **kw) == "kvm"  # type: ignore[arg-type]
    assert accel.select_accel(Path("/k"), **kw) == "kvm"  # type: ignore[arg-type]
    assert counter.read_text().count("run") == 1
    assert len(list(cache.glob("accel-*"))) == 1


def test_crashing_qemu_means_tcg(tmp_path: Path, kvm_dev: Path) -> None:
    qemu = _script(tmp_path, "echo 'failed to set MSR 0x10a' >&2; exit 134")
    assert accel.select_accel(Path("/k"), qemu=qemu, kvm_device=kvm_dev, cache_dir=tmp_path) == "tcg"


def test_no_kvm_device_or_no_kernel_means_tcg(tmp_path: Path, kvm_dev: Path) -> None:
    qemu = _script(tmp_path, "exit 99")  # must not even run
    assert (
        accel.select_accel(Path("/k"), qemu=qemu, kvm_device=tmp_path / "missing", cache_dir=tmp_path)
        == "tcg"
    )
    assert accel.select_accel(None, qemu=qemu, kvm_device=kvm_dev, cache_dir=tmp_path) == "tcg"


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBD_ACCEL", "kvm")
    assert accel.select_accel(None, kvm_device=tmp_path / "missing") == "kvm"
    monkeypatch.setenv("DBD_ACCEL", "TCG")
    assert accel.select_accel(None) == "tcg"
    monkeypatch.setenv("DBD_ACCEL", "hvf")
    with pytest.raises(ValueError):
        accel.select_accel(None)


def test_run_bounded_returns_exit_code_and_output() -> None:
    rc, out = accel.run_bounded(["sh", "-c", "echo hi; exit 7"], timeout=5)
    assert rc == 7 and out == b"hi\n"
    rc, out = accel.run_bounded(["/nonexistent/qemu"], timeout=5)
    assert rc == 127


def test_cpu_models() -> None:
    assert accel.cpu_model("tcg") == "qemu64,+rdrand"
    assert accel.cpu_model("kvm") == "host"


@pytest.mark.skipif(
    subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).returncode != 0,
    reason="no QEMU on this host",
)
def test_real_qemu_without_kernel_is_bounded(tmp_path: Path) -> None:
    """A real KVM probe with a bogus kernel fails fast (QEMU refuses to start) -> tcg."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    t0 = time.monotonic()
    assert accel.probe_kvm(tmp_path / "no-such-vmlinux", timeout=5) is False
    assert time.monotonic() - t0 < 8
