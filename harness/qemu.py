"""QEMU command line and per-guest run directory (overlay, data disks, 9p exchange dir, QMP socket).

Every guest gets its own run dir made by mkdtemp under `$DBD_RUN_DIR` (default /tmp/dbd-run), so
parallel pytest workers never share sockets, overlays or exchange dirs. The path is kept short because
the QMP unix socket lives in it (sun_path is limited to 107 bytes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harness.accel import cpu_model, qemu_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC_TAG, SRC_MOUNT = "src", "/src"
XCHG_TAG, XCHG_MOUNT = "xchg", "/xchg"
# no_timer_check: under TCG on a busy host the IO-APIC timer check can fail and panic 5.10 at boot
# ("IO-APIC + timer doesn't work!"); the check only guards against broken physical chipsets.
# Boot time under TCG (benchmarks/guest_boot.py): pci=noacpi routes PCI interrupts without the ACPI
# interpreter (about 0.25 s per virtio device otherwise); cryptomgr.notests skips the crypto
# self-tests that late_initcall otherwise runs for about 0.7 s. Neither touches the block layer.
BASE_APPEND = (
    "root=/dev/vda",
    "rw",
    "console=ttyS0",
    "init=/usr/sbin/testinit",
    "panic=-1",
    "no_timer_check",
    "pci=noacpi",
    "cryptomgr.notests",
)


# Firmware: qboot, QEMU's minimal BIOS (qemu-system-data ships it), instead of SeaBIOS. It only
# loads the -kernel/-initrd from fw_cfg and jumps to it: the kernel's first line comes about 0.45 s
# sooner under TCG (benchmarks/guest_boot.py). ACPI tables, SMP, PCI, reset and power-off work as
# with SeaBIOS. DBD_FIRMWARE=seabios (QEMU's default) or a ROM path overrides it.
QBOOT = Path("/usr/share/qemu/qboot.rom")


def default_firmware() -> Path | None:
    """The -bios ROM for test guests: None means QEMU's default (SeaBIOS)."""
    choice = os.environ.get("DBD_FIRMWARE", "qboot")
    if choice == "seabios":
        return None
    rom = QBOOT if choice == "qboot" else Path(choice)
    if choice != "qboot" and not rom.is_file():
        raise FileNotFoundError(f"DBD_FIRMWARE={choice}: no such ROM file (use qboot, seabios or a path)")
    return rom if rom.is_file() else None  # an older QEMU without qboot: SeaBIOS


@dataclass(frozen=True)
class DiskSpec:
    """A data disk attached after the root disk (first one is /dev/vdb, then /dev/vdc, ...).

    A fresh sparse image of `size_mib` is made per guest unless `path` names an existing image, which is
    then used as is and never deleted.
    """

    size_mib: int = 256
    fmt: Literal["raw", "qcow2"] = "raw"
    path: Path | None = None
    cache: str = "writeback"
    # The guest sees a discard-capable disk (fstrim, discard mounts); QEMU punches holes in the image.
    discard: bool = True


@dataclass(frozen=True)
class Share:
    """A 9p (virtio) share mounted by testinit through `dbd.9p=TAG:MOUNTPOINT[:ro]`."""

    tag: str
    host_path: Path
    guest_path: str
    readonly: bool = False


@dataclass
class QemuConfig:
    vmlinux: Path
    initrd: Path
    root_overlay: Path
    qmp_socket: Path
    disks: list[tuple[Path, DiskSpec]] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    accel: str = "tcg"
    memory_mib: int = 1024
    smp: int = 2
    append_extra: Sequence[str] = ()
    batch_cmd: str | None = None  # guest path of a script run by testinit (dbd.cmd=)
    no_reboot: bool = False  # batch runs only: a reset (or panic) ends QEMU
    qemu: str = field(default_factory=qemu_binary)
    kernel_release: str = ""  # the guest kernel's `uname -r` (chooses TCG's threading)
    firmware: Path | None = field(default_factory=default_firmware)


def kernel_cmdline(cfg: QemuConfig) -> str:
    args = list(BASE_APPEND)
    if cfg.shares:
        args.append(
            "dbd.9p=" + ",".join(f"{s.tag}:{s.guest_path}{':ro' if s.readonly else ''}" for s in cfg.shares)
        )
    if cfg.batch_cmd:
        args.append(f"dbd.cmd={cfg.batch_cmd}")
    args.extend(cfg.append_extra)
    return " ".join(args)


