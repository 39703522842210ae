"""Host unit tests for vmimages (no network, no root, no QEMU)."""

from __future__ import annotations

import gzip
import lzma
import multiprocessing
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from vmimages import cache, initramfs, kernel, matrix, pin
from vmimages.image import INPUTRC_ADD, STATIC_FILES

# ----------------------------------------------------------------------------------------------
# matrix


def test_matrix_file_targets() -> None:
    ts = matrix.targets()
    assert set(ts) >= {"debian-5.10", "debian-6.1", "debian-6.12", "debian-7.2"}
    assert matrix.DEFAULT_TARGET == "debian-6.1" == matrix.load().default_target
    t = ts["debian-6.1"]
    assert t.suite == "bookworm"
    assert t.kernel_release == "6.1.0-54-amd64"
    assert t.headers_dir == "/usr/src/linux-headers-6.1.0-54-amd64"
    assert any(p.startswith("linux-image-6.1.0-54-amd64=") for p in t.kernel_packages)
    assert ts["debian-7.2"].sources.check_valid_until is False
    assert "bullseye-security" in ts["debian-5.10"].sources.apt_suites
    with pytest.raises(AttributeError):
        t.suite = "sid"  # type: ignore[misc]
    assert set(matrix.rootfs_list()) == {"bookworm", "trixie"}


MINI = """
default_target = "a"
guest_packages = ["python3"]
[suites.x]
apt_suites = ["x", "x-security"]
[rootfs.x]
suite = "x"
extra_packages = ["fio"]
[targets.a]
suite = "x"
kernel_release = "1.0-1-amd64"
kernel_packages = ["linux-image-1.0-1-amd64=1.0-1"]
headers_packages = ["linux-headers-1.0-1-amd64=1.0-1"]
"""


def test_matrix_parse_minimal() -> None:
    m = matrix.parse(MINI)
    assert m.targets["a"].build_packages == ("make", "gcc", "libc6-dev")
    assert m.rootfs["x"].packages == ("python3", "fio")
    src = m.suites["x"].sources_list()
    assert "debian-security x-security main" in src and "/debian x main" in src
    assert m.targets["a"].tool_packages == ()
    assert matrix.parse(MINI + 'tool_packages = ["dkms"]\n').targets["a"].tool_packages == ("dkms",)


def test_tool_packages_go_into_the_chroot_and_survive_pin() -> None:
    # dkms for tests/guest/test_dkms.py, in the bookworm chroot only: the trixie chroot (and with it
    # the debug kernel's cache key) does not change.
    from vmimages.chroot import chroot_packages

    t = matrix.targets()["debian-6.1"]
    assert "dkms" in t.tool_packages and "dkms" in chroot_packages("bookworm")
    assert not any(x.tool_packages for x in matrix.targets().values() if x.suite == "trixie")
    text = matrix.MATRIX_FILE.read_text()
    pins = pin.Pins(t.kernel_release, t.kernel_packages, t.headers_packages, ("make", "gcc-99"))
    assert (
        matrix.parse(pin.apply(text, "debian-6.1", pins)).targets["debian-6.1"].tool_packages
        == t.tool_packages
    )


@pytest.mark.parametrize(
    "bad",
    [
        MINI.replace('"linux-image-1.0-1-amd64=1.0-1"', '"linux-image-1.0-1-amd64"'),
        MINI.replace('default_target = "a"', 'default_target = "b"'),
        MINI.replace('kernel_release = "1.0-1-amd64"', ""),
    ],
)
def test_matrix_parse_errors(bad: str) -> None:
    with pytest.raises(matrix.MatrixError):
        matrix.parse(bad)


def test_pin_rewrites_only_the_target() -> None:
    text = matrix.MATRIX_FILE.read_text()
    t = matrix.targets()["debian-7.2"]
    pins = pin.Pins(t.kernel_release, t.kernel_packages, ("linux-headers-x=9",), t.build_packages)
    new = pin.apply(text, "debian-7.2", pins)
    m = matrix.parse(new)
    assert m.targets["debian-7.2"].headers_packages == ("linux-headers-x=9",)
    assert m.targets["debian-7.2"].kernel_packages == t.kernel_packages
    assert m.targets["debian-6.1"] == matrix.targets()["debian-6.1"]
    assert pin.apply(
        new, "debian-7.2", pin.Pins(t.kernel_release, t.kernel_packages, t.headers_packages, t.build_packages)
    ).count("[targets.") == text.count("[targets.")


