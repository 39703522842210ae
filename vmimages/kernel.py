"""Fetch a target's kernel debs, extract the PVH vmlinux and a trimmed, depmod'ed module tree."""

from __future__ import annotations

import bz2
import functools
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from .apt import PrivateApt, extract_debs, run
from .cache import Artifact, key_of
from .matrix import Target
from .progress import Progress
from .srckernel import build_source_kernel, source_key

# Bump when the layout or content of the kernel artifact changes.
KERNEL_FORMAT = 2

# Parts of lib/modules/<rel>/kernel kept for the guest (see guest-pipeline-notes.md §1).
MODULE_SUBDIRS = (
    "arch",
    "block",
    "crypto",
    "fs",
    "lib",
    "mm",
    "virt",
    "net/9p",
    "net/vmw_vsock",
    "drivers/virtio",
    "drivers/block",
    "drivers/char",
    "drivers/scsi",
    "drivers/md",
    "drivers/nvdimm",
    "drivers/acpi",
    "drivers/base",
    "drivers/input",
    "drivers/tty",
    "drivers/firmware",
)
# Must be loadable (modular or built in) in every guest.
REQUIRED_MODULES = (
    "dm_mod",
    "dm_snapshot",
    "dm_log_writes",
    "dm_flakey",
    "loop",
    "9p",
    "9pnet_virtio",
    "xfs",
    "ext4",
)


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelFiles:
    """The kernel artifact of one target."""

    root: Path
    release: str

    @property
    def vmlinux(self) -> Path:
        """QEMU's -kernel: the PVH ELF, or the bzImage of a source-built debug kernel (srckernel)."""
        bz = self.root / "bzImage"
        return bz if bz.is_file() else self.root / "vmlinux"

    @property
    def modules_base(self) -> Path:
        """depmod base dir: modules live in <base>/lib/modules/<release>."""
        return self.root / "modules"

    @property
    def module_dir(self) -> Path:
        return self.modules_base / "lib" / "modules" / self.release


# ---------------------------------------------------------------------------------------------
# vmlinux extraction

_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
)


def _run_filter(cmd: list[str], data: bytes) -> bytes:
    """Decompress with an external tool; output before a trailing-garbage error is kept."""
    p = subprocess.run(cmd, input=data, capture_output=True, check=False)
    return p.stdout


def decompress(kind: str, data: bytes) -> bytes:
    """Decompress one stream of the given kind, ignoring trailing data."""
    if kind == "xz":
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        return d.decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        return _run_filter(["zstd", "-dcq"], data)
    if kind == "lz4":
        return _run_filter(["lz4", "-dcq"], data)
    raise KernelError(f"unknown compression {kind}")


def detect(data: bytes) -> str | None:
    for kind, magic in _MAGICS:
        if data.startswith(magic):
            return kind
    return None


def is_elf64(data: bytes) -> bool:
    return len(data) > 64 and data[:4] == b"\x7fELF" and data[4] == 2


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF has the Xen PHYS32_ENTRY note (CONFIG_PVH), which QEMU needs to boot it."""
    if not is_elf64(elf):
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
            name = elf[off + 12 : off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            off += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _header_payload(image: bytes) -> bytes | None:
    """The compressed payload named by the bzImage setup header (boot protocol >= 2.08)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(image):
        return None
    return image[start : start + payload_length]


def extract_vmlinux(image: bytes) -> bytes:
    """ELF vmlinux from a bzImage: the header's payload, else the first magic that decompresses to ELF."""
    if is_elf64(image):
        return image
    candidates: list[tuple[str, bytes]] = []
    payload = _header_payload(image)
    if payload is not None and (kind := detect(payload)):
        candidates.append((kind, payload))
    for kind, magic in _MAGICS:
        pos = image.find(magic)
        while pos != -1 and len(candidates) < 32:
            candidates.append((kind, image[pos:]))
            pos = image.find(magic, pos + 1)
            if kind in ("bzip2", "lzma"):  # weak magics: only the first few
                break
    for kind, data in candidates:
        try:
            out = decompress(kind, data)
        except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
            continue
        if is_elf64(out):
            return out
    raise KernelError("no compressed ELF vmlinux found in kernel image")


