"""Guest root filesystems: mmdebstrap minbase trees, one per rootfs suite."""

from __future__ import annotations

from pathlib import Path

from .apt import KEYRING, SuiteSources, host_env, run
from .cache import Artifact, key_of, require_root
from .matrix import Rootfs
from .progress import Progress

# Bump when the way a rootfs is built changes.
ROOTFS_FORMAT = 1

# Nothing the tests need; keeps trees and images small.
PATH_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/share/linda/*",
)
PATH_INCLUDES = ("/usr/share/doc/*/copyright",)


def mmdebstrap_cmd(
    sources: SuiteSources,
    suite: str,
    packages: tuple[str, ...],
    dest: Path,
    excludes: tuple[str, ...] = PATH_EXCLUDES,
) -> list[str]:
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        "-q",
        f"--keyring={KEYRING}",
        '--aptopt=APT::Install-Recommends "false"',
    ]
    cmd += [f"--aptopt={o}" for o in sources.apt_options()]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in excludes]
    cmd += [f"--dpkgopt=path-include={p}" for p in PATH_INCLUDES]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [suite, str(dest)]
    for s in sources.apt_suites:
        url = sources.security_mirror if s.endswith("-security") else sources.mirror
        cmd.append(f"deb {url} {s} main")
    return cmd


def clean_tree(root: Path) -> None:
    """Drop apt caches and lists (mmdebstrap normally did already)."""
    for d in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()
    for f in (root / "var/cache/apt").glob("*.bin"):
        f.unlink()


def rootfs_key(rootfs: Rootfs) -> str:
    return key_of("rootfs", ROOTFS_FORMAT, rootfs.suite, rootfs.sources, rootfs.packages, PATH_EXCLUDES)


def ensure_rootfs(rootfs: Rootfs, progress: Progress) -> Path:
    """The rootfs tree (owned by root, as mmdebstrap left it) at <artifact>/root."""
    art = Artifact("rootfs", rootfs.name, rootfs_key(rootfs))

    def build(tmp: Path) -> None:
        require_root(f"the {rootfs.name} rootfs")
        with progress.step(f"rootfs {rootfs.name}: mmdebstrap"):
            run(mmdebstrap_cmd(rootfs.sources, rootfs.suite, rootfs.packages, tmp / "root"), env=host_env())
            clean_tree(tmp / "root")

    return art.ensure(build) / "root"
