"""The declarative kernel/rootfs matrix (vmimages/matrix.toml)."""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import aptmirror
from .apt import SuiteSources

MATRIX_FILE = Path(__file__).with_name("matrix.toml")
DEFAULT_TARGET = "debian-6.1"
ROOTFS_NAMES = ("bookworm", "trixie")


class MatrixError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    suite: str
    kernel_release: str  # as `uname -r` prints it
    kernel_packages: tuple[str, ...]  # "name=version" debs holding vmlinuz + modules
    headers_packages: tuple[str, ...]  # "name=version" installed in the build chroot
    build_packages: tuple[str, ...]  # make, gcc-N, libc6-dev, ...
    sources: SuiteSources  # apt suites of `suite`
    # A kernel built here from Debian's linux-source package ("name=version") with a config
    # fragment of vmimages/kconfig/, instead of Debian's binary kernel packages.
    source_package: str | None = None
    config_fragment: str | None = None
    # A debug kernel (KASAN, lockdep, kmemleak): slow under TCG, so the guest suite runs only its
    # tests marked `debugkernel` on it, and every guest ends with a kmemleak scan.
    debug: bool = False
    # Further packages of the suite's build chroot that module builds do not need (dkms, for
    # tests/guest/test_dkms.py). Kept apart from build_packages, which `vmimages pin` rewrites.
    tool_packages: tuple[str, ...] = ()

    @property
    def built_from_source(self) -> bool:
        return self.source_package is not None

    @property
    def headers_dir(self) -> str:
        """KDIR of module builds inside the build chroot (a source-built kernel's build tree is
        bind-mounted at /kbuild there)."""
        if self.built_from_source:
            return "/kbuild/out"
        return f"/usr/src/linux-headers-{self.kernel_release}"


@dataclass(frozen=True)
class Rootfs:
    name: str
    suite: str
    packages: tuple[str, ...]
    sources: SuiteSources


@dataclass(frozen=True)
class Matrix:
    default_target: str
    mirror: str
    security_mirror: str
    suites: dict[str, SuiteSources]
    targets: dict[str, Target]
    rootfs: dict[str, Rootfs]


def _strs(table: dict[str, Any], key: str, where: str, default: list[str] | None = None) -> tuple[str, ...]:
    val = table.get(key, default)
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise MatrixError(f"{where}: {key} must be a list of strings")
    return tuple(val)


def _str(table: dict[str, Any], key: str, where: str) -> str:
    val = table.get(key)
    if not isinstance(val, str) or not val:
        raise MatrixError(f"{where}: {key} must be a non-empty string")
    return val


def parse(text: str) -> Matrix:
    data = tomllib.loads(text)
    mirror, security = data.get("mirror"), data.get("security_mirror")
    if not mirror or not security:
        machine, machine_security = aptmirror.machine_mirrors()
        mirror, security = mirror or machine, security or machine_security
    suites: dict[str, SuiteSources] = {}
    for name, t in data.get("suites", {}).items():
        suites[name] = SuiteSources(
            name=name,
            apt_suites=_strs(t, "apt_suites", f"suites.{name}", [name]),
            mirror=t.get("mirror", mirror),
            security_mirror=t.get("security_mirror", security),
            check_valid_until=bool(t.get("check_valid_until", True)),
        )

    def sources(suite: str, where: str) -> SuiteSources:
        if suite not in suites:
            suites[suite] = SuiteSources(suite, (suite,), mirror, security)
        return suites[suite]

    guest = _strs(data, "guest_packages", "matrix", [])
    rootfs: dict[str, Rootfs] = {}
    for name, t in data.get("rootfs", {}).items():
        suite = t.get("suite", name)
        rootfs[name] = Rootfs(
            name,
            suite,
            guest + _strs(t, "extra_packages", f"rootfs.{name}", []),
            sources(suite, f"rootfs.{name}"),
        )
    targets: dict[str, Target] = {}
    for name, t in data.get("targets", {}).items():
        where = f"targets.{name}"
        suite = _str(t, "suite", where)
        rel = _str(t, "kernel_release", where)
        target = Target(
            name=name,
            suite=suite,
            kernel_release=rel,
            kernel_packages=_strs(t, "kernel_packages", where, []),
            headers_packages=_strs(t, "headers_packages", where, []),
            build_packages=_strs(t, "build_packages", where, ["make", "gcc", "libc6-dev"]),
            sources=sources(suite, where),
            source_package=t.get("source_package"),
            config_fragment=t.get("config_fragment"),
            debug=bool(t.get("debug", False)),
            tool_packages=_strs(t, "tool_packages", where, []),
        )
        if target.built_from_source:
            if not target.config_fragment or target.kernel_packages or target.headers_packages:
                raise MatrixError(
                    f"{where}: a source_package target needs config_fragment and no kernel/headers packages"
                )
        elif not target.kernel_packages:
            raise MatrixError(f"{where}: needs kernel_packages (or source_package + config_fragment)")
        source_pins = (target.source_package,) if target.source_package else ()
        for pin in target.kernel_packages + target.headers_packages + source_pins:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*=[A-Za-z0-9.+~:-]+", pin):
                raise MatrixError(f"{where}: package pin {pin!r} is not name=version")
        targets[name] = target
    default = data.get("default_target", DEFAULT_TARGET)
    if targets and default not in targets:
        raise MatrixError(f"default_target {default!r} is not a target")
    return Matrix(default, mirror, security, suites, targets, rootfs)


@functools.cache
def load(path: Path = MATRIX_FILE) -> Matrix:
    return parse(path.read_text())


def targets() -> dict[str, Target]:
    return dict(load().targets)


def rootfs_list() -> dict[str, Rootfs]:
    return dict(load().rootfs)


def get_target(name: str) -> Target:
    all_targets = load().targets
    if name not in all_targets:
        raise MatrixError(f"unknown target {name!r}; known: {', '.join(all_targets)}")
    return all_targets[name]


def get_rootfs(name: str) -> Rootfs:
    all_rootfs = load().rootfs
    if name not in all_rootfs:
        raise MatrixError(f"unknown rootfs {name!r}; known: {', '.join(all_rootfs)}")
    return all_rootfs[name]
