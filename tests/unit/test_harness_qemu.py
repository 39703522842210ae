"""QEMU command line, run dirs and disks (host only; no guest is started)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.qemu import (
    DiskSpec,
    QemuConfig,
    RunDir,
    Share,
    build_command,
    create_disk,
    create_overlay,
    guest_disk_name,
    kernel_cmdline,
)


def _cfg(tmp_path: Path, **kw: object) -> QemuConfig:
    base = dict(
        vmlinux=Path("/img/vmlinux"),
        initrd=Path("/img/initrd"),
        root_overlay=tmp_path / "root.qcow2",
        qmp_socket=tmp_path / "qmp.sock",
        disks=[(tmp_path / "disk0.raw", DiskSpec(256)), (tmp_path / "disk1.qcow2", DiskSpec(64, "qcow2"))],
        shares=[Share("src", Path("/repo"), "/src", readonly=True), Share("xchg", tmp_path / "x", "/xchg")],
        qemu="qemu-system-x86_64",
    )
    base.update(kw)
    return QemuConfig(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line_tcg(tmp_path: Path) -> None:
    argv = build_command(_cfg(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-accel") == ["tcg"] and _opt(argv, "-cpu") == ["qemu64,+rdrand"]
    assert _opt(argv, "-m") == ["1024"] and _opt(argv, "-smp") == ["2"]
    # one vCPU under TCG: a second possible (never online) one keeps the guest's barriers
    assert _opt(build_command(_cfg(tmp_path, smp=1)), "-smp") == ["1,maxcpus=2"]
    # kernels that leave stale breakpoints under multi-threaded TCG get one thread for all vCPUs
    assert _opt(build_command(_cfg(tmp_path, kernel_release="7.2.13+deb14-amd64")), "-accel") == [
        "tcg,thread=single"
    ]
    assert _opt(build_command(_cfg(tmp_path, kernel_release="6.12.117+deb13-amd64")), "-accel") == ["tcg"]
    assert _opt(build_command(_cfg(tmp_path, kernel_release="7.2.0", accel="kvm")), "-accel") == ["kvm"]
    assert _opt(argv, "-kernel") == ["/img/vmlinux"] and _opt(argv, "-initrd") == ["/img/initrd"]
    assert _opt(argv, "-monitor") == ["none"] and "-nographic" not in argv
    assert _opt(argv, "-serial") == ["chardev:con0"] and "signal=off" in _opt(argv, "-chardev")[0]
    drives = _opt(argv, "-drive")
    assert drives[0].startswith(f"file={tmp_path}/root.qcow2,if=virtio,format=qcow2")
    assert drives[1].startswith(f"file={tmp_path}/disk0.raw,if=virtio,format=raw")
    assert drives[2].startswith(f"file={tmp_path}/disk1.qcow2,if=virtio,format=qcow2")
    assert drives[1].endswith(",discard=unmap") and "discard" not in drives[0]
    virtfs = _opt(argv, "-virtfs")
    assert (
        virtfs[0].startswith("local,path=/repo,mount_tag=src,security_model=none")
        and "readonly=on" in virtfs[0]
    )
    assert "mount_tag=xchg" in virtfs[1] and "readonly" not in virtfs[1]
    assert _opt(argv, "-qmp") == [f"unix:{tmp_path}/qmp.sock,server=on,wait=off"]
    assert _opt(argv, "-action") == ["reboot=shutdown"] and "-no-reboot" not in argv


def test_command_line_kvm_and_batch(tmp_path: Path) -> None:
    argv = build_command(
        _cfg(tmp_path, accel="kvm", memory_mib=2048, smp=1, no_reboot=True, batch_cmd="/xchg/b.sh")
    )
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-m") == ["2048"] and _opt(argv, "-smp") == ["1"]
    assert "-no-reboot" in argv and "-action" not in argv
    assert _opt(argv, "-append")[0].endswith("dbd.cmd=/xchg/b.sh")


def test_kernel_cmdline(tmp_path: Path) -> None:
    line = kernel_cmdline(_cfg(tmp_path, append_extra=("loglevel=7",)))
    assert line.split() == [
        "root=/dev/vda", "rw", "console=ttyS0", "init=/usr/sbin/testinit", "panic=-1",
        "no_timer_check", "pci=noacpi", "cryptomgr.notests",
        "dbd.9p=src:/src:ro,xchg:/xchg", "loglevel=7",
    ]  # fmt: skip


def test_run_dirs_are_unique_and_short(tmp_path: Path) -> None:
    a = RunDir.create("tests/guest/test_x.py::test_a[debian-6.1]", base=tmp_path)
    b = RunDir.create("tests/guest/test_x.py::test_a[debian-6.1]", base=tmp_path)
    assert a.path != b.path and a.xchg.is_dir() and b.xchg.is_dir()
    assert len(str(a.qmp_socket.relative_to(tmp_path))) < 50
    a.remove()
    assert not a.path.exists() and b.path.exists()


def test_disks_sparse_raw_and_qcow2(tmp_path: Path) -> None:
    raw = create_disk(DiskSpec(1024), tmp_path, 0)
    assert raw.stat().st_size == 1 << 30 and raw.stat().st_blocks == 0
    q = create_disk(DiskSpec(128, "qcow2"), tmp_path, 1)
    info = subprocess.run(["qemu-img", "info", str(q)], capture_output=True, text=True, check=True).stdout
    assert "file format: qcow2" in info and "128 MiB" in info
    existing = tmp_path / "mine.img"
    assert create_disk(DiskSpec(path=existing), tmp_path, 2) == existing
    assert [guest_disk_name(i) for i in range(3)] == ["/dev/vdb", "/dev/vdc", "/dev/vdd"]


def test_overlay_points_at_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    create_overlay(base, tmp_path / "ov.qcow2")
    info = subprocess.run(
        ["qemu-img", "info", str(tmp_path / "ov.qcow2")], capture_output=True, text=True
    ).stdout
    assert f"backing file: {base}" in info and "backing file format: qcow2" in info


def test_overlay_of_missing_base_fails(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        create_overlay(tmp_path / "nope.qcow2", tmp_path / "ov.qcow2")


def test_firmware_qboot_by_default_seabios_or_a_rom_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness import qemu

    rom = tmp_path / "qboot.rom"
    rom.write_bytes(b"\0" * 16)
    monkeypatch.setattr(qemu, "QBOOT", rom)
    monkeypatch.delenv("DBD_FIRMWARE", raising=False)
    assert _opt(build_command(_cfg(tmp_path)), "-bios") == [str(rom)]
    monkeypatch.setenv("DBD_FIRMWARE", "seabios")
    assert "-bios" not in build_command(_cfg(tmp_path))
    other = tmp_path / "other.rom"
    other.write_bytes(b"\0")
    monkeypatch.setenv("DBD_FIRMWARE", str(other))
    assert _opt(build_command(_cfg(tmp_path)), "-bios") == [str(other)]
    monkeypatch.setenv("DBD_FIRMWARE", str(tmp_path / "missing.rom"))
    with pytest.raises(FileNotFoundError, match=r"missing\.rom"):
        build_command(_cfg(tmp_path))
    # a QEMU without qboot falls back to its default firmware
    monkeypatch.delenv("DBD_FIRMWARE")
    monkeypatch.setattr(qemu, "QBOOT", tmp_path / "absent.rom")
    assert "-bios" not in build_command(_cfg(tmp_path))
