"""Guest failure paths that need QEMU but no guest image (host only)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Guest, GuestBootError

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU on this host")


@dataclass(frozen=True)
class FakeImage:
    vmlinux: Path
    initrd: Path
    disk: Path
    kernel_release: str = "0.0"


def test_qemu_start_failure_is_a_boot_error_with_qemus_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBD_ACCEL", "tcg")
    monkeypatch.setenv("DBD_RUN_DIR", str(tmp_path / "run"))
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    (tmp_path / "initrd").write_bytes(b"")
    (tmp_path / "vmlinux").write_bytes(b"not a kernel")
    image = FakeImage(tmp_path / "vmlinux", tmp_path / "initrd", disk)
    g = Guest("fake", image=image, module=False, name="bad", boot_timeout=30)
    with pytest.raises(GuestBootError) as ei:
        g.boot()
    assert "qemu" in ei.value.console_tail.lower()  # QEMU's own complaint about the kernel
    saved = g.finish(test_failed=True, artifact_dir=tmp_path / "art")
    assert saved is not None and (saved / "console.log").read_text()
    assert (saved / "qemu-cmdline.txt").is_file()
    assert list((tmp_path / "run").iterdir()) == []  # run dir removed
