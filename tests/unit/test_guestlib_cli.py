"""``python3 -m guestlib``: JSON output and exit codes, and the guest constraints (stdlib only, 3.11/3.13)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guestlib import __main__ as cli
from guestlib import signed
from pydbd import cow

REPO = Path(__file__).resolve().parents[2]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if out else {}


def _file(path: Path, blocks: int, fill: int = 0) -> Path:
    path.write_bytes(bytes([fill]) * blocks * 4096)
    return path


def test_hash_diff_and_stability(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = _file(tmp_path / "dev", 16)
    code, out = _run(capsys, "hash", str(dev), str(tmp_path / "h1"))
    assert (code, out["blocks"]) == (0, 16)
    with open(dev, "r+b") as handle:
        handle.seek(5 * 4096)
        handle.write(b"x")
    assert _run(capsys, "hash", str(dev), str(tmp_path / "h2"), "--start", "2", "--count", "8")[0] == 0
    assert (tmp_path / "h2").stat().st_size == 8 * 16
    _run(capsys, "hash", str(dev), str(tmp_path / "h2"))
    code, out = _run(capsys, "diff", str(tmp_path / "h1"), str(tmp_path / "h2"))
    assert code == 0
    assert out["first_difference"] == 5 and out["blocks"] == [5]
    code, out = _run(capsys, "stability", str(tmp_path / "h1"), str(tmp_path / "h2"))
    assert code == 1
    assert out["ok"] is False and out["first_block"] == 5 and out["oracle"] == "snapshot-stability"
    code, out = _run(capsys, "stability", str(tmp_path / "h1"), str(tmp_path / "h1"))
    assert code == 0 and out["ok"] is True


def test_sha256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = _file(tmp_path / "dev", 2, fill=7)
    code, out = _run(capsys, "sha256", str(dev))
    assert code == 0
    assert out["sha256"] == hashlib.sha256(dev.read_bytes()).hexdigest()


def test_signed_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = _file(tmp_path / "dev", 128)
    state = tmp_path / "state.json"
    common = ["--seed", "5", "--blocks", "100", "--first", "10", "--state", str(state)]
    code, out = _run(capsys, "signed-write", str(dev), "--ops", "20", *common)
    assert code == 0 and out["next_seq"] == 21
    code, out = _run(capsys, "signed-write", str(dev), "--ops", "5", "--continue", *common)
    assert out["next_seq"] == 26
    code, out = _run(capsys, "signed-check", str(dev), "--state", str(state))
    assert code == 0 and out["ok"] is True
    loaded = signed.SignedState.load(state)
    block = min(loaded.expected)
    with open(dev, "r+b") as handle:
        handle.seek(block * 4096)
        handle.write(bytes(4096))
    code, out = _run(capsys, "signed-check", str(dev), "--state", str(state))
    assert code == 1
    assert out["counts"]["foreign"] == 1
    assert out["failures"][0][1:3] == [block, "foreign"]


def test_signed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    code, out = _run(
        capsys,
        "signed-files",
        str(tmp_path / "d"),
        "--seed",
        "1",
        "--ops",
        "10",
        "--files",
        "2",
        "--state",
        str(state),
    )
    assert code == 0 and out["files"] == ["sig1.dat", "sig2.dat"]
    code, out = _run(capsys, "signed-check-files", str(tmp_path / "d"), "--state", str(state))
    assert code == 0 and out["ok"] is True


def test_churn_and_check_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, manifest = tmp_path / "d", tmp_path / "m.json"
    code, out = _run(capsys, "churn", str(root), "--seed", "9", "--ops", "40", "--manifest", str(manifest))
    assert code == 0 and out["ops"] == 40
    code, out = _run(capsys, "check-manifest", str(root), str(manifest))
    assert code == 0 and out["oracle"] == "nothing-lost"
    data = json.loads(manifest.read_text())
    victim = sorted(k for k, v in data["manifest"].items() if v is not None)[0]
    (root / victim).write_bytes(b"")
    code, out = _run(capsys, "check-manifest", str(root), str(manifest))
    assert code == 1
    assert victim in out["message"]


def test_change_list_and_cow_structure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap_n = tmp_path / "n"
    snap_n.write_bytes(b"".join(cow.pattern_block(b) for b in range(32)))
    snap_n1 = tmp_path / "n1"
    snap_n1.write_bytes(b"".join(cow.pattern_block(b, 1 if b == 7 else 0) for b in range(32)))
    _run(capsys, "hash", str(snap_n), str(tmp_path / "hn"))
    _run(capsys, "hash", str(snap_n1), str(tmp_path / "hn1"))
    inc = tmp_path / "inc.cow"
    cow.build_cow_file(inc, 256, mode="incremental", changes=[8])
    code, out = _run(capsys, "change-list", str(tmp_path / "hn"), str(tmp_path / "hn1"), str(inc))
    assert code == 1 and out["first_block"] == 7

    snap_cow = tmp_path / "snap.cow"
    cow.build_cow_file(snap_cow, 256, changes={7: cow.pattern_block(7)}, seqid=4)
    (tmp_path / "written.json").write_text("[7]")
    argv = [
        "cow-structure",
        str(snap_cow),
        str(snap_n),
        "--written",
        str(tmp_path / "written.json"),
        "--exact",
    ]
    code, out = _run(capsys, *argv, "--seqid", "4", "--uuid", bytes(range(16)).hex())
    assert code == 0, out
    code, out = _run(capsys, *argv, "--seqid", "5")
    assert code == 1 and "seqid is 4, expected 5" in out["message"]


def test_errors_are_json_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "hash", str(tmp_path / "missing"), str(tmp_path / "h"))
    assert code == 2
    assert out["ok"] is False and "FileNotFoundError" in out["error"]
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["fsck", "/dev/null", "--fstype", "btrfs"]) == 2


def test_guestlib_imports_only_the_standard_library_and_pydbd() -> None:
    allowed = set(sys.stdlib_module_names) | {"guestlib", "pydbd", "__future__"}
    for source in sorted((REPO / "guestlib").glob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"


def _python313() -> str | None:
    candidates = [shutil.which("python3.13"), "/usr/bin/python3.13"]
    candidates += sorted(str(p) for p in Path("~/.pyenv/versions").expanduser().glob("3.13*/bin/python3.13"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            probe = subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False)
            if probe.returncode == 0:
                return candidate
    return None


@pytest.mark.parametrize("python", ["current", "3.13"])
def test_cli_runs_as_in_a_guest(python: str, tmp_path: Path) -> None:
    """As in a guest: ``PYTHONPATH=<checkout> python3 -m guestlib`` without the venv's packages."""
    exe = sys.executable if python == "current" else _python313()
    if exe is None:
        pytest.skip("no python3.13 on this host")
    dev = _file(tmp_path / "dev", 8)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}

    def guest(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [exe, "-s", "-m", "guestlib", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd=tmp_path)

    proc = guest("signed-write", str(dev), "--seed", "1", "--ops", "4", "--blocks", "8", "--state", "s.json")
    assert proc.returncode == 0, proc.stderr
    proc = guest("signed-check", str(dev), "--state", "s.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
