"""QMP facade against a real QEMU with no guest (-machine none): fast, host only."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.qmp import QMP, QMPError

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU on this host")


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], QMP]]:
    sock = tmp_path / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    q = QMP(sock, "unit")
    try:
        q.connect(timeout=20, alive=lambda: proc.poll() is None)
        yield proc, q
    finally:
        q.close()
        proc.kill()
        proc.wait()


def test_execute_stop_cont_and_events(qemu: tuple[subprocess.Popen[bytes], QMP]) -> None:
    _, q = qemu
    assert q.status() in ("running", "prelaunch")
    q.stop()
    assert q.status() == "paused"
    assert q.wait_event("STOP", 5) is not None
    q.cont()
    assert q.wait_event("RESUME", 5) is not None
    q.set_reboot_action("reset")
    q.set_reboot_action("shutdown")
    with pytest.raises(QMPError):
        q.execute("no-such-command")


def test_quit_then_close_is_safe(qemu: tuple[subprocess.Popen[bytes], QMP]) -> None:
    proc, q = qemu
    q.quit()
    assert proc.wait(timeout=10) == 0
    shutdown = q.wait_event("SHUTDOWN", 5)
    assert shutdown is not None and shutdown["data"]["reason"] == "host-qmp-quit"
    q.quit()  # already gone: no error
    q.close()
    q.close()


def test_connect_gives_up_when_qemu_is_dead(tmp_path: Path) -> None:
    q = QMP(tmp_path / "none.sock")
    with pytest.raises(QMPError):
        q.connect(timeout=0.5, alive=lambda: False)
    q.close()
