"""Host tests of update-img: plain files stand in for the snapshot device, lookups are injected."""

from __future__ import annotations

import errno
import io
import os
import random
import sys
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pydbd import updateimg
from pydbd.cow import BLOCK_SIZE, CowFile, build_cow_file

UUID = bytes(range(0x10, 0x20))
INFO = SimpleNamespace(uuid=UUID, seqid=2)


@dataclass
class Case:
    snapshot: Path
    cow: Path
    image: Path
    old_image: bytes
    expected: bytes


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def make_case(
    tmp_path: Path,
    size: int,
    changed: Iterable[int],
    *,
    seqid: int = 1,
    uuid: bytes = UUID,
    **cow_args: Any,
) -> Case:
    """A snapshot and an older image of ``size`` bytes, and an index-only COW file marking ``changed``."""
    rng = random.Random(size)
    snap = rng.randbytes(size)
    old = rng.randbytes(size)
    blocks = sorted(set(changed))
    expected = bytearray(old)
    for b in blocks:
        expected[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = snap[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
    case = Case(tmp_path / "snap", tmp_path / "old.cow", tmp_path / "image", old, bytes(expected))
    case.snapshot.write_bytes(snap)
    case.image.write_bytes(old)
    build_cow_file(
        case.cow, size // 512, mode="incremental", changes=blocks, seqid=seqid, uuid=uuid, **cow_args
    )
    return case


def update(case: Case, *, info: object = INFO, **kwargs: object) -> Result:
    out, err = io.StringIO(), io.StringIO()
    rc = updateimg.run(
        str(case.snapshot),
        str(case.cow),
        str(case.image),
        info_lookup=lambda minor: info,
        minor_resolver=lambda path: 0,
        out=out,
        err=err,
        **kwargs,  # type: ignore[arg-type]
    )
    return Result(rc, out.getvalue(), err.getvalue())


def upstream_lines(nblocks: int, changed: int, errors: int = 0) -> list[str]:
    return [
        f"snapshot is {nblocks} blocks large",
        "copying blocks",
        f"copying complete: {changed} blocks changed, {errors} errors",
    ]


# ---------------------------------------------------------------- successful updates


def test_scattered_changes(tmp_path: Path) -> None:
    changed = random.Random(1).sample(range(1024), 100)
    case = make_case(tmp_path, 4 * 1024 * 1024, changed)
    result = update(case)
    assert result.rc == 0, result.err
    assert result.lines == upstream_lines(1024, 100)
    assert result.err == ""
    assert case.image.read_bytes() == case.expected


def test_clustered_changes_longer_than_one_io(tmp_path: Path) -> None:
    # 2995 adjacent blocks: three I/Os at the 4 MiB cap, plus isolated blocks on either side.
    changed = [0, *range(5, 3000), 4095]
    case = make_case(tmp_path, 16 * 1024 * 1024, changed)
    result = update(case)
    assert result.rc == 0, result.err
    assert result.lines == upstream_lines(4096, len(changed))
    assert case.image.read_bytes() == case.expected


def test_device_size_not_a_multiple_of_4096(tmp_path: Path) -> None:
    size = 50 * BLOCK_SIZE + 1536
    case = make_case(tmp_path, size, [0, 17, 49, 50])
    result = update(case)
    assert result.rc == 0, result.err
    assert result.lines == upstream_lines(51, 4)
    assert case.image.read_bytes() == case.expected


def test_no_changes(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [])
    result = update(case)
    assert (result.rc, result.lines) == (0, upstream_lines(64, 0))
    assert case.image.read_bytes() == case.old_image


def test_memory_stays_bounded(tmp_path: Path) -> None:
    case = make_case(tmp_path, 32 * 1024 * 1024, range(8192))
    tracemalloc.start()
    try:
        result = update(case, verify=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.rc == 0, result.err
    assert peak < 12 * 1024 * 1024, peak
    assert case.image.read_bytes() == case.expected


# ---------------------------------------------------------------- header and series checks


@pytest.mark.parametrize(
    ("cow_args", "info", "needle"),
    [
        ({"uuid": bytes(16)}, INFO, "uuid"),
        ({"seqid": 2}, INFO, "seqid"),
        ({}, SimpleNamespace(uuid=UUID, seqid=1), "seqid"),
        ({"magic": 4777}, INFO, "magic"),
    ],
    ids=["uuid", "seqid-same", "seqid-older", "magic"],
)
def test_series_mismatch_exits_22(
    tmp_path: Path, cow_args: dict[str, object], info: object, needle: str
) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [1, 2], **cow_args)  # type: ignore[arg-type]
    result = update(case, info=info)
    assert result.rc == errno.EINVAL
    assert result.out == ""
    assert len(result.err.splitlines()) == 1 and needle in result.err
    assert case.image.read_bytes() == case.old_image


def test_clean_index_only_and_version_are_not_checked(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3], clean=False, version=0)
    assert update(case).rc == 0
    assert case.image.read_bytes() == case.expected


def test_cow_file_shorter_than_header_exits_22(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3])
    case.cow.write_bytes(b"\xa8\x12\x00\x00")
    result = update(case)
    assert result.rc == errno.EINVAL and "header" in result.err


