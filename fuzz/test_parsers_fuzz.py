"""Fuzzing of every parser of untrusted input in pydbd: COW files, /proc/datto-info and dbdctl's argv.

The contract under test: bad input gives a clear error or exit status, never a traceback.
- pydbd.cow.verify reports corruption and raises only OSError (unreadable file);
- CowFile and its iterators raise only CowFormatError;
- cowinfo.main returns 0/1/2 (and 0 exactly when verify finds the file valid);
- updateimg.run returns an exit status and, when it returns 0, the image is exactly right;
- parse_proc_info returns a ProcInfo or raises ProcFormatError;
- dbdctl.main returns an int whatever argv, driver replies and /proc text it gets.
Output streams are UTF-8 as under a UTF-8 locale: stdout strict, stderr backslashreplace.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from hypothesis import example, given, note
from hypothesis import strategies as st

from pydbd import abi, cow, cowinfo, dbdctl, updateimg
from pydbd.control import Control
from pydbd.cow import BLOCK_SIZE, HEADER_REGION, CowFormatError
from pydbd.procinfo import ProcFormatError, ProcInfo, parse_proc_info
from tests.unit.fake_driver import EMPTY_PROC, SAMPLE_PROC, FakeIoctl

# --------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dbd-fuzz-") as name:
        yield Path(name)


def _strict_stream(errors: str = "strict") -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors, write_through=True)


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.TextIOWrapper, io.TextIOWrapper]]:
    """stdout and stderr as Python sets them up under a UTF-8 locale (stderr escapes, stdout is strict)."""
    out, err = _strict_stream(), _strict_stream("backslashreplace")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def _text(stream: io.TextIOWrapper, errors: str = "strict") -> str:
    """What was written, as text. Strict by default; a path's raw bytes (dbdctl writes paths as
    the kernel reports them, not necessarily UTF-8) need errors="backslashreplace"."""
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8", errors)


# --------------------------------------------------------------------------------------------------
# COW file strategies: arbitrary bytes, and valid files with targeted mutations

U64_EXTREMES = [0, 1, 2, 8, 9, 129, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
sectors_st = st.one_of(
    st.none(),
    st.integers(0, 3 * 4096 * 8 + 7),
    st.sampled_from([0, 7, 8, 9, 4096 * 8, 4096 * 8 + 1, 2**40, 2**55]),
)


@dataclass(frozen=True)
class Mutation:
    kind: str  # byte | field | entry | truncate | extend
    where: int
    value: int

    def apply(self, data: bytearray, first_data_block: int) -> None:
        if self.kind == "byte" and data:
            data[self.where % len(data)] = self.value & 0xFF
        elif self.kind == "field":
            offset, width = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (48, 8), (56, 8)][self.where % 7]
            _put(data, offset, width, self.value)
        elif self.kind == "entry":
            value = self.value if self.value >= 0 else first_data_block + (-self.value - 1)
            _put(data, HEADER_REGION + 8 * self.where, 8, value)
        elif self.kind == "truncate":
            del data[self.where % (len(data) + 1) :]
        elif self.kind == "extend":
            data.extend(bytes([self.value & 0xFF]) * (self.where % 9000))


def _put(data: bytearray, offset: int, width: int, value: int) -> None:
    if offset + width > len(data):
        data.extend(bytes(offset + width - len(data)))
    data[offset : offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")


mutation_st = st.one_of(
    st.builds(Mutation, st.just("byte"), st.integers(0, 2**20), st.integers(0, 255)),
    st.builds(
        Mutation,
        st.just("field"),
        st.integers(0, 6),
        st.one_of(st.sampled_from(U64_EXTREMES), st.integers(0, 2**64 - 1)),
    ),
    st.builds(
        Mutation,
        st.just("entry"),
        st.integers(0, 3 * 4096 + 10),
        st.one_of(st.sampled_from(U64_EXTREMES), st.integers(-40, -1), st.integers(0, 2**64 - 1)),
    ),
    st.builds(Mutation, st.just("truncate"), st.integers(0, 2**20), st.just(0)),
    st.builds(Mutation, st.just("extend"), st.integers(0, 2**16), st.integers(0, 255)),
)


@dataclass(frozen=True)
class CowSpec:
    sectors: int
    mode: str
    changes: tuple[int, ...]
    seqid: int
    mutations: tuple[Mutation, ...]


@st.composite
def cow_spec_st(draw: st.DrawFn, max_mutations: int = 4, max_sectors: int = 2 * 4096 * 8 + 15) -> CowSpec:
    sectors = draw(st.one_of(st.integers(8, max_sectors), st.sampled_from([8, 9, 4096 * 8, 4096 * 8 + 7])))
    # Blocks that own an index entry (a trailing partial block does, unless the index is full).
    entries = cow.geometry(sectors).entries_in_use
    changes = draw(st.lists(st.integers(0, entries - 1), max_size=40, unique=True)) if entries else []
    return CowSpec(
        sectors=sectors,
        mode=draw(st.sampled_from(["snapshot", "incremental"])),
        changes=tuple(changes),
        seqid=draw(st.integers(1, 5)),
        mutations=tuple(draw(st.lists(mutation_st, max_size=max_mutations))),
    )


UUID = bytes(range(16))


def _write_cow(directory: Path, spec: CowSpec) -> Path:
    path = directory / "cow"
    cow.build_cow_file(path, spec.sectors, mode=spec.mode, changes=spec.changes, seqid=spec.seqid, uuid=UUID)  # type: ignore[arg-type]
    data = bytearray(path.read_bytes())
    first = cow.geometry(spec.sectors).first_data_block
    for mutation in spec.mutations:
        mutation.apply(data, first)
    path.write_bytes(data)
    return path


def _write_bytes(directory: Path, data: bytes) -> Path:
    path = directory / "cow"
    path.write_bytes(data)
    return path


# Arbitrary bytes, biased towards something with the magic so the deeper checks run.
raw_cow_st = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda head, body: struct.pack("<I", cow.MAGIC) + head + body,
        st.binary(min_size=60, max_size=60),
        st.binary(max_size=HEADER_REGION + 4096),
    ),
)

# --------------------------------------------------------------------------------------------------
# COW readers


def _exercise_readers(path: Path, sectors: int | None) -> None:
    report = cow.verify(path, sectors)
    json.dumps(report.to_dict())
    cowinfo.render(report, io.StringIO())
    if report.ok:
        assert report.violations == [] and report.header is not None
    try:
        with cow.CowFile(path, sectors) as cf:
            # Cap the work on absurd geometries: the readers must fail fast, not allocate.
            entries = min(cf.geometry.entries_in_use, 3 * 4096 + 16)
            values = list(cf.iter_index(0, entries))
            changed = list(cf.iter_changed(0, entries))
            assert changed == [(b, v) for b, v in enumerate(values) if v]
            runs = list(cf.iter_changed_runs(0, entries, max_run=3))
            assert sum(n for _, n in runs) == len(changed)
            list(cf.iter_changed())
    except CowFormatError as exc:
        assert str(exc)


def _exercise_cowinfo(path: Path, sectors: int | None) -> None:
    argv = [str(path), "--json"] + ([] if sectors is None else ["--sectors", str(sectors)])
    with _captured() as (out, _err):
        code = cowinfo.main(argv)
    assert code in (cowinfo.EXIT_VALID, cowinfo.EXIT_VIOLATIONS, cowinfo.EXIT_UNREADABLE)
    data = json.loads(_text(out))
    assert (code == cowinfo.EXIT_VALID) == data["valid"] == cow.verify(path, sectors).ok
    with _captured():
        assert cowinfo.main(argv[:1]) == code or sectors is not None


@given(data=raw_cow_st, sectors=sectors_st)
def test_arbitrary_bytes_into_cow_readers(data: bytes, sectors: int | None) -> None:
    with _workdir() as d:
        path = _write_bytes(d, data)
        _exercise_readers(path, sectors)
        _exercise_cowinfo(path, sectors)


@given(spec=cow_spec_st(), sectors_given=st.booleans())
def test_mutated_cow_files_into_cow_readers(spec: CowSpec, sectors_given: bool) -> None:
    with _workdir() as d:
        path = _write_cow(d, spec)
        sectors = spec.sectors if sectors_given else None
        _exercise_readers(path, sectors)
        _exercise_cowinfo(path, sectors)


@given(spec=cow_spec_st(max_mutations=0))
def test_unmutated_built_files_verify_clean(spec: CowSpec) -> None:
    with _workdir() as d:
        report = cow.verify(_write_cow(d, spec), spec.sectors)
        assert report.ok, [str(v) for v in report.violations]


@given(a=cow_spec_st(), b=cow_spec_st())
def test_diff_cow_on_mutated_files(a: CowSpec, b: CowSpec) -> None:
    with _workdir() as d:
        (d / "a").mkdir()
        (d / "b").mkdir()
        pa, pb = _write_cow(d / "a", a), _write_cow(d / "b", b)
        try:
            diff = cow.diff_cow(pa, pb)
        except CowFormatError:
            return
        assert diff.changed_in_both + diff.only_in_a + diff.only_in_b <= diff.blocks_compared


def test_cowinfo_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    with _captured():
        assert cowinfo.main([str(tmp_path / "missing")]) == cowinfo.EXIT_UNREADABLE


# --------------------------------------------------------------------------------------------------
# update-img with injected lookups and plain files


def _entries(data: bytes, count: int) -> list[int]:
    """Index entries read straight from the file bytes (0 past the end), independently of pydbd."""
    out = []
    for block in range(count):
        off = HEADER_REGION + 8 * block
        out.append(int.from_bytes(data[off : off + 8], "little") if off + 8 <= len(data) else 0)
    return out


@given(
    spec=cow_spec_st(max_sectors=64 * 8),
    snap_bytes=st.one_of(st.integers(0, 72 * BLOCK_SIZE), st.sampled_from([0, 1, 4095, 4096, 4097])),
    seqid_delta=st.sampled_from([1, 1, 1, 0, 2]),
    uuid_ok=st.booleans(),
    verify=st.booleans(),
    dry_run=st.booleans(),
    fail_block=st.none() | st.integers(0, 100),
)
def test_update_img_never_raises_and_is_exact_when_it_succeeds(
    spec: CowSpec,
    snap_bytes: int,
    seqid_delta: int,
    uuid_ok: bool,
    verify: bool,
    dry_run: bool,
    fail_block: int | None,
) -> None:
    with _workdir() as d:
        cow_path = _write_cow(d, spec)
        cow_data = cow_path.read_bytes()
        header_seqid = int.from_bytes(cow_data[24:32].ljust(8, b"\0"), "little")
        nblocks = -(-snap_bytes // BLOCK_SIZE)
        snapshot = bytes(b % 251 for b in range(snap_bytes)) if snap_bytes else b""
        original = bytes([0xEE]) * snap_bytes
        (d / "snap").write_bytes(snapshot)
        (d / "img").write_bytes(original)
        info = SimpleNamespace(uuid=UUID if uuid_ok else bytes(16), seqid=header_seqid + seqid_delta)

        def pwrite(fd: int, view: memoryview, offset: int) -> int:
            if fail_block is not None and offset <= fail_block * BLOCK_SIZE < offset + len(view):
                raise OSError(errno.EIO, "injected")
            return os.pwrite(fd, view, offset)

        out, err = io.StringIO(), io.StringIO()
        code = updateimg.run(
            str(d / "snap"),
            str(cow_path),
            str(d / "img"),
            info_lookup=lambda minor: info,
            minor_resolver=lambda path: 0,
            dry_run=dry_run,
            verify=verify,
            progress=False,
            out=out,
            err=err,
            pwrite=pwrite,
        )
        note(f"exit {code}\nstdout: {out.getvalue()}\nstderr: {err.getvalue()}")
        assert isinstance(code, int) and 0 <= code < 256
        if code != 0:
            assert err.getvalue().strip(), "a failure must say why"
        image = (d / "img").read_bytes()
        if code == 0 and not dry_run:
            entries = _entries(cow_data, nblocks)
            want = b"".join(
                (snapshot if entries[b] else original)[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
                for b in range(nblocks)
            )
            assert image == want
        if dry_run or code == errno.EINVAL:
            assert image == original


def test_build_cow_file_change_past_a_full_index(tmp_path: Path) -> None:
    """Found by the fuzzer (pydbd test-helper bug): 32769 sectors = 4096 whole blocks plus a partial one,
    so the index (one section) has no entry for the partial block 4096. build_cow_file accepts a change
    there anyway and writes that entry over the first data block, producing an invalid file. It should
    refuse the change (ValueError) or write a valid file."""
    path = tmp_path / "cow"
    try:
        cow.build_cow_file(path, 4096 * 8 + 1, changes=[4096])
    except ValueError:
        return
    report = cow.verify(path, 4096 * 8 + 1)
    assert report.ok, [str(v) for v in report.violations]


def test_update_img_header_only_cow_and_sub_block_snapshot(tmp_path: Path) -> None:
    """Found by the fuzzer (pydbd bug): a COW file that ends inside the header region (here after the
    64-byte header) with a snapshot smaller than one block makes update-img raise CowFormatError
    ("index truncated") out of run() instead of returning an exit status."""
    cow_path = tmp_path / "cow"
    cow.build_cow_file(cow_path, 8, uuid=UUID, seqid=1, truncate_to=64)
    for size in (0, 100):
        (tmp_path / "snap").write_bytes(bytes(size))
        (tmp_path / "img").write_bytes(bytes(size))
        err = io.StringIO()
        code = updateimg.run(
            str(tmp_path / "snap"),
            str(cow_path),
            str(tmp_path / "img"),
            info_lookup=lambda minor: SimpleNamespace(uuid=UUID, seqid=2),
            minor_resolver=lambda path: 0,
            progress=False,
            out=io.StringIO(),
            err=err,
        )
        assert code == errno.EINVAL, f"snapshot of {size} bytes: exit {code}"
        assert "index" in err.getvalue()


@given(
    argv=st.lists(
        st.sampled_from(["--dry-run", "--verify", "--progress", "--no-progress", "--", "--x", "a", "b", "c"])
    )
)
def test_update_img_argument_parsing_never_raises(argv: list[str]) -> None:
    with _workdir() as d, contextlib.chdir(d), _captured():
        code = updateimg.main(argv)
    assert isinstance(code, int)


# --------------------------------------------------------------------------------------------------
# /proc/datto-info


def _parse(text: str) -> ProcInfo | None:
    try:
        parsed = parse_proc_info(text)
    except ProcFormatError as exc:
        assert exc.lineno >= 0
        return None
    json.dumps(parsed.to_dict())
    return parsed


@given(text=st.text(max_size=400))
def test_arbitrary_text_into_proc_parser(text: str) -> None:
    _parse(text)


PROC_LINES = SAMPLE_PROC.split("\n")


@dataclass(frozen=True)
class LineEdit:
    kind: str  # delete | duplicate | replace | insert | number | char
    line: int
    text: str
    number: int


line_edit_st = st.builds(
    LineEdit,
    st.sampled_from(["delete", "duplicate", "replace", "insert", "number", "char"]),
    st.integers(0, len(PROC_LINES) - 1),
    st.one_of(st.text(max_size=30), st.sampled_from([line for line in PROC_LINES if line.strip()])),
    st.one_of(st.sampled_from([-(2**63), -1, 0, 2**64, 10**30]), st.integers()),
)


def _edit(lines: list[str], edit: LineEdit) -> None:
    i = edit.line % max(1, len(lines))
    if not lines:
        lines.append(edit.text)
    elif edit.kind == "delete":
        del lines[i]
    elif edit.kind == "duplicate":
        lines.insert(i, lines[i])
    elif edit.kind == "replace":
        lines[i] = edit.text
    elif edit.kind == "insert":
        lines.insert(i, edit.text)
    elif edit.kind == "number":
        head, sep, _ = lines[i].rpartition(": ")
        if sep:
            lines[i] = f"{head}: {edit.number}{',' if lines[i].endswith(',') else ''}"
    elif edit.text:
        pos = edit.number % (len(lines[i]) + 1)
        lines[i] = lines[i][:pos] + edit.text[0] + lines[i][pos + 1 :]


@given(edits=st.lists(line_edit_st, min_size=1, max_size=4), base=st.sampled_from([SAMPLE_PROC, EMPTY_PROC]))
def test_mutated_proc_text_into_proc_parser(edits: list[LineEdit], base: str) -> None:
    lines = base.split("\n")
    for edit in edits:
        _edit(lines, edit)
    _parse("\n".join(lines))


def test_unmutated_proc_samples_parse() -> None:
    assert [d.minor for d in parse_proc_info(SAMPLE_PROC).devices] == [0, 3]
    assert parse_proc_info(EMPTY_PROC).devices == []


# --------------------------------------------------------------------------------------------------
# dbdctl argv with a fake driver

EXTRA_COMMANDS = ["help", "--help", "-h", "status", "info", "get-free", "cow-info", "persist-reload", "bogus"]
COMMANDS = [*sorted(dbdctl._COMMANDS), *EXTRA_COMMANDS]
WORDS = [
    *("-c", "-f", "-r", "--json", "--dir", "--dir=", "--sectors", "--", "-", "-c5", "-cf"),
    *("0", "1", "010", "08", "0x1", "-1", "99999999999999999999", "4294967296"),
    *("/dev/loop0", "/.datto", "", " ", "é", "\udcff"),
]
REQUESTS = [
    abi.IOCTL_SETUP_SNAP,
    abi.IOCTL_RELOAD_SNAP,
    abi.IOCTL_RELOAD_INC,
    abi.IOCTL_DESTROY,
    abi.IOCTL_TRANSITION_INC,
    abi.IOCTL_TRANSITION_SNAP,
    abi.IOCTL_RECONFIGURE,
    abi.IOCTL_DATTOBD_INFO,
    abi.IOCTL_GET_FREE,
    abi.IOCTL_EXPAND_COW_FILE,
    abi.IOCTL_RECONFIGURE_AUTO_EXPAND,
]
number_st = st.one_of(
    st.sampled_from(["0", "1", "010", "08", "4294967296", "99999999999999999999"]),
    st.from_regex(r"\A[0-9]{1,4}\Z"),
)
path_st = st.one_of(
    st.sampled_from(["/dev/loop0", "/.datto", "cow", "", "-", "/\udcff"]), st.text(max_size=8)
)
# Option letter -> value kind, and positional kinds, of each command (s: string, n: number).
TEMPLATES: dict[str, tuple[str, str]] = {
    "setup-snapshot": ("cf", "ssn"),
    "reload-snapshot": ("c", "ssn"),
    "reload-incremental": ("c", "ssn"),
    "destroy": ("", "n"),
    "transition-to-incremental": ("", "n"),
    "transition-to-snapshot": ("f", "sn"),
    "reconfigure": ("c", "n"),
    "expand-cow-file": ("", "nn"),
    "reconfigure-auto-expand": ("r", "nn"),
    "info": ("", "n"),
    "status": ("", "n"),
    "get-free": ("", ""),
    "persist-reload": ("", "n"),
    "cow-info": ("", "s"),
}
LONG_OPTIONS = {
    "info": ["--json"],
    "status": ["--json"],
    "persist-reload": ["--dir=/x"],
    "cow-info": ["--json"],
}


@st.composite
def command_line_st(draw: st.DrawFn) -> list[str]:
    """A mostly well-formed command line, so the fuzzer gets past argument parsing into the actions."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    letters, kinds = TEMPLATES[name]
    argv = [name]
    for letter in draw(st.lists(st.sampled_from(letters), max_size=2)) if letters else []:
        argv += [f"-{letter}", draw(number_st)]
    for kind in kinds:
        if name == "status" and draw(st.booleans()):
            break
        argv.append(draw(number_st if kind == "n" else path_st))
    argv += draw(st.lists(st.sampled_from(LONG_OPTIONS.get(name, ["--"])), max_size=1))
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(WORDS)))
    return argv


