"""guestlib.churn: seeded file churn and its manifest."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest

from guestlib import churn


def test_same_seed_same_manifest_and_log(tmp_path: Path) -> None:
    a = churn.churn(tmp_path / "a", seed=12, ops=120, max_file_size=64 * 1024)
    b = churn.churn(tmp_path / "b", seed=12, ops=120, max_file_size=64 * 1024)
    assert a.manifest == b.manifest
    assert a.log == b.log
    c = churn.churn(tmp_path / "c", seed=13, ops=120, max_file_size=64 * 1024)
    assert c.manifest != a.manifest


def test_manifest_describes_the_files_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "t"
    result = churn.churn(root, seed=1, ops=300, max_file_size=128 * 1024)
    on_disk = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }
    live = {k: v for k, v in result.manifest.items() if v is not None}
    assert live == on_disk
    deleted = [k for k, v in result.manifest.items() if v is None]
    assert deleted, "300 ops should delete or rename something"
    assert not any((root / d).exists() for d in deleted)
    assert churn.compare_tree(root, result.manifest) == []


def test_second_churn_adopts_and_changes_the_first_ones_files(tmp_path: Path) -> None:
    root = tmp_path / "t"
    first = churn.churn(root, seed=3, ops=100, max_file_size=64 * 1024)
    (root / "d0" / "notes.txt").write_text("not churn's")  # foreign names are left alone
    second = churn.churn(root, seed=4, ops=200, max_file_size=64 * 1024)
    earlier = {k: v for k, v in first.manifest.items() if v is not None}
    assert set(earlier) <= set(second.manifest), "the second manifest must describe the adopted files"
    changed = [k for k, v in earlier.items() if second.manifest[k] != v]
    assert changed, "200 operations should overwrite, truncate or delete some adopted file"
    assert churn.compare_tree(root, second.manifest) == []
    assert (root / "d0" / "notes.txt").read_text() == "not churn's"


def test_every_operation_kind_is_used(tmp_path: Path) -> None:
    result = churn.churn(tmp_path / "t", seed=2, ops=400, max_file_size=64 * 1024)
    kinds = Counter(entry["op"] for entry in result.log)
    assert set(kinds) == {name for name, _ in churn._OPS}
    assert len(result.log) == 400


def test_byte_budget_bounds_the_data_written(tmp_path: Path) -> None:
    result = churn.churn(tmp_path / "t", seed=3, ops=200, max_bytes=100_000)
    assert result.bytes_written <= 100_000
    assert len(result.log) == 200


def test_unsynced_operations_are_volatile(tmp_path: Path) -> None:
    result = churn.churn(tmp_path / "t", seed=4, ops=50, unsynced_ops=10, max_file_size=32 * 1024)
    tail = result.log[50:]
    assert len(tail) == 10
    assert all(entry["unsynced"] for entry in tail)
    assert not any(entry.get("unsynced") for entry in result.log[:50])
    touched = {e[k] for e in tail for k in ("path", "to") if k in e}
    assert set(result.volatile) == touched


def test_punch_hole_zeroes_and_keeps_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 20000)
    fd = os.open(path, os.O_RDWR)
    try:
        churn.punch_hole(fd, 4096, 8192)
    except OSError as exc:
        pytest.skip(f"punch hole unsupported here: {exc}")
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 20000
    assert data[4096:12288] == bytes(8192)
    assert data[:4096] == b"\xff" * 4096 and data[12288:] == b"\xff" * (20000 - 12288)


def test_fallocate_error_is_an_oserror(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError):
            churn.fallocate(fd, 0, 0, 4096)  # read-only descriptor: EBADF
    finally:
        os.close(fd)


def test_compare_tree_reports_each_kind_of_problem(tmp_path: Path) -> None:
    root = tmp_path / "t"
    result = churn.churn(root, seed=5, ops=80, max_file_size=16 * 1024)
    live = sorted(k for k, v in result.manifest.items() if v is not None)
    gone = sorted(k for k, v in result.manifest.items() if v is None)
    assert len(live) >= 2 and gone
    (root / live[0]).write_bytes(b"changed")
    os.unlink(root / live[1])
    (root / gone[0]).parent.mkdir(exist_ok=True)
    (root / gone[0]).write_bytes(b"back from the dead")
    problems = churn.compare_tree(root, result.manifest)
    text = "\n".join(problems)
    assert f"{live[0]}: content differs" in text
    assert f"{live[1]}: missing" in text
    assert f"{gone[0]}: should be absent" in text
    assert len(problems) == 3
    assert len(churn.compare_tree(root, result.manifest, check_deleted=False)) == 2
    assert len(churn.compare_tree(root, result.manifest, skip=frozenset(live[:2]))) == 1


def test_manifest_file_round_trip(tmp_path: Path) -> None:
    result = churn.churn(tmp_path / "t", seed=6, ops=30, unsynced_ops=3)
    result.save(tmp_path / "m.json")
    manifest, volatile = churn.load_manifest(tmp_path / "m.json")
    assert manifest == result.manifest
    assert volatile == sorted(result.volatile)
    (tmp_path / "bare.json").write_text('{"a": null, "b": "00"}')
    assert churn.load_manifest(tmp_path / "bare.json") == ({"a": None, "b": "00"}, [])