def test_cow_index_shorter_than_snapshot_exits_22(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3], truncate_to=4096 + 8 * 10)
    result = update(case)
    assert result.rc == errno.EINVAL and "index" in result.err
    assert case.image.read_bytes() == case.old_image


@pytest.mark.parametrize("missing", ["snapshot", "cow", "image"])
def test_missing_file_exits_2(tmp_path: Path, missing: str) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3])
    getattr(case, missing).unlink()
    result = update(case)
    assert result.rc == errno.ENOENT
    assert len(result.err.splitlines()) == 1
    assert not (missing == "image" and case.image.exists()), "the image must never be created"


def test_info_failure_exits_with_its_errno(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3])

    def failing(minor: int) -> object:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))

    out, err = io.StringIO(), io.StringIO()
    rc = updateimg.run(
        str(case.snapshot),
        str(case.cow),
        str(case.image),
        info_lookup=failing,
        minor_resolver=lambda p: 4,
        out=out,
        err=err,
    )
    assert rc == errno.ENXIO and "minor 4" in err.getvalue()


def test_default_minor_resolver(tmp_path: Path) -> None:
    link = tmp_path / "snaplink"
    link.symlink_to("/dev/datto7")
    assert updateimg.default_minor_resolver(str(link)) == 7
    with pytest.raises(updateimg.UpdateError) as info:
        updateimg.default_minor_resolver(str(tmp_path / "snap"))
    assert info.value.code == errno.EINVAL


def test_snapshot_that_is_not_a_datto_device_exits_22(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3])
    out, err = io.StringIO(), io.StringIO()
    rc = updateimg.run(
        str(case.snapshot), str(case.cow), str(case.image), info_lookup=lambda m: INFO, out=out, err=err
    )
    assert rc == errno.EINVAL and "/dev/datto" in err.getvalue()


# ---------------------------------------------------------------- main() and argument handling

USAGE_ARGS = "[--dry-run] [--verify] [--progress|--no-progress] <snapshot device> <cow file> <image file>"


@pytest.mark.parametrize("argv", [[], ["a"], ["a", "b"], ["a", "b", "c", "d"], ["--bogus", "a", "b", "c"]])
def test_wrong_arguments_print_usage_and_exit_22(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert updateimg.main(argv) == errno.EINVAL
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"Usage: update-img {USAGE_ARGS}\n"


def test_usage_names_argv0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/bin/update-img", "only-one"])
    assert updateimg.main() == errno.EINVAL
    assert capsys.readouterr().err == f"Usage: /usr/bin/update-img {USAGE_ARGS}\n"
    monkeypatch.setattr(sys, "argv", ["/src/pydbd/updateimg.py", "only-one"])  # python -m pydbd.updateimg
    assert updateimg.main() == errno.EINVAL
    assert capsys.readouterr().err == f"Usage: update-img {USAGE_ARGS}\n"


def test_usage_line_lists_every_option() -> None:
    for opt in updateimg.OPTIONS:
        assert opt in updateimg.USAGE


@pytest.mark.parametrize("argv", [["--help"], ["--dry-run", "--help"], ["--help", "a", "b", "c"]])
def test_help_prints_usage_on_stdout_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert updateimg.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"Usage: update-img {USAGE_ARGS}\n"
    assert captured.err == ""


def test_help_after_double_dash_is_a_file_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert updateimg.main(["--", "--help"]) == errno.EINVAL
    assert capsys.readouterr().err.startswith("Usage: update-img [--dry-run]")


def test_main_uses_default_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [3, 4])
    seen: list[object] = []

    def resolver(path: str) -> int:
        seen.append(path)
        return 5

    def lookup(minor: int) -> object:
        seen.append(minor)
        return INFO

    monkeypatch.setattr(updateimg, "default_minor_resolver", resolver)
    monkeypatch.setattr(updateimg, "default_info_lookup", lookup)
    assert updateimg.main([str(case.snapshot), str(case.cow), str(case.image), "--no-progress"]) == 0
    assert seen == [str(case.snapshot), 5]
    assert capsys.readouterr().out.splitlines() == upstream_lines(64, 2)
    assert case.image.read_bytes() == case.expected