argv_st = st.one_of(
    command_line_st(),
    command_line_st(),
    command_line_st(),
    st.lists(st.text(max_size=12), max_size=6),
    st.tuples(
        st.sampled_from(COMMANDS),
        st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)), max_size=6),
    ).map(lambda t: [t[0], *t[1]]),
)
info_reply_st = st.one_of(
    st.binary(min_size=abi.ctypes.sizeof(abi.DattobdInfo), max_size=abi.ctypes.sizeof(abi.DattobdInfo)),
    st.builds(
        lambda state, error, cow_path, bdev: _info_reply(state, error, cow_path, bdev),
        st.integers(0, 2**64 - 1),
        st.integers(-(2**31), 2**31 - 1),
        st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
        st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
    ),
)


def _info_reply(state: int, error: int, cow_path: bytes, bdev: bytes) -> bytes:
    from tests.unit.fake_driver import info_bytes

    return info_bytes(state=state, error=error, cow=cow_path, bdev=bdev)


@dataclass(frozen=True)
class DriverScript:
    errors: dict[int, int]
    info: bytes | None
    free_minor: int
    ctl_exists: bool
    proc_text: str | None


driver_st = st.builds(
    DriverScript,
    errors=st.dictionaries(
        st.sampled_from(REQUESTS),
        st.sampled_from([0, errno.EINVAL, errno.EBUSY, errno.ENOENT, errno.EFBIG, 999]),
    ),
    info=st.none() | info_reply_st,
    free_minor=st.integers(-(2**31), 2**31 - 1),
    ctl_exists=st.booleans() | st.just(True),
    proc_text=st.one_of(
        st.none(),
        # The module does not escape paths: a non-UTF-8 byte (written surrogate-escaped) is possible.
        st.sampled_from(
            [SAMPLE_PROC, EMPTY_PROC, "{\n", "garbage", SAMPLE_PROC.replace("/cow.snap", "/\udcff.snap")]
        ),
        st.text(max_size=80),
    ),
)