# ---------------------------------------------------------------------------------------------
# modules


def module_name(path: str) -> str:
    """'kernel/drivers/md/dm-mod.ko.xz' -> 'dm_mod'."""
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def read_modules_dep(module_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (relative path, [relative paths of dependencies]) from modules.dep."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in (module_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[module_name(path)] = (path, deps.split())
    return out


def read_builtin(module_dir: Path) -> set[str]:
    f = module_dir / "modules.builtin"
    return {module_name(x) for x in f.read_text().split()} if f.exists() else set()


def trim_modules(full: Path, dest: Path) -> None:
    """Move the kept subdirs and the modules.* index files of full into dest."""
    dest.mkdir(parents=True)
    for f in full.iterdir():
        if f.is_file() and f.name.startswith("modules."):
            shutil.copy2(f, dest / f.name)
    for sub in MODULE_SUBDIRS:
        src = full / "kernel" / sub
        if src.is_dir():
            (dest / "kernel" / sub).parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest / "kernel" / sub)


def check_required(module_dir: Path) -> None:
    have = set(read_modules_dep(module_dir)) | read_builtin(module_dir)
    missing = [m for m in REQUIRED_MODULES if m.replace("-", "_") not in have]
    if missing:
        raise KernelError(f"{module_dir}: required modules missing: {', '.join(missing)}")


def _find_one(root: Path, patterns: list[str]) -> Path:
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    raise KernelError(f"none of {patterns} in {root}")


def _build(target: Target, tmp: Path, *, progress: Progress) -> None:
    rel = target.kernel_release
    apt = PrivateApt(target.sources)
    work = tmp / ".work"
    with progress.step(f"{target.name}: download kernel debs"):
        debs = apt.download(list(target.kernel_packages), work / "debs")
    with progress.step(f"{target.name}: extract kernel + vmlinux"):
        x = work / "x"
        extract_debs(debs, x)
        vmlinuz = _find_one(
            x, [f"boot/vmlinuz-{rel}", f"usr/lib/modules/{rel}/vmlinuz", f"lib/modules/{rel}/vmlinuz"]
        )
        elf = extract_vmlinux(vmlinuz.read_bytes())
        if not has_pvh_note(elf):
            raise KernelError(f"{target.name}: vmlinux has no PVH entry note (CONFIG_PVH unset?)")
        (tmp / "vmlinux").write_bytes(elf)
        for cfg in (x / "boot" / f"config-{rel}", x / "usr/lib/modules" / rel / "config"):
            if cfg.exists():
                shutil.copy2(cfg, tmp / "config")
                break
        full = _find_one(x, [f"lib/modules/{rel}", f"usr/lib/modules/{rel}"])
        files = KernelFiles(tmp, rel)
        trim_modules(full, files.module_dir)
    with progress.step(f"{target.name}: depmod"):
        run(["depmod", "-b", str(files.modules_base), rel])
        check_required(files.module_dir)
    shutil.rmtree(work)


def _build_from_source(target: Target, tmp: Path, *, progress: Progress) -> None:
    from .chroot import ensure_chroot  # the chroot module needs this one for module builds

    chroot = ensure_chroot(target.suite, progress)
    full = build_source_kernel(target, chroot, tmp, progress)
    files = KernelFiles(tmp, target.kernel_release)
    trim_modules(full, files.module_dir)
    shutil.rmtree(tmp / "modroot")
    with progress.step(f"{target.name}: depmod"):
        run(["depmod", "-b", str(files.modules_base), target.kernel_release])
        check_required(files.module_dir)


def kernel_key(target: Target) -> str:
    if target.built_from_source:
        from .chroot import chroot_key

        return key_of("kernel", KERNEL_FORMAT, source_key(target), chroot_key(target.suite), MODULE_SUBDIRS)
    return key_of("kernel", KERNEL_FORMAT, target.kernel_release, target.kernel_packages, MODULE_SUBDIRS)


def ensure_kernel(target: Target, progress: Progress) -> KernelFiles:
    art = Artifact("kernel", target.name, kernel_key(target))
    build = _build_from_source if target.built_from_source else _build
    root = art.ensure(functools.partial(build, target, progress=progress))
    return KernelFiles(root, target.kernel_release)