def test_double_dash_ends_options() -> None:
    parsed = updateimg.parse_args(["--verify", "--", "--snap", "cow", "img"])
    assert parsed == updateimg.Arguments("--snap", "cow", "img", verify=True)


# ---------------------------------------------------------------- failures while copying


def test_failing_block_copy_is_counted_and_exits_1(tmp_path: Path) -> None:
    changed = [*range(10, 20), 40]
    case = make_case(tmp_path, 64 * BLOCK_SIZE, changed)
    bad_offset = 14 * BLOCK_SIZE

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if offset <= bad_offset < offset + len(data):
            raise OSError(errno.EIO, "injected")
        return os.pwrite(fd, data, offset)

    result = update(case, pwrite=pwrite)
    assert result.rc == 1
    assert result.lines == upstream_lines(64, 11, errors=1)
    assert "block 14" in result.err
    # Every other block of the failed run was retried on its own and copied.
    expected = bytearray(case.expected)
    expected[bad_offset : bad_offset + BLOCK_SIZE] = case.old_image[bad_offset : bad_offset + BLOCK_SIZE]
    assert case.image.read_bytes() == bytes(expected)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_image_that_refuses_writes(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [1, 2, 3, 9])
    case.image.unlink()
    case.image.symlink_to("/dev/full")
    result = update(case)
    assert result.rc == 1
    assert result.lines[-1] == "copying complete: 4 blocks changed, 4 errors"


# ---------------------------------------------------------------- --dry-run and --verify


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [1, 2, 3, 9])
    case.image.chmod(0o444)
    result = update(case, dry_run=True)
    assert result.rc == 0, result.err
    assert result.lines == [
        "snapshot is 64 blocks large",
        "dry run: listing the blocks that would be copied",
        "would copy blocks 1-3 (3 blocks)",
        "would copy blocks 9-9 (1 blocks)",
        "dry run complete: 4 blocks changed, nothing written",
    ]
    assert case.image.read_bytes() == case.old_image


def test_verify_passes_on_a_good_copy(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [*range(0, 30), 63])
    result = update(case, verify=True)
    assert (result.rc, result.err) == (0, "")
    assert case.image.read_bytes() == case.expected


def test_verify_detects_a_corrupted_write(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [*range(0, 30), 63])

    def corrupting(fd: int, data: memoryview, offset: int) -> int:
        damaged = bytearray(data)
        if offset <= 7 * BLOCK_SIZE < offset + len(data):
            damaged[7 * BLOCK_SIZE - offset] ^= 0xFF
        return os.pwrite(fd, damaged, offset)

    result = update(case, verify=True, pwrite=corrupting)
    assert result.rc == 1
    assert result.lines == upstream_lines(64, 31)
    assert "block 7 differs" in result.err
    # Without --verify the same corruption goes unnoticed, as upstream.
    assert update(case, pwrite=corrupting).rc == 0


def test_progress_goes_to_stderr(tmp_path: Path) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [1, 2])
    result = update(case, progress=True)
    assert result.rc == 0
    assert result.lines == upstream_lines(64, 2)
    assert "64/64 blocks" in result.err and result.err.endswith("\n")


def test_index_read_error_during_copy_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(tmp_path, 64 * BLOCK_SIZE, [1, 2, 30])

    def failing_runs(self: object, *args: object) -> Iterator[tuple[int, int]]:
        yield 1, 2
        raise OSError(errno.EIO, "injected index failure")

    monkeypatch.setattr(CowFile, "iter_changed_runs", failing_runs)
    result = update(case)
    assert result.rc == errno.EIO
    assert result.lines == ["snapshot is 64 blocks large", "copying blocks"]
    assert "cow file index" in result.err


def test_prefetch_passes_runs_through_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(bytes(64 * BLOCK_SIZE))
    runs = [(0, 3), (10, 1), (20, 30), (60, 4)]
    fd = os.open(data, os.O_RDONLY)
    try:
        for window in (0, BLOCK_SIZE * 4, 1 << 30):
            assert list(updateimg.prefetched(fd, iter(runs), 64 * BLOCK_SIZE, window)) == runs
    finally:
        os.close(fd)