# ----------------------------------------------------------------------------------------------
# cpio writer


def _sample_cpio(path: Path) -> None:
    with path.open("wb") as f:
        w = initramfs.CpioWriter(f)
        w.directory("bin")
        w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
        w.file("data", b"x" * 1001)
        w.file("empty", b"")
        w.symlink("bin/sh", "hello")
        w.chardev("console", 5, 1)
        w.trailer()


def test_cpio_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "a.cpio"
    _sample_cpio(out)
    data = out.read_bytes()
    assert len(data) % 512 == 0
    entries = initramfs.read_cpio(data)
    assert entries["bin/hello"] == (initramfs.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert entries["data"][1] == b"x" * 1001
    assert entries["bin/sh"] == (initramfs.S_IFLNK | 0o777, b"hello")
    assert entries["console"][0] == initramfs.S_IFCHR | 0o600
    with open(os.devnull, "wb") as f, pytest.raises(initramfs.InitramfsError):
        w = initramfs.CpioWriter(f)
        w.file("a", b"")
        w.file("a", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_tool_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "a.cpio"
    _sample_cpio(out)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=out.open("rb"), capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == ["bin", "bin/hello", "data", "empty", "bin/sh", "console"]
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "bin", "bin/hello", "data", "empty", "bin/sh"],
        stdin=out.open("rb"),
        cwd=dest,
        check=True,
    )
    assert (dest / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(dest / "bin/hello", os.X_OK)
    assert os.readlink(dest / "bin/sh") == "hello"
    assert (dest / "data").stat().st_size == 1001


# ----------------------------------------------------------------------------------------------
# initramfs module selection


def _fake_modules(d: Path) -> None:
    (d / "kernel").mkdir(parents=True)
    (d / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n"
        "kernel/lib/crc16.ko.xz:\n"
        "kernel/fs/jbd2/jbd2.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
    )
    (d / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")


def test_load_order(tmp_path: Path) -> None:
    _fake_modules(tmp_path)
    order = initramfs.load_order(tmp_path, ("virtio_pci", "virtio_blk", "ext4"), ("crc32c_intel", "crc16"))
    assert order == [
        ("kernel/drivers/block/virtio_blk.ko.xz", False),
        ("kernel/lib/crc16.ko.xz", False),
        ("kernel/fs/jbd2/jbd2.ko.xz", False),
        ("kernel/fs/ext4/ext4.ko.xz", False),
        ("kernel/arch/x86/crypto/crc32c-intel.ko.xz", True),
    ]
    with pytest.raises(initramfs.InitramfsError):
        initramfs.load_order(tmp_path, ("nonexistent",), ())


def test_write_initramfs(tmp_path: Path) -> None:
    mods = tmp_path / "m"
    _fake_modules(mods)
    for line in (mods / "modules.dep").read_text().splitlines():
        p = mods / line.split(":")[0]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(lzma.compress(b"ELF " + p.name.encode()))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BB")
    out = tmp_path / "i.cpio"
    names = initramfs.write_initramfs(out, mods, busybox=busybox)
    entries = initramfs.read_cpio(out.read_bytes())
    assert entries["modules/ext4.ko"][1] == b"ELF ext4.ko.xz"
    assert entries["modules/order"][1].decode().splitlines()[-1] == "crc32c-intel.ko optional"
    assert entries["init"][0] & 0o111
    assert entries["dev/console"][0] == initramfs.S_IFCHR | 0o600
    assert names[-1] == "crc32c-intel.ko"


def test_strip_signature() -> None:
    body, sig = b"\x7fELF module body", b"S" * 300
    info = bytes(8) + len(sig).to_bytes(4, "big")
    signed = body + sig + info + initramfs.SIG_MARKER
    assert initramfs.strip_signature(signed) == body
    assert initramfs.strip_signature(body) == body
    bad = body + bytes(8) + (10**6).to_bytes(4, "big") + initramfs.SIG_MARKER
    with pytest.raises(initramfs.InitramfsError, match="malformed module signature"):
        initramfs.strip_signature(bad)


def test_guest_scripts_parse() -> None:
    guest = Path(matrix.__file__).with_name("guest")
    subprocess.run(["bash", "-n", str(guest / "testinit")], check=True)
    if shutil.which("busybox"):
        subprocess.run(["busybox", "sh", "-n", str(guest / "initrd-init")], check=True)
    text = (guest / "testinit").read_text()
    for marker in ("TESTINIT-START", "TESTINIT-END rc=", "TESTINIT-FAIL", "poweroff -f", "umount -a -r"):
        assert marker in text
    assert "sysrq-trigger" not in text and "dmesg -n" not in text
    assert b"set enable-bracketed-paste off" in INPUTRC_ADD
    assert STATIC_FILES["etc/hostname"][0] == b"guest\n"


# ----------------------------------------------------------------------------------------------
# vmlinux extraction


def _fake_elf(pvh: bool = True) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment (Xen PHYS32_ENTRY note when pvh)."""
    note_name = b"Xen\0"
    note = struct.pack("<III", len(note_name), 4, 18 if pvh else 5) + note_name + struct.pack("<I", 0x1000000)
    phoff = 64
    note_off = phoff + 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note + bytes(range(256)) * 16 + bytes(8192)


def _bzimage(payload: bytes, with_header: bool) -> bytes:
    setup_sects = 3
    setup = bytearray((setup_sects + 1) * 512)
    pm = b"\x90" * 1000  # "decompressor" code before the payload
    if with_header:
        setup[0x1F1] = setup_sects
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<II", setup, 0x248, len(pm), len(payload))
    return bytes(setup) + pm + payload + b"\0" * 300


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd", "lz4"])
@pytest.mark.parametrize("with_header", [True, False])
def test_extract_vmlinux(kind: str, with_header: bool) -> None:
    elf = _fake_elf()
    if kind == "xz":
        comp = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "gzip":
        comp = gzip.compress(elf)
    else:
        if shutil.which(kind) is None:
            pytest.skip(f"{kind} not installed")
        args = [kind, "-c", "-q"] + (["-l"] if kind == "lz4" else [])
        comp = subprocess.run(args, input=elf, capture_output=True, check=True).stdout
    comp += struct.pack("<I", len(elf))  # the kernel build appends the size
    image = _bzimage(comp, with_header)
    out = kernel.extract_vmlinux(image)
    assert out == elf
    assert kernel.has_pvh_note(out)
    assert kernel.detect(comp) == kind


def test_extract_vmlinux_errors() -> None:
    assert not kernel.has_pvh_note(_fake_elf(pvh=False))
    with pytest.raises(kernel.KernelError):
        kernel.extract_vmlinux(_bzimage(b"\xfd7zXZ\x00garbage", True))
    assert kernel.extract_vmlinux(_fake_elf()) == _fake_elf()  # already an ELF


def test_module_name() -> None:
    assert kernel.module_name("kernel/drivers/md/dm-mod.ko.xz") == "dm_mod"
    assert kernel.module_name("kernel/fs/ext4/ext4.ko") == "ext4"
    assert kernel.module_name("a/crc32c-intel.ko.zst") == "crc32c_intel"


# ----------------------------------------------------------------------------------------------
# cache keys, locks, atomic artifacts


def test_key_stability() -> None:
    k = cache.key_of("a", 1, {"x": [1, 2], "y": b"bytes"}, b"raw")
    assert k == cache.key_of("a", 1, {"y": b"bytes", "x": [1, 2]}, b"raw")
    assert len(k) == 16 and int(k, 16) >= 0
    assert k != cache.key_of("a", 1, {"x": [2, 1], "y": b"bytes"}, b"raw")
    assert cache.key_of(b"ab", b"c") != cache.key_of(b"a", b"bc")
    # Pinned value: a change here invalidates every user's cache; do it on purpose only.
    assert cache.key_of("stable") == "e2b786b61c47cf18"


def test_tree_key(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.c").write_text("int x;\n")
    (tmp_path / "sub/Makefile").write_text("obj-m := a.o\n")
    k1 = cache.tree_key(tmp_path)
    for junk in ("a.o", "a.ko", ".a.o.cmd", "modules.order", "Module.symvers", "a.mod.c"):
        (tmp_path / junk).write_text("junk")
    assert cache.tree_key(tmp_path) == k1
    os.chmod(tmp_path / "a.c", 0o755)
    k2 = cache.tree_key(tmp_path)
    assert k2 != k1
    (tmp_path / "a.c").write_text("int y;\n")
    assert cache.tree_key(tmp_path) not in (k1, k2)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBD_CACHE_DIR", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DBD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x" / "dattobd-harness"


def test_artifact_builds_once_across_threads(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(d: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (d / "f").write_text("ok")

    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                cache.Artifact("k", "n", "0123456789abcdef", tmp_path).ensure(build)
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert {r.name for r in results} == {"n-0123456789abcdef"}
    assert (results[0] / "f").read_text() == "ok"
    assert [p.name for p in (tmp_path / "k").iterdir() if p.name != ".locks"] == ["n-0123456789abcdef"]


def test_artifact_failure_leaves_nothing(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        (d / "partial").write_text("x")
        raise RuntimeError("boom")

    art = cache.Artifact("k", "n", "0123456789abcdef", tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        art.ensure(build)
    assert not art.exists()
    assert [p.name for p in (tmp_path / "k").iterdir()] == [".locks"]


def test_artifact_prunes_old_keys(tmp_path: Path) -> None:
    old = cache.Artifact("k", "debian-6.1", "0" * 16, tmp_path)
    recent = cache.Artifact("k", "debian-6.1", "3" * 16, tmp_path)
    other = cache.Artifact("k", "debian-6.12", "1" * 16, tmp_path)
    for a in (old, recent, other):
        a.ensure(lambda d: None)
    long_ago = time.time() - cache.PRUNE_AFTER - 10
    os.utime(old.path, (long_ago, long_ago))
    os.utime(other.path, (long_ago, long_ago))
    new = cache.Artifact("k", "debian-6.1", "2" * 16, tmp_path)
    new.ensure(lambda d: None)
    # the unused old key goes; a recently used one and other artifacts stay
    assert not old.exists() and recent.exists() and other.exists() and new.exists()
    recent.ensure(lambda d: None)  # a hit records the use
    assert time.time() - recent.path.stat().st_mtime < 60


def _hold_lock(path: str, ready: object, release: object) -> None:
    with cache.locked(Path(path)):
        ready.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


def test_lock_excludes_other_process(tmp_path: Path) -> None:
    lock = tmp_path / "a.lock"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(lock), ready, release))
    p.start()
    assert ready.wait(10)
    got = threading.Event()

    def take() -> None:
        with cache.locked(lock):
            got.set()

    t = threading.Thread(target=take)
    t.start()
    assert not got.wait(0.3)  # blocked while the other process holds it
    release.set()
    assert got.wait(10)
    t.join()
    p.join(10)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_tree_key_respects_gitignore(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("generated/\n")
    (tmp_path / "a.c").write_text("int x;\n")
    k1 = cache.tree_key(tmp_path)
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated/config.h").write_text("#define X 1\n")
    (tmp_path / "a.o").write_text("obj")
    assert cache.tree_key(tmp_path) == k1
    assert [p.name for p in cache.source_files(tmp_path)] == [".gitignore", "a.c"]
    (tmp_path / "new.h").write_text("")  # untracked, not ignored: part of the source
    assert cache.tree_key(tmp_path) != k1


def test_priority_slots_order() -> None:
    from vmimages.cli import PrioritySlots

    slots = PrioritySlots(1)
    order: list[str] = []
    hold = threading.Event()

    def first() -> None:
        with slots.slot(0):
            hold.wait(5)
            order.append("first")

    def waiter(name: str, prio: int) -> None:
        with slots.slot(prio):
            order.append(name)

    t0 = threading.Thread(target=first)
    t0.start()
    time.sleep(0.1)
    ts = [threading.Thread(target=waiter, args=(n, p)) for n, p in (("low", 3), ("high", 1), ("mid", 2))]
    for t in ts:
        t.start()
        time.sleep(0.05)
    hold.set()
    for t in [t0, *ts]:
        t.join(5)
    assert order == ["first", "high", "mid", "low"]


class _FakeApt:
    VERSIONS: ClassVar[dict[str, str]] = {
        "linux-image-6.1.0-54-amd64": "6.1.190-1",
        "linux-image-6.1.0-56-amd64": "6.1.192-2",
        "linux-image-6.1.0-56-cloud-amd64": "6.1.192-2",
        "linux-image-6.12-amd64": "6.12.117-1~deb12u1",
        "linux-image-6.12.117+deb12-amd64": "6.12.117-1~deb12u1",
        "linux-image-6.12.117+deb13-amd64": "6.12.117-1",
        "linux-image-6.12.118+deb13-amd64": "6.12.118-1",
        "linux-image-6.12.115+deb13.1-amd64": "6.12.115-2",
    }

    def candidate(self, name: str) -> str | None:
        return self.VERSIONS.get(name)

    def pkgnames(self, prefix: str) -> list[str]:
        return sorted(n for n in self.VERSIONS if n.startswith(prefix))


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg --compare-versions")
def test_pin_latest_release_stays_in_series() -> None:
    apt = _FakeApt()
    assert pin.latest_release(apt, "6.1.0-54-amd64") == "6.1.0-56-amd64"  # type: ignore[arg-type]
    assert pin.latest_release(apt, "6.12.117+deb13-amd64") == "6.12.118+deb13-amd64"  # type: ignore[arg-type]


def test_append_overlay_adds_a_second_archive(tmp_path: Path) -> None:
    base = tmp_path / "base.cpio"
    _sample_cpio(base)
    out = initramfs.append_overlay(
        base,
        tmp_path / "o.cpio",
        {"etc/x/y": (b"hi", 0o755), "premount": (b"#!/bin/sh\n", 0o755)},
        ("blkid",),
    )
    data = out.read_bytes()
    assert data.startswith(base.read_bytes())
    overlay = initramfs.read_cpio(data[len(base.read_bytes()) :])
    assert overlay["etc/x/y"] == (0o100755, b"hi")
    assert overlay["premount"][1] == b"#!/bin/sh\n"
    assert overlay["etc"][0] & 0o170000 == 0o040000 and overlay["etc/x"][0] & 0o170000 == 0o040000
    assert overlay["bin/blkid"] == (0o120777, b"busybox")


SOURCE_TARGET = """
[targets.dbg]
suite = "x"
kernel_release = "1.0-dbg"
source_package = "linux-source-1.0=1.0-1"
config_fragment = "debug-guest.config"
debug = true
"""


def test_matrix_source_target() -> None:
    m = matrix.parse(MINI + SOURCE_TARGET)
    t = m.targets["dbg"]
    assert t.built_from_source and t.debug and t.headers_dir == "/kbuild/out"
    assert not m.targets["a"].built_from_source and not m.targets["a"].debug
    for bad in (
        SOURCE_TARGET.replace('config_fragment = "debug-guest.config"', ""),
        SOURCE_TARGET + 'kernel_packages = ["linux-image-x=1"]\n',
        SOURCE_TARGET.replace('"linux-source-1.0=1.0-1"', '"linux-source-1.0"'),
        SOURCE_TARGET.replace('source_package = "linux-source-1.0=1.0-1"', ""),
    ):
        with pytest.raises(matrix.MatrixError):
            matrix.parse(MINI + bad)


def test_debug_fragment_is_checked_option_by_option() -> None:
    from vmimages import srckernel

    wanted = srckernel.parse_fragment(
        'CONFIG_KASAN=y\n# CONFIG_DRM is not set\nCONFIG_LOCALVERSION="-x"\n# a comment\n'
    )
    assert wanted == {"CONFIG_KASAN": "y", "CONFIG_DRM": "n", "CONFIG_LOCALVERSION": '"-x"'}
    final = {"CONFIG_KASAN": "y", "CONFIG_LOCALVERSION": '"-x"'}
    assert srckernel.config_mismatches(wanted, final) == []  # absent counts as "not set"
    final = {"CONFIG_DRM": "m", "CONFIG_LOCALVERSION": '"-x"'}
    assert srckernel.config_mismatches(wanted, final) == ["CONFIG_KASAN=y (got n)", "CONFIG_DRM=n (got m)"]
    # the real fragment asks for the debug options the CI issue names
    real = srckernel.parse_fragment((srckernel.KCONFIG_DIR / "debug-guest.config").read_text())
    for opt in ("KASAN", "PROVE_LOCKING", "DEBUG_ATOMIC_SLEEP", "DEBUG_KMEMLEAK", "DEBUG_OBJECTS"):
        assert real[f"CONFIG_{opt}"] == "y"