def smp_option(smp: int, accel: str) -> str:
    """The -smp value: `smp` vCPUs online, and under TCG at least two possible.

    With max_cpus 1, TCG translates without CF_PARALLEL: it drops the guest's memory barriers (and
    its locked instructions become plain ones), since no other vCPU could tell. QEMU's own I/O
    thread can: virtio's event-index handshake is a store then a load on each side (the guest
    writes used_event and rereads used.idx; QEMU writes used.idx and rereads used_event), and
    without the guest's barrier the host's store buffer lets both read the old value. QEMU then
    skips the completion interrupt, the guest waits for it, and every later completion on that
    queue is past the event too: the disk hangs for good. A 5.10 benchmark guest showed exactly
    that in an untracked phase (doc/harness.md, "Lost interrupts under TCG"). A second possible
    vCPU, never brought online, keeps the guest on one CPU and TCG's translation honest (QEMU 8.1
    stopped eliding them; Debian 12 ships 7.2)."""
    if accel == "tcg" and smp < 2:
        return f"{smp},maxcpus=2"
    return str(smp)


# Guest kernels from this release on patch their text in a way that QEMU 7.2's multi-threaded TCG
# can leave a vCPU executing a breakpoint the kernel already removed: "Oops: int3" in early boot
# (doc/harness.md, "Stale breakpoints under TCG"). One host thread for all vCPUs keeps every
# vCPU's view of kernel text coherent.
SINGLE_THREAD_TCG_FROM = (7, 0)


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string; (0, 0) when it does not start with one."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def accel_option(accel: str, kernel_release: str) -> str:
    """The -accel value: TCG runs single-threaded for guest kernels from SINGLE_THREAD_TCG_FROM on."""
    if accel == "tcg" and kernel_version(kernel_release) >= SINGLE_THREAD_TCG_FROM:
        return "tcg,thread=single"
    return accel


def build_command(cfg: QemuConfig) -> list[str]:
    """The full argv. The serial console is QEMU's stdio (no monitor, no mux, Ctrl-C/Ctrl-A pass through)."""
    argv = [
        cfg.qemu,
        "-machine", "pc", "-accel", accel_option(cfg.accel, cfg.kernel_release), "-cpu", cpu_model(cfg.accel),
        "-m", str(cfg.memory_mib), "-smp", smp_option(cfg.smp, cfg.accel),
        *(["-bios", str(cfg.firmware)] if cfg.firmware else []),
        "-nodefaults", "-display", "none", "-monitor", "none",
        "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
        "-kernel", str(cfg.vmlinux), "-initrd", str(cfg.initrd), "-append", kernel_cmdline(cfg),
        "-drive", f"file={cfg.root_overlay},if=virtio,format=qcow2,cache=unsafe",
    ]  # fmt: skip
    for path, spec in cfg.disks:
        discard = ",discard=unmap" if spec.discard else ""
        argv += ["-drive", f"file={path},if=virtio,format={spec.fmt},cache={spec.cache}{discard}"]
    for s in cfg.shares:
        opts = f"local,path={s.host_path},mount_tag={s.tag},security_model=none,multidevs=remap"
        argv += ["-virtfs", opts + (",readonly=on" if s.readonly else "")]
    argv += ["-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off"]
    # A reset (guest reboot, kernel panic with panic=-1, QMP system_reset) ends QEMU unless the harness
    # switched the action to "reset" over QMP (power cuts, clean reboots).
    argv += ["-no-reboot"] if cfg.no_reboot else ["-action", "reboot=shutdown"]
    return argv


def format_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run_base_dir() -> Path:
    return Path(os.environ.get("DBD_RUN_DIR", "/tmp/dbd-run"))


class RunDir:
    """A per-guest scratch directory: overlay, data disks, exchange dir, QMP socket, console log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.xchg = path / "xchg"
        self.qmp_socket = path / "qmp.sock"
        self.console_log = path / "console.log"
        self.commands_log = path / "commands.log"
        self.root_overlay = path / "root.qcow2"

    @classmethod
    def create(cls, name: str, base: Path | None = None) -> RunDir:
        base = base or run_base_dir()
        base.mkdir(parents=True, exist_ok=True)
        short = name.rsplit("::", 1)[-1].removeprefix("test_")  # a pytest node id -> the test name
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", short).strip("-")[:24] or "guest"
        rd = cls(Path(tempfile.mkdtemp(prefix=slug + "-", dir=base)))
        rd.xchg.mkdir()
        return rd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 overlay on the read-only base image (18 ms); the base is never written."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", "qcow2", str(overlay)],
        check=True,
        capture_output=True,
    )


def create_disk(spec: DiskSpec, directory: Path, index: int) -> Path:
    """Make the image for a data disk (sparse raw or empty qcow2); existing `spec.path` is used as is."""
    if spec.path is not None:
        return spec.path
    path = directory / f"disk{index}.{spec.fmt}"
    if spec.fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(spec.size_mib << 20)
    else:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{spec.size_mib}M"],
            check=True,
            capture_output=True,
        )
    return path


def guest_disk_name(index: int) -> str:
    """Guest device of data disk `index` (0 -> /dev/vdb; /dev/vda is the root disk)."""
    return "/dev/vd" + chr(ord("b") + index)
