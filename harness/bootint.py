"""Guest images whose initramfs runs dist/'s boot integration (spec section 7).

The image is the target's normal one with a second cpio archive appended to its initramfs: the
module, the reload-only `dbdctl` (dist/dbdctl-reload.c, built static on the host) and dist/'s
`datto-premount` and `reload` scripts, started from the `/premount` hook of vmimages' initrd-init
before the root is mounted, as initramfs-tools' init-premount script starts them on a real system.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.images import guest_image, module_path
from harness.qemu import REPO_ROOT
from vmimages.initramfs import append_overlay

DIST = REPO_ROOT / "dist"
# what dist/initramfs-tools/hooks/dattobd copies, as busybox applets here
APPLETS = ("blockdev", "blkid", "mkdir", "echo")
PREMOUNT = (
    "#!/bin/sh\n"
    "# load the module as initramfs-tools' modprobe would, then run dist/'s premount script\n"
    "insmod /modules/dattobd.ko debug=1 || exit 1\n"
    'exec datto_premount "$1"\n'
)


@dataclass(frozen=True)
class BootImage:
    vmlinux: Path
    initrd: Path
    disk: Path
    kernel_release: str


def dbdctl_reload(workdir: Path) -> Path:
    """dist/dbdctl-reload.c built as a static binary (gcc and libc6-dev come from ci/setup-host)."""
    src = DIST / "dbdctl-reload.c"
    digest = hashlib.sha256(src.read_bytes() + (REPO_ROOT / "kernel" / "dattobd_uapi.h").read_bytes())
    out = workdir / f"dbdctl-reload-{digest.hexdigest()[:16]}"
    if not out.is_file():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        cmd = ["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-static", "-o", str(tmp), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"building {src} failed ({' '.join(cmd)}):\n{r.stderr}")
        tmp.replace(out)
    return out


def boot_integration_image(target: str, workdir: Path, rootfs: str = "bookworm") -> BootImage:
    """The target's image with dist/'s early-boot reload in its initramfs (built into workdir)."""
    base = guest_image(target, rootfs)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "modules/dattobd.ko": (module_path(target).read_bytes(), 0o644),
        "bin/dbdctl": (dbdctl_reload(workdir).read_bytes(), 0o755),
        "bin/datto_premount": ((DIST / "initramfs" / "datto-premount").read_bytes(), 0o755),
        "bin/datto_reload": ((DIST / "initramfs" / "reload").read_bytes(), 0o755),
        "premount": (PREMOUNT.encode(), 0o755),
    }
    initrd = append_overlay(base.initrd, workdir / f"initrd-{target}.cpio", files, APPLETS)
    return BootImage(base.vmlinux, initrd, base.disk, base.kernel_release)
