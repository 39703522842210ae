"""Tiny initramfs per kernel: uncompressed newc cpio with static busybox and the root-disk modules."""

from __future__ import annotations

import io
import lzma
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Artifact, file_digest, key_of
from .kernel import KernelFiles, module_name, read_builtin, read_modules_dep
from .matrix import Target
from .progress import Progress

INIT_SCRIPT = Path(__file__).with_name("guest") / "initrd-init"
BUSYBOX = Path("/bin/busybox")
# Modules for the root disk (virtio-blk, ext4). Missing-and-not-builtin is an error for REQUIRED,
# fine for the others (alternatives across kernel versions).
ROOT_MODULES_REQUIRED = ("virtio_pci", "virtio_blk", "ext4")
ROOT_MODULES_OPTIONAL = ("crc32c_generic", "crc32c_intel", "crc16", "jbd2", "mbcache", "libcrc32c")
# Loaded here too, although not needed for the root disk: testinit would otherwise spend about a
# second in kmod's modprobe (dynamically linked, cold page cache under TCG) for the entropy source
# and the 9p shares. Optional: testinit falls back to modprobe for anything missing.
EARLY_MODULES_OPTIONAL = ("virtio_rng", "9pnet_virtio", "9p")

INITRAMFS_FORMAT = 2  # bump when the cpio layout or module selection logic changes
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


class InitramfsError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# newc cpio writer


@dataclass
class CpioWriter:
    """Writes an uncompressed "newc" (070701) cpio archive, all files owned by root, mtime 0."""

    out: io.BufferedIOBase | io.BytesIO
    _ino: int = 1
    _names: set[str] = field(default_factory=set)

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1
    ) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise InitramfsError(f"duplicate cpio entry {name}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out.write(hdr + encoded + b"\0" * (-(len(hdr) + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, S_IFCHR | mode, rdev=(major, minor))

    def trailer(self) -> None:
        self._ino = 0
        self._entry("TRAILER!!!", 0, nlink=1)
        self.out.write(b"\0" * (-self.out.tell() % 512))


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into name -> (mode, data); used by tests and debugging."""
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        if data[off : off + 6] != b"070701":
            raise InitramfsError(f"bad cpio magic at {off}")
        vals = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = vals[1], vals[6], vals[11]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[off : off + size])
        off += size
        off += -off % 4


# ---------------------------------------------------------------------------------------------
# module selection


def load_order(module_dir: Path, required: Iterable[str], optional: Iterable[str]) -> list[tuple[str, bool]]:
    """(relative path, optional) of the modules to insmod, dependencies first (from modules.dep).

    A module is optional unless a required module needs it.
    """
    deps = read_modules_dep(module_dir)
    builtin = read_builtin(module_dir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        # modules.dep lists the full (transitive) dependency set; visit them first anyway.
        for dep in deps[module_name(path)][1]:
            visit(dep)
        order.append(path)

    for name in required:
        if name in deps:
            visit(deps[name][0])
        elif name not in builtin:
            raise InitramfsError(f"{module_dir}: module {name} is neither modular nor built in")
    needed = set(order)
    for name in optional:
        if name in deps:
            visit(deps[name][0])
    return [(path, path not in needed) for path in order]


SIG_MARKER = b"~Module signature appended~\n"
SIG_INFO_LEN = 12  # struct module_signature: 8 bytes of ids and lengths, then __be32 sig_len


def strip_signature(ko: bytes) -> bytes:
    """The module without its appended signature (unchanged if it has none).

    Checking a signature costs tens of milliseconds per module under TCG; our own module is
    unsigned anyway, so the guest kernel is tainted either way.
    """
    if not ko.endswith(SIG_MARKER):
        return ko
    end = len(ko) - len(SIG_MARKER)
    sig_len = int.from_bytes(ko[end - 4 : end], "big")
    start = end - SIG_INFO_LEN - sig_len
    if start <= 0:
        raise InitramfsError(f"malformed module signature (sig_len {sig_len}, module {len(ko)} bytes)")
    return ko[:start]


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = zlib.decompress(data, wbits=31)
    elif path.name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dcq"], input=data, stdout=subprocess.PIPE, check=True).stdout
    return strip_signature(data)


def plain_name(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    for ext in (".xz", ".gz", ".zst"):
        base = base.removesuffix(ext)
    return base


def write_initramfs(
    out: Path, module_dir: Path, busybox: Path = BUSYBOX, init: Path = INIT_SCRIPT
) -> list[str]:
    """Write the initramfs; returns the module load order (plain .ko names)."""
    order = load_order(module_dir, ROOT_MODULES_REQUIRED, ROOT_MODULES_OPTIONAL + EARLY_MODULES_OPTIONAL)
    names = [plain_name(rel) for rel, _opt in order]
    with out.open("wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules", "tmp", "run"):
            w.directory(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in (
            "sh",
            "mount",
            "umount",
            "insmod",
            "switch_root",
            "sleep",
            "cat",
            "ls",
            "tr",
            "findfs",
            "sync",
            "poweroff",
        ):
            w.symlink(f"bin/{applet}", "busybox")
        w.file("init", init.read_bytes(), 0o755)
        lines = []
        for (rel, optional), name in zip(order, names, strict=True):
            w.file(f"modules/{name}", module_bytes(module_dir / rel))
            lines.append(f"{name} optional\n" if optional else f"{name}\n")
        w.file("modules/order", "".join(lines).encode())
        w.trailer()
    return names


def initramfs_key(kernel: KernelFiles, kernel_key: str) -> str:
    return key_of(
        "initramfs",
        INITRAMFS_FORMAT,
        kernel_key,
        kernel.release,
        INIT_SCRIPT.read_bytes(),
        file_digest(BUSYBOX),
        ROOT_MODULES_REQUIRED,
        ROOT_MODULES_OPTIONAL,
        EARLY_MODULES_OPTIONAL,
    )


def ensure_initramfs(target: Target, kernel: KernelFiles, kernel_key: str, progress: Progress) -> Path:
    art = Artifact("initrd", target.name, initramfs_key(kernel, kernel_key))

    def build(tmp: Path) -> None:
        with progress.step(f"{target.name}: initramfs"):
            write_initramfs(tmp / "initrd.cpio", kernel.module_dir)

    return art.ensure(build) / "initrd.cpio"


def append_overlay(
    base: Path, out: Path, files: dict[str, tuple[bytes, int]], links: Iterable[str] = ()
) -> Path:
    """Write `out` = the initramfs `base` followed by a second cpio archive holding `files`
    (guest path -> (content, mode)) and busybox applet symlinks `links` in bin/. The kernel unpacks
    concatenated archives in order, so the overlay adds to (or replaces parts of) the base without
    rebuilding it. Directories of `files` are created as needed."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    made: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                w.directory(d)
                made.add(d)
        data, mode = files[name]
        w.file(name, data, mode)
    for applet in links:
        w.symlink(f"bin/{applet}", "busybox")
    w.trailer()
    out.write_bytes(base.read_bytes() + buf.getvalue())
    return out