def _fake_factory(script: DriverScript) -> Any:
    fake = FakeIoctl()
    fake.errors.update({req: code for req, code in script.errors.items() if code})
    if script.info is not None:
        fake.replies[abi.IOCTL_DATTOBD_INFO] = script.info
    fake.replies[abi.IOCTL_GET_FREE] = script.free_minor.to_bytes(4, "little", signed=True)
    return lambda path: Control(path, ioctl=fake)


@given(argv=argv_st, script=driver_st)
@example(  # found by a campaign: a block device path that is not UTF-8 is printed as raw bytes
    argv=["info", "0"],
    script=DriverScript(
        errors={}, info=_info_reply(0, 0, b"", b"\x80"), free_minor=0, ctl_exists=True, proc_text=None
    ),
)
@example(  # found by the dev profile: a NUL byte in a path escaped as ValueError
    argv=["reload-incremental", "/dev/loop0", "\x00", "0"],
    script=DriverScript(errors={}, info=None, free_minor=0, ctl_exists=True, proc_text=None),
)
def test_dbdctl_main_always_returns_an_exit_code(argv: list[str], script: DriverScript) -> None:
    written: list[str] = []

    def fake_write(info: Any, directory: str) -> str:
        written.append(dbdctl.reload_script(info))
        return os.path.join("/nonexistent-persist-dir", f"reload_{info.minor}")

    with _workdir() as d, contextlib.chdir(d):
        ctl = d / "datto-ctl"
        if script.ctl_exists:
            ctl.write_bytes(b"")
        proc = d / "datto-info"
        if script.proc_text is not None:
            proc.write_text(script.proc_text, encoding="utf-8", errors="surrogateescape")
        env = {"DBD_CTL_PATH": str(ctl), "DBD_PROC_PATH": str(proc)}
        with (
            mock.patch.dict(os.environ, env),
            mock.patch.object(dbdctl, "CONTROL_FACTORY", _fake_factory(script)),
            mock.patch.object(dbdctl, "write_reload_script", fake_write),
            _captured() as (out, err),
        ):
            code = dbdctl.main(argv)
        note(
            f"exit {code}\nstdout: {_text(out, 'backslashreplace')}\nstderr: {_text(err, 'backslashreplace')}"
        )
    assert isinstance(code, int)
    assert code in (0, 1, 2, dbdctl.EXIT_FAILURE)


