"""dist/ on the host: the reload-only dbdctl's argument handling and errors, the reload runner."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.bootint import DIST, dbdctl_reload

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is installed by ci/setup-host")


@pytest.fixture(scope="module")
def dbdctl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dbdctl_reload(tmp_path_factory.mktemp("dbdctl"))


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("setup-snapshot", "/dev/x", "/c", "0"),
        ("reload-snapshot", "/dev/x", "/c"),
        ("reload-snapshot", "/dev/x", "/c", "256"),
        ("reload-incremental", "/dev/x", "/c", "-1"),
        ("reload-incremental", "-c", "/dev/x", "/c", "0"),
        ("reload-incremental", "-c", "12x", "/dev/x", "/c", "0"),
    ],
)
def test_bad_arguments_exit_255_with_usage(dbdctl: Path, args: tuple[str, ...]) -> None:
    r = _run(dbdctl, *args)
    assert r.returncode == 255
    assert "usage: dbdctl reload-snapshot|reload-incremental" in r.stderr


@pytest.mark.skipif(os.path.exists("/dev/datto-ctl"), reason="the module is loaded on this host")
def test_missing_control_device_is_named(dbdctl: Path) -> None:
    r = _run(dbdctl, "reload-incremental", "-c", "1048576", "/dev/vdb", "/.datto", "3")
    assert r.returncode == 255
    assert "/dev/datto-ctl" in r.stderr and "errno 2" in r.stderr and "module" in r.stderr


def test_reload_runner_runs_every_script_and_reports_failures(tmp_path: Path) -> None:
    dla = tmp_path / "etc" / "datto" / "dla"
    dla.mkdir(parents=True)
    (dla / "reload_0").write_text(f"#!/bin/sh\necho ran0 >> {tmp_path}/log\n")
    (dla / "reload_1").write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    (dla / "reload_2").write_text(f"#!/bin/sh\necho ran2 >> {tmp_path}/log\n")
    (dla / "reload_3").write_text(f"#!/bin/sh\necho not-executable >> {tmp_path}/log\n")
    for n in (0, 1, 2):
        (dla / f"reload_{n}").chmod(0o755)
    r = _run("sh", DIST / "initramfs" / "reload", tmp_path)
    assert r.returncode == 0
    assert (tmp_path / "log").read_text().split() == ["ran0", "ran2"]
    assert "reload_1 failed: broken" in r.stderr


def test_reload_runner_without_scripts_does_nothing(tmp_path: Path) -> None:
    r = _run("sh", DIST / "initramfs" / "reload", tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "script",
    [
        "initramfs/datto-premount",
        "initramfs/reload",
        "initramfs-tools/hooks/dattobd",
        "initramfs-tools/scripts/init-premount/dattobd",
        "systemd/dattobd.shutdown",
    ],
)
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    path = DIST / script
    assert os.access(path, os.X_OK)
    assert _run("sh", "-n", path).returncode == 0
