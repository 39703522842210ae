"""ensure_guest_image: kernel + initramfs + base disk of one (target, rootfs), built in parallel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .image import ensure_image
from .initramfs import ensure_initramfs
from .kernel import KernelFiles, ensure_kernel, kernel_key
from .matrix import DEFAULT_TARGET, Target, get_rootfs, get_target
from .progress import Progress
from .rootfs import ensure_rootfs, rootfs_key


@dataclass(frozen=True)
class GuestImage:
    target: Target
    rootfs: str  # "bookworm" | "trixie"
    vmlinux: Path  # PVH-bootable ELF (-kernel)
    initrd: Path  # tiny uncompressed cpio (-initrd)
    disk: Path  # read-only qcow2 base: use as the backing file of an overlay
    kernel_release: str


def ensure_guest_image(
    target: str = DEFAULT_TARGET, rootfs: str = "bookworm", progress: bool | None = None
) -> GuestImage:
    """Build what is missing (kernel, initramfs, rootfs, disk) and return the cached paths."""
    t = get_target(target)
    r = get_rootfs(rootfs)
    prog = Progress(progress)
    with ThreadPoolExecutor(max_workers=2) as pool:
        fut_root = pool.submit(ensure_rootfs, r, prog)
        kernel: KernelFiles = ensure_kernel(t, prog)
        kkey = kernel_key(t)
        initrd = ensure_initramfs(t, kernel, kkey, prog)
        root = fut_root.result()
    disk = ensure_image(r.name, root, rootfs_key(r), t, kernel, kkey, prog)
    return GuestImage(t, r.name, kernel.vmlinux, initrd, disk, t.kernel_release)