def test_fuzz_streams_are_strict() -> None:
    stream = _strict_stream()
    try:
        stream.write("\udcff")
        stream.flush()
    except UnicodeEncodeError:
        return
    raise AssertionError(f"stream accepted a lone surrogate ({sys.version})")


# --------------------------------------------------------------------------------------------------
# Regressions found by the fuzzer (pydbd bugs; these fail until pydbd is fixed)

NON_UTF8_PROC = SAMPLE_PROC.replace("/cow.snap", "/\udcff.snap")


def _dbdctl_strict_stdout(argv: list[str], script: DriverScript) -> int:
    with _workdir() as d:
        (d / "ctl").write_bytes(b"")
        (d / "proc").write_text(script.proc_text or "", encoding="utf-8", errors="surrogateescape")
        env = {"DBD_CTL_PATH": str(d / "ctl"), "DBD_PROC_PATH": str(d / "proc")}
        with (
            mock.patch.dict(os.environ, env),
            mock.patch.object(dbdctl, "CONTROL_FACTORY", _fake_factory(script)),
            _captured(),
        ):
            return dbdctl.main(argv)


def test_dbdctl_status_table_with_a_non_utf8_path() -> None:
    """`dbdctl status` raises UnicodeEncodeError when /proc/datto-info holds a non-UTF-8 path (the
    module does not escape paths) and stdout is strict UTF-8 (e.g. LANG=en_US.UTF-8)."""
    script = DriverScript({}, None, 0, True, NON_UTF8_PROC)
    assert _dbdctl_strict_stdout(["status"], script) == 0


def test_dbdctl_info_text_with_a_non_utf8_path() -> None:
    """`dbdctl info N` raises UnicodeEncodeError when the driver reports a non-UTF-8 COW path."""
    from tests.unit.fake_driver import info_bytes

    script = DriverScript({}, info_bytes(cow=b"/\xff.snap"), 0, True, None)
    assert _dbdctl_strict_stdout(["info", "0"], script) == 0
