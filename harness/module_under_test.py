"""Which dattobd-family module the guests load: the repo's kernel/, a prebuilt one, or another tree.

    --ko PATH              a prebuilt module: one .ko for the one target, or a directory of <target>.ko
    --module-src DIR       a source tree built for each target in its suite's chroot
    --module-build CMD     how to build it (default: make -C {src} -j{jobs} KDIR={kdir}); {src}, {kdir},
                           {release} and {jobs} are filled in, e.g. upstream's
                           "make -C {src} KERNELVERSION={release}"

pytest (tests/guest), `python -m harness` and ci/matrix take these options. The choice is exported as
DBD_KO / DBD_MODULE_SRC / DBD_MODULE_BUILD, so that xdist workers and child processes load the same
module; harness.images.module_path() reads it back.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ModuleBuildError

ENV_KO = "DBD_KO"
ENV_SRC = "DBD_MODULE_SRC"
ENV_BUILD = "DBD_MODULE_BUILD"


@dataclass(frozen=True)
class ModuleUnderTest:
    ko: Path | None = None
    src: Path | None = None
    build: str | None = None

    @property
    def foreign(self) -> bool:
        """Not the repo's kernel/ built the usual way."""
        return self.ko is not None or self.src is not None or self.build is not None

    def args(self) -> list[str]:
        """The options that choose this module again (for a rerun command)."""
        out: list[str] = []
        for option, value in (("--ko", self.ko), ("--module-src", self.src), ("--module-build", self.build)):
            if value is not None:
                out += [option, str(value)]
        return out

    def describe(self) -> str:
        return shlex.join(self.args()) if self.foreign else "kernel/ (this repository)"

    def export(self) -> None:
        """Make the choice visible to this process's module_path() and to child processes."""
        for name, value in ((ENV_KO, self.ko), (ENV_SRC, self.src), (ENV_BUILD, self.build)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--ko, --module-src and --module-build for an argparse command line (CLI, ci/matrix)."""
    p.add_argument("--ko", help="a prebuilt module to test: a .ko, or a directory of <target>.ko")
    p.add_argument("--module-src", help="a module source tree to build and test instead of kernel/")
    p.add_argument("--module-build", help="build command for --module-src ({src} {kdir} {release} {jobs})")


def choose(ko: str | None, src: str | None, build: str | None) -> ModuleUnderTest:
    """Validate the options; ValueError names the option and what is wrong with it."""
    if ko and (src or build):
        raise ValueError(
            "--ko takes a prebuilt module: it cannot be combined with --module-src/--module-build"
        )
    ko_path = Path(ko).resolve() if ko else None
    if ko_path is not None and not (ko_path.is_dir() or (ko_path.is_file() and ko_path.suffix == ".ko")):
        raise ValueError(f"--ko {ko}: neither a .ko file nor a directory of <target>.ko files")
    src_path = Path(src).resolve() if src else None
    if src_path is not None and not src_path.is_dir():
        raise ValueError(f"--module-src {src}: not a directory")
    if build is not None and not build.strip():
        raise ValueError("--module-build: empty command")
    return ModuleUnderTest(ko_path, src_path, build or None)


def from_env() -> ModuleUnderTest:
    """The choice exported by export(), or the repo's kernel/."""
    ko, src, build = (os.environ.get(n) or None for n in (ENV_KO, ENV_SRC, ENV_BUILD))
    return ModuleUnderTest(Path(ko) if ko else None, Path(src) if src else None, build)


def prebuilt_for(ko: Path, target: str, release: str, vermagic: Callable[[Path], str]) -> Path:
    """The prebuilt module for `target` (kernel `release`) under --ko `ko`, checked by its vermagic."""
    path = ko / f"{target}.ko" if ko.is_dir() else ko
    if not path.is_file():
        have = sorted(p.name for p in ko.glob("*.ko")) if ko.is_dir() else []
        raise ModuleBuildError(f"--ko {ko}: no {target}.ko in it (it holds: {', '.join(have) or 'no .ko'})")
    magic = vermagic(path)
    got = magic.split()[0] if magic.strip() else "(none)"
    if got != release:
        raise ModuleBuildError(f"--ko {path}: built for kernel {got}, but {target} runs {release}")
    return path
