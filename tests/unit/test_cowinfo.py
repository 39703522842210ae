"""Host tests of ``dbdctl cow-info``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pydbd import cowinfo
from pydbd.cow import build_cow_file

SECTORS = 65536 * 8


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cowinfo.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def fields(out: str) -> dict[str, str]:
    """``label: value`` lines of the text output."""
    result = {}
    for line in out.splitlines():
        if not line.startswith(" ") and ":" in line:
            label, _, value = line.partition(":")
            result[label] = value.strip()
    return result


def test_valid_incremental_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "inc.cow"
    build_cow_file(
        path, SECTORS, mode="incremental", changes=[1, 2, 3], raw_entries={7: 129}, fpos=130, seqid=3
    )
    rc, out, err = run([str(path), "--sectors", str(SECTORS)], capsys)
    assert (rc, err) == (0, "")
    f = fields(out)
    assert f["magic"] == "4776 (0x12a8)"
    assert f["flags"] == "0x3 (CLEAN|INDEX_ONLY)"
    assert f["uuid"] == "000102030405060708090a0b0c0d0e0f"
    assert (f["seqid"], f["fpos"], f["fsize"], f["nr_changed_blocks"]) == ("3", "130", "528384", "4")
    assert (f["nblocks"], f["nsect"], f["data_offset"], f["first data block"]) == (
        "65536",
        "16",
        "528384",
        "129",
    )
    assert f["geometry"] == f"{SECTORS} sectors"
    assert f["non-zero entries"] == "4 (3 marker-1, 1 mapped)"
    assert f["result"] == "valid"
    assert "skipped" not in f


def test_inferred_geometry_is_announced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "snap.cow"
    build_cow_file(path, SECTORS, changes=[5, 6])
    rc, out, _ = run([str(path)], capsys)
    f = fields(out)
    assert rc == 0
    assert f["geometry"] == "inferred from the file"
    assert f["nsect"] == "16"
    assert "rule 5" in f["skipped"]


def test_violations_are_listed_with_offsets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.cow"
    build_cow_file(path, SECTORS, mode="incremental", changes=[1], clean=False, nr_changed_blocks=9)
    rc, out, _ = run([str(path), "--sectors", str(SECTORS)], capsys)
    assert rc == 1
    assert fields(out)["result"] == "INVALID: 2 violations"
    assert "  offset 4 (0x4): [clean] CLEAN flag not set (flags 0x2 (INDEX_ONLY))" in out.splitlines()
    assert any(line.startswith("  offset 56 (0x38): [nr-changed]") for line in out.splitlines())


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.cow"
    build_cow_file(path, SECTORS, changes=[1, 2], raw_entries={3: 129})
    rc, out, _ = run([str(path), "--sectors", str(SECTORS), "--json"], capsys)
    doc = json.loads(out)
    assert rc == 1
    assert doc["valid"] is False
    assert doc["header"]["uuid"] == "000102030405060708090a0b0c0d0e0f"
    assert doc["header"]["flags_decoded"] == "0x1 (CLEAN)"
    assert doc["geometry"] == {
        "sectors": SECTORS,
        "nblocks": 65536,
        "nsect": 16,
        "data_offset": 528384,
        "first_data_block": 129,
        "inferred": False,
    }
    assert doc["counts"] == {"nonzero": 3, "markers": 0, "mapped": 3}
    dups = sorted(v["offset"] for v in doc["violations"] if v["rule"] == "duplicate")
    assert dups == [4096 + 8 * 1, 4096 + 8 * 3]


def test_short_file_is_a_violation_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.cow"
    path.write_bytes(b"\xa8\x12")
    rc, out, _ = run([str(path), "--json"], capsys)
    doc = json.loads(out)
    assert rc == 1
    assert doc["header"] is None
    assert doc["violations"] == [
        {"offset": 2, "rule": "header", "message": "header needs 64 bytes, only 2 available"}
    ]


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run([str(tmp_path / "missing.cow")], capsys)
    assert (rc, out) == (2, "")
    assert "No such file or directory" in err


@pytest.mark.parametrize("argv", [[], ["a", "b"], ["a", "--sectors", "x"], ["a", "--sectors", "-8"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert "usage: dbdctl cow-info" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and "--sectors" in out
