"""Choosing the module under test: --ko / --module-src / --module-build (host only)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import module_under_test as mut
from harness.errors import ModuleBuildError
from vmimages.chroot import build_command

RELEASE = "6.1.0-54-amd64"


def _magic(release: str) -> Callable[[Path], str]:
    return lambda path: f"{release} SMP preempt mod_unload modversions "


def test_default_is_the_repos_kernel_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (mut.ENV_KO, mut.ENV_SRC, mut.ENV_BUILD):
        monkeypatch.delenv(name, raising=False)
    chosen = mut.from_env()
    assert not chosen.foreign and chosen.args() == [] and chosen.describe() == "kernel/ (this repository)"


def test_choice_round_trips_through_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (mut.ENV_KO, mut.ENV_SRC, mut.ENV_BUILD):
        monkeypatch.delenv(name, raising=False)
    chosen = mut.choose(None, str(tmp_path), "make -C {src} KERNELVERSION={release}")
    chosen.export()
    assert mut.from_env() == chosen
    assert chosen.args() == [
        "--module-src",
        str(tmp_path),
        "--module-build",
        "make -C {src} KERNELVERSION={release}",
    ]
    mut.ModuleUnderTest().export()
    assert not mut.from_env().foreign


@pytest.mark.parametrize(
    "ko,src,build,message",
    [
        ("x.ko", "src", None, "--ko takes a prebuilt module"),
        ("missing.ko", None, None, "--ko missing.ko: neither a .ko file nor a directory"),
        (None, "nowhere", None, "--module-src nowhere: not a directory"),
        (None, None, " ", "--module-build: empty command"),
    ],
)
def test_bad_options_name_the_option(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ko: str | None,
    src: str | None,
    build: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        mut.choose(ko, src, build)


def test_prebuilt_from_a_directory_is_the_targets_file(tmp_path: Path) -> None:
    (tmp_path / "debian-6.1.ko").write_bytes(b"\x7fELF")
    path = mut.prebuilt_for(tmp_path, "debian-6.1", RELEASE, _magic(RELEASE))
    assert path == tmp_path / "debian-6.1.ko"
    with pytest.raises(ModuleBuildError, match=r"no debian-6.12.ko in it \(it holds: debian-6.1.ko\)"):
        mut.prebuilt_for(tmp_path, "debian-6.12", RELEASE, _magic(RELEASE))


def test_prebuilt_for_another_kernel_is_refused_with_both_releases(tmp_path: Path) -> None:
    ko = tmp_path / "dattobd.ko"
    ko.write_bytes(b"\x7fELF")
    with pytest.raises(
        ModuleBuildError, match=r"built for kernel 6.12.48-amd64, but debian-6.1 runs 6.1.0-54"
    ):
        mut.prebuilt_for(ko, "debian-6.1", RELEASE, _magic("6.12.48-amd64"))


def test_build_templates_fill_quoted_fields_and_name_unknown_ones() -> None:
    assert build_command(None, "/build/x y", "/kdir", RELEASE, 2) == "make -C '/build/x y' -j2 KDIR=/kdir"
    upstream = build_command("make -C {src} KERNELVERSION={release}", "/build/u", "/kdir", RELEASE, 2)
    assert upstream == f"make -C /build/u KERNELVERSION={RELEASE}"
    with pytest.raises(ValueError, match=re.escape("--module-build 'make {srcdir}'")):
        build_command("make {srcdir}", "/b", "/k", RELEASE, 2)
