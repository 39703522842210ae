"""Parsing /proc/datto-info (spec §5), including upstream's unescaped strings and missing footer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_driver import EMPTY_PROC, SAMPLE_PROC

from pydbd.procinfo import (
    AutoExpand,
    ProcDevice,
    ProcFormatError,
    ProcInfo,
    parse_proc_info,
    read_proc_info,
    unquote,
)

HEAD = '{\n\t"version": "0.12.1",\n\t"devices": [\n'
FOOT = "\n\t]\n}\n"


def device_text(*fields: str) -> str:
    """A device object as the module prints it: TAB indents, no newline after the closing brace."""
    body = "\n".join(f"\t\t\t{f}" for f in fields)
    return "\t\t{\n" + body + "\n\t\t}"


def test_empty_list_has_a_blank_line() -> None:
    assert parse_proc_info(EMPTY_PROC) == ProcInfo("0.12.1", [])


def test_spec_example_verbatim() -> None:
    info = parse_proc_info(SAMPLE_PROC)
    assert info.version == "0.12.1"
    assert info.devices == [
        ProcDevice(
            minor=0,
            cow_file="/cow.snap",
            block_device="/dev/loop0",
            max_cache=314572800,
            fallocate=26214400,
            cow_size_current=47815065,
            seq_id=2,
            uuid="3f0c9a7e1d2b4c5a9e8f00112233aabb",
            version=1,
            nr_changed_blocks=517,
            auto_expand=AutoExpand(step_size_mib=20, reserved_space_mib=64),
            state=3,
        ),
        ProcDevice(
            minor=3, cow_file="/.datto", block_device="/dev/sdb1", max_cache=314572800, error=-22, state=5
        ),
    ]
    assert info.devices[0].state_name == "active snapshot"
    assert info.device(3) is info.devices[1]
    assert info.device(1) is None


def test_unverified_device_without_optional_fields() -> None:
    text = (
        HEAD
        + device_text(
            '"minor": 1,',
            '"cow_file": "/.datto",',
            '"block_device": "/dev/vdb1",',
            '"max_cache": 1024,',
            '"state": 4',
        )
        + FOOT
    )
    (dev,) = parse_proc_info(text).devices
    assert dev == ProcDevice(minor=1, cow_file="/.datto", block_device="/dev/vdb1", max_cache=1024, state=4)
    assert (dev.fallocate, dev.seq_id, dev.uuid, dev.auto_expand, dev.error) == (None,) * 5
    assert dev.to_dict() == {
        "minor": 1,
        "cow_file": "/.datto",
        "block_device": "/dev/vdb1",
        "max_cache": 1024,
        "state": 4,
    }


def _active_fields(cow: str = '"/c"', extra: tuple[str, ...] = ()) -> str:
    return device_text(
        '"minor": 2,',
        f'"cow_file": {cow},',
        '"block_device": "/dev/loop1",',
        '"max_cache": 314572800,',
        '"fallocate": 0,',
        '"cow_size_current": 4096,',
        '"seq_id": 1,',
        '"uuid": "00112233445566778899aabbccddeeff",',
        *extra,
        '"state": 2',
    )


def test_version_zero_omits_version_and_changed_blocks_and_error_field() -> None:
    (dev,) = parse_proc_info(HEAD + _active_fields(extra=('"error": -27,',)) + FOOT).devices
    assert dev.version is None and dev.nr_changed_blocks is None
    assert dev.error == -27
    assert dev.seq_id == 1 and dev.fallocate == 0


def test_auto_expand_block() -> None:
    auto = ('"auto_expand": {', '\t"step_size_mib": 5,', '\t"reserved_space_mib": 0', "},")
    (dev,) = parse_proc_info(HEAD + _active_fields(extra=auto) + FOOT).devices
    assert dev.auto_expand == AutoExpand(5, 0)
    assert dev.to_dict()["auto_expand"] == {"step_size_mib": 5, "reserved_space_mib": 0}


@pytest.mark.parametrize(
    "text",
    [
        '{\n\t"version": "0.12.1",\n\t"devices": [\n',
        '{\n\t"version": "0.12.1",\n\t"devices": [\n\n',
        '{\n\t"version": "0.12.1",\n\t"devices": [',
    ],
)
def test_missing_footer_quirk(text: str) -> None:
    assert parse_proc_info(text) == ProcInfo("0.12.1", [])


def test_unescaped_quote_and_backslash_in_paths() -> None:
    (dev,) = parse_proc_info(HEAD + _active_fields(cow='"/my "odd" dir\\x/c,"') + FOOT).devices
    # Upstream prints paths raw; everything between the first and the last quote is the value.
    assert dev.cow_file == '/my "odd" dir\\x/c,'


def test_raw_backslash_that_is_not_json_stays_raw() -> None:
    (dev,) = parse_proc_info(HEAD + _active_fields(cow='"C:\\dir\\q"') + FOOT).devices
    assert dev.cow_file == "C:\\dir\\q"


def test_json_escaped_path_is_unescaped() -> None:
    escaped = json.dumps('/we "quote"\\and\\slash')
    (dev,) = parse_proc_info(HEAD + _active_fields(cow=escaped) + FOOT).devices
    assert dev.cow_file == '/we "quote"\\and\\slash'


@pytest.mark.parametrize(
    ("raw", "expected"),
    [('"plain"', "plain"), ('""', ""), ('"a\\"b"', 'a"b'), ('"a"b"', 'a"b'), ("12", None), ('"x', None)],
)
def test_unquote(raw: str, expected: str | None) -> None:
    assert unquote(raw) == expected


@pytest.mark.parametrize(
    ("text", "lineno", "fragment"),
    [
        ("", 1, "unexpected end"),
        ("[\n", 1, "expected '{'"),
        ('{\n\t"version": 1,\n', 2, "version"),
        ('{\n\t"version": "0.12.1",\n\t"devs": [\n', 3, "devices"),
        (HEAD + '\t\t{\n\t\t\t"minor": x,\n', 5, "minor must be an integer"),
        (HEAD + "\t\t{\n\t\t\tminor: 1,\n", 5, "expected a field"),
        (HEAD + '\t\t{\n\t\t\t"minor": 1,\n\t\t\t"cow_file": 7,\n', 6, "quoted string"),
        (HEAD + '\t\t{\n\t\t\t"minor": 1,\n\t\t\t"bogus": 7,\n', 6, "unknown field"),
        (HEAD + '\t\t{\n\t\t\t"minor": 1,\n\t\t\t"minor": 1,\n', 6, "duplicate"),
        (HEAD + '\t\t{\n\t\t\t"minor": 1,\n\t\t\t"state": 3\n\t\t}' + FOOT, 4, "missing cow_file"),
        (HEAD + device_text('"minor": 1,', '"cow_file": "/c",', '"block_device": "/b",') + FOOT, 8, "field"),
        (EMPTY_PROC + "junk\n", 7, "trailing text"),
        (EMPTY_PROC.replace("\t]", "\t)"), 5, "expected ']'"),
        (HEAD + _active_fields() + "\n", 15, "unexpected end"),
    ],
)
def test_garbage_raises_with_line_number(text: str, lineno: int, fragment: str) -> None:
    with pytest.raises(ProcFormatError) as caught:
        parse_proc_info(text)
    assert caught.value.lineno == lineno
    assert str(caught.value).startswith(f"line {lineno}: ")
    assert fragment in str(caught.value)


def test_read_proc_info(tmp_path: Path) -> None:
    path = tmp_path / "datto-info"
    path.write_text(SAMPLE_PROC)
    assert read_proc_info(str(path)) == parse_proc_info(SAMPLE_PROC)


def test_to_dict_round_trips_through_json() -> None:
    data = parse_proc_info(SAMPLE_PROC).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["devices"][1] == {
        "minor": 3,
        "cow_file": "/.datto",
        "block_device": "/dev/sdb1",
        "max_cache": 314572800,
        "state": 5,
        "error": -22,
    }
