"""Read-only base disk per (rootfs, target): rootfs + guest additions + trimmed modules, ext4 -> qcow2."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .apt import run
from .cache import Artifact, file_digest, key_of, require_root
from .kernel import KernelFiles
from .matrix import Target
from .progress import Progress

GUEST_DIR = Path(__file__).with_name("guest")
TESTINIT = GUEST_DIR / "testinit"
BUSYBOX = Path("/bin/busybox")
IMAGE_SIZE = "2G"
HOSTNAME = "guest"
IMAGE_FORMAT = 2  # bump when the way images are staged or made changes
INPUTRC_ADD = (
    b"\n# vmimages: no bracketed-paste escapes on the serial console\nset enable-bracketed-paste off\n"
)

# Files added to every image: path -> (content, mode).
STATIC_FILES: dict[str, tuple[bytes, int]] = {
    "etc/hostname": (f"{HOSTNAME}\n".encode(), 0o644),
    "etc/hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost\n".encode(), 0o644),
    "etc/fstab": (b"# filesystems are mounted by /usr/sbin/testinit\n", 0o644),
    "root/.bashrc": (b"", 0o644),
    "root/.profile": (b"", 0o644),
}


def put(root: Path, rel: str, data: bytes, mode: int) -> None:
    """Write a file in a hard-linked staging tree without touching the shared inode."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)
    os.chmod(path, mode)


def real_modules_root(root: Path) -> Path:
    """usr/lib/modules inside root (lib is a symlink on merged-/usr systems)."""
    lib = root / "lib"
    return root / ("usr/lib" if lib.is_symlink() else "lib") / "modules"


def stage(rootfs: Path, kernel: KernelFiles, staging: Path, testinit: bytes) -> None:
    run(["cp", "-al", str(rootfs), str(staging)])  # hard links: fast, no extra space
    for rel, (data, mode) in STATIC_FILES.items():
        put(staging, rel, data, mode)
    inputrc = staging / "etc/inputrc"
    old = inputrc.read_bytes() if inputrc.is_file() else b""
    put(staging, "etc/inputrc", old + INPUTRC_ADD, 0o644)
    put(staging, "usr/sbin/testinit", testinit, 0o755)
    put(staging, "usr/local/bin/busybox", BUSYBOX.read_bytes(), 0o755)
    mods = real_modules_root(staging)
    mods.mkdir(parents=True, exist_ok=True)
    dest = mods / kernel.release
    if dest.exists():
        shutil.rmtree(dest)
    run(["cp", "-al", str(kernel.module_dir), str(dest)])


def scratch_dir(fallback: Path, need: int = 2 << 30) -> Path:
    """Where the intermediate raw image goes: /dev/shm when it has room (saves flushing ~400 MB
    to disk only to convert it), else fallback."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return fallback
    return shm if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > need else fallback


def make_disk(staging: Path, out_qcow2: Path, size: str = IMAGE_SIZE) -> None:
    fd, name = tempfile.mkstemp(prefix="vmimages-", suffix=".raw", dir=scratch_dir(out_qcow2.parent))
    os.close(fd)
    raw = Path(name)
    try:
        # orphan_file (default since e2fsprogs 1.47) is unknown to 5.10 kernels.
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "root",
                "-O",
                "^orphan_file",
                "-E",
                "lazy_itable_init=1",
                "-d",
                str(staging),
                str(raw),
                size,
            ]
        )
        run(["e2fsck", "-fn", str(raw)])
        run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out_qcow2)])
    finally:
        raw.unlink(missing_ok=True)
    os.chmod(out_qcow2, 0o444)


def image_key(rootfs_key: str, kernel_key: str, testinit: bytes | None = None) -> str:
    files = {rel: data for rel, (data, _m) in STATIC_FILES.items()}
    testinit = TESTINIT.read_bytes() if testinit is None else testinit
    return key_of(
        "image",
        IMAGE_FORMAT,
        rootfs_key,
        kernel_key,
        testinit,
        file_digest(BUSYBOX),
        files,
        INPUTRC_ADD,
        IMAGE_SIZE,
    )


def ensure_image(
    rootfs_name: str,
    rootfs: Path,
    rootfs_key: str,
    target: Target,
    kernel: KernelFiles,
    kernel_key: str,
    progress: Progress,
) -> Path:
    testinit = TESTINIT.read_bytes()  # read once: the key and the image agree even during edits
    art = Artifact("image", f"{rootfs_name}-{target.name}", image_key(rootfs_key, kernel_key, testinit))

    def build(tmp: Path) -> None:
        require_root(f"the {rootfs_name}/{target.name} disk image")
        with progress.step(f"image {rootfs_name}/{target.name}: stage + mkfs.ext4 + qcow2"):
            staging = tmp / "staging"
            stage(rootfs, kernel, staging, testinit)
            make_disk(staging, tmp / "disk.qcow2")
            shutil.rmtree(staging)

    return art.ensure(build) / "disk.qcow2"
