"""Thin, cached access to the vmimages package (guest images and module builds) plus run preparation.

vmimages is imported lazily so the host-only unit tests need none of it. Builds are cached per process
(vmimages caches on disk and locks across processes itself).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from harness import module_under_test
from harness.accel import select_accel
from harness.errors import ModuleBuildError
from harness.qemu import (
    REPO_ROOT,
    SRC_MOUNT,
    SRC_TAG,
    XCHG_MOUNT,
    XCHG_TAG,
    DiskSpec,
    QemuConfig,
    RunDir,
    Share,
    create_disk,
    create_overlay,
    guest_disk_name,
)

if TYPE_CHECKING:
    from vmimages import GuestImage


class ImageLike(Protocol):
    @property
    def vmlinux(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def disk(self) -> Path: ...
    @property
    def kernel_release(self) -> str: ...


_lock = threading.Lock()
_images: dict[tuple[str, str], GuestImage] = {}
_modules: dict[tuple[str, Path, str, str | None], Path | ModuleBuildError] = {}


def default_target() -> str:
    from vmimages import matrix

    return str(matrix.DEFAULT_TARGET)


def all_targets() -> list[str]:
    from vmimages import matrix

    return list(matrix.targets())


def is_debug_target(target: str) -> bool:
    """True for a debug kernel (KASAN, lockdep, kmemleak); see vmimages/matrix.toml."""
    from vmimages import matrix

    t = matrix.targets().get(target)
    return bool(t and t.debug)


def guest_image(target: str, rootfs: str = "bookworm") -> GuestImage:
    """The (cached) image for target/rootfs; builds it on first use."""
    from vmimages import ensure_guest_image

    key = (target, rootfs)
    with _lock:
        if key not in _images or not image_files_exist(_images[key]):
            _images[key] = ensure_guest_image(target=target, rootfs=rootfs)
        return _images[key]


def image_files_exist(image: ImageLike) -> bool:
    """False when the cache entry behind `image` was rebuilt or pruned since it was looked up."""
    return all(p.is_file() for p in (image.vmlinux, image.initrd, image.disk))


def module_path(target: str, src_dir: Path | None = None, module: str = "dattobd") -> Path:
    """`module`.ko built from src_dir for `target`; ModuleBuildError if not. Without src_dir, the
    module under test (harness.module_under_test: the repo's kernel/ unless --ko/--module-src)."""
    from vmimages import ensure_module
    from vmimages.chroot import vermagic
    from vmimages.matrix import get_target

    chosen = module_under_test.from_env() if src_dir is None and module == "dattobd" else None
    if chosen is not None and chosen.ko is not None:
        return module_under_test.prebuilt_for(chosen.ko, target, get_target(target).kernel_release, vermagic)
    build = chosen.build if chosen is not None else None
    src = (src_dir or (chosen.src if chosen is not None else None) or REPO_ROOT / "kernel").resolve()
    key = (target, src, module, build)
    with _lock:
        cached = _modules.get(key)
        if cached is None:
            try:
                cached = Path(ensure_module(target, src, module=module, command=build))
            except Exception as e:  # build failures come in several types
                cached = ModuleBuildError(f"building the module in {src} for {target} failed: {e}")
            _modules[key] = cached
    if isinstance(cached, ModuleBuildError):
        raise cached
    return cached


def forget_module(target: str, src_dir: Path | None = None, module: str = "dattobd") -> None:
    """Drop a cached build result so the next module_path() asks vmimages again (after source edits)."""
    with _lock:
        for key in [
            k for k in _modules if k[:3] == (target, (src_dir or REPO_ROOT / "kernel").resolve(), module)
        ]:
            _modules.pop(key, None)


@dataclass(frozen=True)
class GuestDisk:
    """A data disk as both sides see it."""

    host_path: Path
    device: str  # /dev/vdb, /dev/vdc, ...
    spec: DiskSpec


def prepare_run(
    image: ImageLike,
    *,
    name: str,
    disks: tuple[DiskSpec, ...] | list[DiskSpec] = (),
    memory_mib: int = 1024,
    smp: int = 2,
    accel: str | None = None,
    append_extra: tuple[str, ...] = (),
    batch_cmd: str | None = None,
    no_reboot: bool = False,
) -> tuple[RunDir, QemuConfig, list[GuestDisk]]:
    """Make the run dir (overlay, data disks, exchange dir) and the QEMU config for one guest."""
    rundir = RunDir.create(name)
    try:
        create_overlay(image.disk, rundir.root_overlay)
        guest_disks = [
            GuestDisk(create_disk(spec, rundir.path, i), guest_disk_name(i), spec)
            for i, spec in enumerate(disks)
        ]
        accel = accel or select_accel(image.vmlinux)
    except BaseException:
        rundir.remove()
        raise
    cfg = QemuConfig(
        vmlinux=image.vmlinux,
        initrd=image.initrd,
        root_overlay=rundir.root_overlay,
        qmp_socket=rundir.qmp_socket,
        disks=[(d.host_path, d.spec) for d in guest_disks],
        shares=[
            Share(SRC_TAG, REPO_ROOT, SRC_MOUNT, readonly=True),
            Share(XCHG_TAG, rundir.xchg, XCHG_MOUNT),
        ],
        accel=accel,
        memory_mib=memory_mib,
        smp=smp,
        append_extra=append_extra,
        batch_cmd=batch_cmd,
        no_reboot=no_reboot,
        kernel_release=image.kernel_release,
    )
    return rundir, cfg, guest_disks
