"""dbdctl against a fake driver: parsing, messages, streams and exit codes of spec §6.1."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys
import types
from pathlib import Path

import pytest
from fake_driver import SAMPLE_PROC, FakeIoctl, free_minor_bytes, info_bytes

from pydbd import abi, dbdctl
from pydbd.control import Control
from pydbd.dbdctl import USAGE, main, parse_minor, parse_number
from pydbd.errors import DattoError
from pydbd.procinfo import parse_proc_info

LOAD_ERROR = "driver does not appear to be loaded: Invalid argument\n"
IOCTL_ERROR = "driver returned an error performing specified action. check dmesg for more info: "


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIoctl:
    """A loaded fake module: /dev/datto-ctl and /proc/datto-info exist, ioctls go to a FakeIoctl."""
    (tmp_path / "datto-ctl").touch()
    (tmp_path / "datto-info").write_text(SAMPLE_PROC)
    monkeypatch.setenv("DBD_CTL_PATH", str(tmp_path / "datto-ctl"))
    monkeypatch.setenv("DBD_PROC_PATH", str(tmp_path / "datto-info"))
    monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    fake = FakeIoctl()
    monkeypatch.setattr(dbdctl, "CONTROL_FACTORY", lambda path: Control(path, ioctl=fake))
    return fake


@pytest.fixture
def unloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBD_CTL_PATH", str(tmp_path / "no-ctl"))
    monkeypatch.setenv("DBD_PROC_PATH", str(tmp_path / "no-info"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --- number parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("7", 7),
        ("10", 10),
        ("010", 8),
        ("08", 0),  # strtoll base 0 stops at the 8
        ("0178", 15),
        ("00", 0),
        ("9223372036854775806", 2**63 - 2),
    ],
)
def test_parse_number_accepts(text: str, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        *("", "-1", "+1", " 1", "1 ", "0x10", "1e3", "1.5", "١"),
        *("9223372036854775807", "99999999999999999999", "0777777777777777777777", "01777777777777777777777"),
    ],
)
def test_parse_number_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_number(text)


def test_parse_minor_truncates_to_32_bits() -> None:
    assert parse_minor("4294967296") == 0
    assert parse_minor("4294967297") == 1
    assert parse_minor("037777777777") == 0xFFFFFFFF
    with pytest.raises(ValueError):
        parse_minor("9223372036854775807")


# --- successful upstream sub-commands ------------------------------------------------------------


def test_setup_snapshot_with_options(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "setup-snapshot", "-c", "1024", "-f", "010", "/dev/loop0", "/mnt/cow", "3") == (
        0,
        "",
        "",
    )
    call = driver.last
    assert call.request == abi.IOCTL_SETUP_SNAP
    assert struct.unpack_from("<QQI", call.data, 16) == (8, 1024, 3)
    assert call.strings == ("/dev/loop0", "/mnt/cow")


def test_options_may_follow_positionals(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "setup-snapshot", "/dev/loop0", "/cow", "3", "-f", "5", "-c77")[0] == 0
    assert struct.unpack_from("<QQI", driver.last.data, 16) == (5, 77, 3)
    assert driver.last.strings == ("/dev/loop0", "/cow")


def test_double_dash_ends_options(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "setup-snapshot", "-c", "1", "--", "-odd", "/cow", "0")[0] == 0
    assert driver.last.strings == ("-odd", "/cow")


def test_posixly_correct_disables_permutation(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    status, _, err = run(capsys, "setup-snapshot", "/dev/loop0", "/cow", "3", "-c", "5")
    assert (status, err) == (255, "error interpreting setup snapshot parameters: Invalid argument\n")


@pytest.mark.parametrize(
    ("argv", "number", "payload"),
    [
        (["reload-snapshot", "-c", "4096", "/dev/sdb1", "/.datto", "2"], abi.IOCTL_RELOAD_SNAP, (4096, 2)),
        (["reload-incremental", "/dev/sdb1", "/.datto", "2"], abi.IOCTL_RELOAD_INC, (0, 2)),
        (["reload-incremental", "/dev/sdb1", "/.datto", "2", "-c010"], abi.IOCTL_RELOAD_INC, (8, 2)),
    ],
)
def test_reload(
    driver: FakeIoctl,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    number: int,
    payload: tuple[int, int],
) -> None:
    assert run(capsys, *argv) == (0, "", "")
    assert driver.last.request == number
    assert struct.unpack_from("<QI", driver.last.data, 16) == payload
    assert driver.last.strings == ("/dev/sdb1", "/.datto")


@pytest.mark.parametrize(
    ("argv", "number", "data"),
    [
        (["destroy", "010"], abi.IOCTL_DESTROY, struct.pack("<I", 8)),
        (["destroy", "4294967297"], abi.IOCTL_DESTROY, struct.pack("<I", 1)),
        (["transition-to-incremental", "1"], abi.IOCTL_TRANSITION_INC, struct.pack("<I", 1)),
        (["reconfigure", "2"], abi.IOCTL_RECONFIGURE, struct.pack("<QII", 0, 2, 0)),
        (["reconfigure", "2", "-c", "4096"], abi.IOCTL_RECONFIGURE, struct.pack("<QII", 4096, 2, 0)),
        (["expand-cow-file", "100", "1"], abi.IOCTL_EXPAND_COW_FILE, struct.pack("<QII", 100, 1, 0)),
        (
            ["reconfigure-auto-expand", "-r", "64", "20", "0"],
            abi.IOCTL_RECONFIGURE_AUTO_EXPAND,
            struct.pack("<QQII", 20, 64, 0, 0),
        ),
        (
            ["reconfigure-auto-expand", "20", "0"],
            abi.IOCTL_RECONFIGURE_AUTO_EXPAND,
            struct.pack("<QQII", 20, 0, 0, 0),
        ),
    ],
)
def test_numeric_commands(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], argv: list[str], number: int, data: bytes
) -> None:
    assert run(capsys, *argv) == (0, "", "")
    assert (driver.last.request, driver.last.data) == (number, data)


@pytest.mark.parametrize(
    "argv",
    [
        ["transition-to-snapshot", "-f", "50", "/.datto1", "0"],
        ["transition-to-snapshot", "/.datto1", "0", "-f50"],
    ],
)
def test_transition_to_snapshot(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run(capsys, *argv) == (0, "", "")
    assert driver.last.request == abi.IOCTL_TRANSITION_SNAP
    assert struct.unpack_from("<QI", driver.last.data, 8) == (50, 0)
    assert driver.last.strings == ("/.datto1",)


# --- bad command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["setup-snapshot", "/dev/a", "/c"], "setup snapshot"),
        (["setup-snapshot", "/dev/a", "/c", "0", "1"], "setup snapshot"),
        (["setup-snapshot", "/dev/a", "/c", "x"], "setup snapshot"),
        (["setup-snapshot", "-c", "1k", "/dev/a", "/c", "0"], "setup snapshot"),
        (["setup-snapshot", "-f", "-1", "/dev/a", "/c", "0"], "setup snapshot"),
        (["setup-snapshot", "/dev/a", "/c", "9223372036854775807"], "setup snapshot"),
        (["reload-snapshot", "/dev/a", "0"], "reload snapshot"),
        (["reload-snapshot", "-c", "", "/dev/a", "/c", "0"], "reload snapshot"),
        (["reload-incremental", "/dev/a", "/c", "0x1"], "reload incremental"),
        (["destroy"], "destroy"),
        (["destroy", "0", "1"], "destroy"),
        (["destroy", "-1"], "destroy"),
        (["destroy", "--", "0"], "destroy"),  # no getopt: exactly one word
        (["transition-to-incremental"], "transition to incremental"),
        (["transition-to-incremental", " 1"], "transition to incremental"),
        (["transition-to-snapshot", "0"], "transition to snapshot"),
        (["transition-to-snapshot", "-f", "x", "/c", "0"], "transition to snapshot"),
        (["reconfigure"], "reconfigure"),
        (["reconfigure", "0", "1"], "reconfigure"),
        (["reconfigure", "-c", "-5", "0"], "reconfigure"),
        (["expand-cow-file", "1"], "expand"),
        (["expand-cow-file", "0x1", "0"], "expand"),
        (["expand-cow-file", "-r", "1", "1", "0"], "expand"),
        (["reconfigure-auto-expand", "0"], "reconfigure auto expand"),
        (["reconfigure-auto-expand", "x", "0"], "reconfigure auto expand"),  # upstream sent 0
        (["reconfigure-auto-expand", "-r", "1.5", "1", "0"], "reconfigure auto expand"),
    ],
)
def test_bad_arguments(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], argv: list[str], what: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 255
    assert err == f"error interpreting {what} parameters: Invalid argument\n"
    assert out == USAGE
    assert driver.calls == []


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["setup-snapshot", "-x", "/dev/a", "/c", "0"], "invalid option -- 'x'"),
        (["setup-snapshot", "/dev/a", "/c", "0", "-c"], "option requires an argument -- 'c'"),
        (["reload-snapshot", "--json", "/a", "/c", "0"], "invalid option -- '-'"),
        (["reload-incremental", "-f", "1", "/a", "/c", "0"], "invalid option -- 'f'"),
        (["transition-to-snapshot", "-c", "1", "/c", "0"], "invalid option -- 'c'"),
        (["reconfigure-auto-expand", "-n", "3", "1", "0"], "invalid option -- 'n'"),
    ],
)
def test_getopt_diagnostics_precede_the_error(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    # getopt names the sub-command as the program: upstream hands it argv + 1.
    what = argv[0].replace("-", " ")
    status, out, err = run(capsys, *argv)
    assert status == 255
    assert err == f"{argv[0]}: {complaint}\nerror interpreting {what} parameters: Invalid argument\n"
    assert out == USAGE


def test_bad_value_stops_option_scanning_before_a_later_bad_option(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, err = run(capsys, "setup-snapshot", "-c", "bad", "-x", "/dev/a", "/c", "0")
    assert err == "error interpreting setup snapshot parameters: Invalid argument\n"


# --- top level -----------------------------------------------------------------------------------


def test_no_subcommand_prints_usage_on_stdout(unloaded: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys) == (255, USAGE, "")


@pytest.mark.parametrize("word", ["help", "--help", "-h"])
def test_help_works_without_the_module(unloaded: None, capsys: pytest.CaptureFixture[str], word: str) -> None:
    assert run(capsys, word) == (0, USAGE, "")


def test_usage_lists_every_command() -> None:
    for command in [*dbdctl._COMMANDS, "info", "status", "get-free", "cow-info", "persist-reload", "help"]:
        assert f"  {command}" in USAGE


@pytest.mark.parametrize(
    "argv", [["destroy", "0"], ["bogus"], ["get-free"], ["info", "0"], ["persist-reload", "0"], ["status"]]
)
def test_missing_module(unloaded: None, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert run(capsys, *argv) == (255, "", LOAD_ERROR)


def test_unknown_subcommand_prints_usage(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate") == (255, USAGE, "")


def test_ioctl_failure_message_and_hint(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.errors[abi.IOCTL_DESTROY] = errno.EBUSY
    status, out, err = run(capsys, "destroy", "0")
    assert (status, out) == (255, "")
    assert err.splitlines() == [
        IOCTL_ERROR + "Device or resource busy",
        "dbdctl: /dev/datto0 is open (mounted?) — unmount it first",
    ]


def test_setup_failure_hint(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.errors[abi.IOCTL_SETUP_SNAP] = errno.EBUSY
    _, _, err = run(capsys, "setup-snapshot", "/dev/loop0", "/cow", "0")
    assert err.splitlines()[0] == IOCTL_ERROR + "Device or resource busy"
    assert "dbdctl get-free" in err.splitlines()[1]


def test_einval_on_a_failed_tracer_names_its_error(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guest-test case this came from: the COW file filled up a second after setup, and the
    transition's EINVAL said only "possible causes"; now dbdctl asks INFO and names the cause."""
    driver.errors[abi.IOCTL_TRANSITION_INC] = errno.EINVAL
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(state=3, error=-errno.EFBIG)
    status, _, err = run(capsys, "transition-to-incremental", "0")
    lines = err.splitlines()
    assert status == 255 and lines[0] == IOCTL_ERROR + "Invalid argument"
    assert lines[1].startswith("dbdctl: the tracer on minor 0 has failed with EFBIG (File too large); ")
    assert "larger -f" in lines[1]


def test_einval_on_a_tracer_in_the_wrong_state_names_both_states(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str]
) -> None:
    driver.errors[abi.IOCTL_TRANSITION_SNAP] = errno.EINVAL
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(state=3)
    _, _, err = run(capsys, "transition-to-snapshot", "/cow2", "0")
    assert err.splitlines()[1] == (
        "dbdctl: transition-to-snapshot needs minor 0 in state 2 (active incremental), "
        "but it is in state 3 (active snapshot)"
    )


def test_einval_unexplained_by_info_keeps_the_generic_hint(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str]
) -> None:
    driver.errors[abi.IOCTL_TRANSITION_INC] = errno.EINVAL
    driver.errors[abi.IOCTL_DATTOBD_INFO] = errno.ENOENT  # the tracer vanished meanwhile
    _, _, err = run(capsys, "transition-to-incremental", "0")
    assert err.splitlines()[1].startswith("dbdctl: minor 0 is not an active snapshot (state 3)")


def test_unopenable_control_device_is_an_ioctl_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str) -> Control:
        raise DattoError("open", None, errno.EACCES, path)

    (tmp_path / "ctl").touch()
    monkeypatch.setenv("DBD_CTL_PATH", str(tmp_path / "ctl"))
    monkeypatch.setattr(dbdctl, "CONTROL_FACTORY", refuse)
    status, _, err = run(capsys, "destroy", "0")
    assert status == 255
    assert err.startswith(IOCTL_ERROR + "Permission denied\ndbdctl: ")
    assert "root" in err


def test_console_entry_reads_sys_argv(
    unloaded: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["dbdctl", "help"])
    assert main() == 0


# --- additions -----------------------------------------------------------------------------------


def test_get_free(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.replies[abi.IOCTL_GET_FREE] = free_minor_bytes(4)
    assert run(capsys, "get-free") == (0, "4\n", "")


def test_get_free_none_left(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.errors[abi.IOCTL_GET_FREE] = errno.ENOENT
    status, _, err = run(capsys, "get-free")
    assert status == 255
    assert err.startswith(IOCTL_ERROR + "No such file or directory\n")
    assert "every minor is in use" in err


def test_get_free_takes_no_arguments(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "get-free", "0") == (
        255,
        USAGE,
        "error interpreting get free parameters: Invalid argument\n",
    )


def test_info_pretty(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(minor=2, state=3, seqid=7, nr_changed_blocks=9)
    status, out, err = run(capsys, "info", "2")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert "minor:          2" in lines
    assert "state:          3 (active snapshot)" in lines
    assert "block device:   /dev/loop0" in lines
    assert "uuid:           000102030405060708090a0b0c0d0e0f" in lines
    assert "seq id:         7" in lines
    assert "error:          -" in lines
    assert struct.unpack_from("<I", driver.last.data) == (2,)


def test_info_json(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(minor=1, state=2, error=-27)
    status, out, _ = run(capsys, "info", "--json", "1")
    assert status == 0
    data = json.loads(out)
    assert data["state_name"] == "active incremental"
    assert data["error"] == -27
    assert data["cow_file"] == "/cow.snap"
    assert data["uuid"] == bytes(range(16)).hex()


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["info"], "error interpreting info parameters: Invalid argument\n"),
        (["info", "x"], "error interpreting info parameters: Invalid argument\n"),
        (
            ["info", "0", "--yaml"],
            "info: unrecognized option '--yaml'\nerror interpreting info parameters: Invalid argument\n",
        ),
        (
            ["info", "0", "--json=1"],
            "info: option '--json' doesn't allow an argument\n"
            "error interpreting info parameters: Invalid argument\n",
        ),
    ],
)
def test_info_bad_arguments(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], argv: list[str], err: str
) -> None:
    assert run(capsys, *argv) == (255, USAGE, err)


def test_info_missing_minor(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    driver.errors[abi.IOCTL_DATTOBD_INFO] = errno.ENOENT
    status, _, err = run(capsys, "info", "5")
    assert status == 255
    assert err.splitlines()[1] == "dbdctl: no tracer on minor 5; `dbdctl status` lists the tracked minors"


def test_status_table(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "status")
    assert (status, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split() == [
        "MINOR",
        "STATE",
        "BLOCK",
        "DEVICE",
        "COW",
        "FILE",
        "SEQ",
        "CHANGED",
        "COW",
        "SIZE",
        "ERROR",
    ]
    assert first.split() == ["0", "active", "snapshot", "/dev/loop0", "/cow.snap", "2", "517", "45.6MiB", "-"]
    assert second.split() == [
        "3",
        "unverified",
        "snapshot",
        "/dev/sdb1",
        "/.datto",
        "-",
        "-",
        "-",
        "-22",
        "(EINVAL)",
    ]
    assert driver.calls == []  # status reads /proc only


def test_status_json(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "status", "--json")
    assert status == 0
    assert json.loads(out) == parse_proc_info(SAMPLE_PROC).to_dict()


def test_status_one_minor(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "status", "--json", "3")
    assert status == 0
    assert json.loads(out)["error"] == -22
    status, out, _ = run(capsys, "status", "0")
    assert len(out.splitlines()) == 2


def test_status_unknown_minor(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "status", "5") == (255, "", "dbdctl: no tracer on minor 5\n")


def test_status_empty(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    Path(os.environ["DBD_PROC_PATH"]).write_text('{\n\t"version": "0.12.1",\n\t"devices": [\n\n\t]\n}\n')
    assert run(capsys, "status") == (0, "no tracked devices\n", "")


def test_status_needs_only_the_proc_file(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBD_CTL_PATH", str(tmp_path / "gone"))
    assert run(capsys, "status")[0] == 0


def test_status_garbage(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    Path(os.environ["DBD_PROC_PATH"]).write_text("{\nnope\n")
    status, out, err = run(capsys, "status")
    assert (status, out) == (255, "")
    assert err.startswith("dbdctl: cannot parse ") and "line 2: " in err


def test_status_bad_arguments(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "status", "0", "1")[:2] == (255, USAGE)
    assert run(capsys, "status", "-1")[2].startswith("status: invalid option -- '1'\n")


def _persist(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path, **info: object
) -> tuple[int, str, str, Path]:
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(**info)  # type: ignore[arg-type]
    target = tmp_path / "dla"
    status, out, err = run(capsys, "persist-reload", "0", "--dir", str(target))
    return status, out, err, target / "reload_0"


def test_persist_reload_snapshot(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err, script = _persist(driver, capsys, tmp_path, state=3)
    assert (status, out, err) == (0, f"wrote {script}\n", "")
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert text.splitlines()[-1] == "exec dbdctl reload-snapshot /dev/loop0 /cow.snap 0"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert [p.name for p in script.parent.iterdir()] == ["reload_0"]  # no temporary left behind


def test_persist_reload_incremental_with_cache_and_quoting(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, _, _, script = _persist(
        driver, capsys, tmp_path, minor=0, state=0, cache_size=4096, cow=b"/my cow", bdev=b"/dev/sdb1"
    )
    assert (
        script.read_text().splitlines()[-1] == "exec dbdctl reload-incremental -c 4096 /dev/sdb1 '/my cow' 0"
    )


def test_persist_reload_refuses_failed_tracer(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err, script = _persist(driver, capsys, tmp_path, error=-27)
    assert (status, out) == (255, "")
    assert "has failed (-27 (EFBIG))" in err
    assert not script.exists()


def test_persist_reload_default_dir_and_equals_form(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    driver.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(minor=6)
    assert run(capsys, "persist-reload", f"--dir={tmp_path}", "6")[0] == 0
    assert (tmp_path / "reload_6").exists()
    assert dbdctl.DEFAULT_PERSIST_DIR == "/etc/datto/dla"


def test_persist_reload_without_tracer(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    driver.errors[abi.IOCTL_DATTOBD_INFO] = errno.ENOENT
    status, _, err = run(capsys, "persist-reload", "2", "--dir", str(tmp_path / "dla"))
    assert status == 255
    assert err.startswith(IOCTL_ERROR)
    assert not (tmp_path / "dla").exists()


def test_persist_reload_needs_dir_value(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(capsys, "persist-reload", "2", "--dir")
    assert err.startswith("persist-reload: option '--dir' requires an argument\n")


def test_cow_info_delegates_without_the_module(
    unloaded: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake_module = types.ModuleType("pydbd.cowinfo")
    fake_module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pydbd.cowinfo", fake_module)
    assert main(["cow-info", "/x.cow", "--sectors", "8", "--json"]) == 7
    assert seen == [["/x.cow", "--sectors", "8", "--json"]]


def test_lone_dash_is_a_positional(driver: FakeIoctl, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "transition-to-snapshot", "-", "0", "-f", "1")[0] == 0
    assert driver.last.strings == ("-",)


def test_gnu_getopt_long_and_short_forms() -> None:
    got = dbdctl.gnu_getopt(
        "p", ["a", "--dir=x", "-c", "-5", "b", "--json"], "c:", {"dir": True, "json": False}
    )
    assert got.options == [("dir", "x"), ("c", "-5"), ("json", None)]
    assert (got.positionals, got.diagnostic) == (["a", "b"], None)


def test_setup_refuses_a_cow_size_that_cannot_hold_its_own_index(
    driver: FakeIoctl, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 GiB: 2 Mi blocks, a 16 MiB index after the 4 KiB header, so -f 16 leaves no room for a copy
    (the module would accept it and fail the snapshot with EFBIG at once); -f 17 is the least."""
    monkeypatch.setattr(dbdctl, "DEVICE_SIZE", lambda path: 8 << 30 if path == "/dev/vdb" else None)
    status, _, err = run(capsys, "setup-snapshot", "-f", "16", "/dev/vdb", "/mnt/.datto", "0")
    assert status == 255
    assert err.startswith("dbdctl: setup-snapshot -f 16 on /dev/vdb (8.0GiB): ")
    assert "16.0MiB" in err and "EFBIG" in err and "use -f 17 or more" in err
    assert abi.IOCTL_SETUP_SNAP not in [call.request for call in driver.calls]
    # enough room, the default size, or a size dbdctl cannot learn: the driver decides
    for argv in (["-f", "17", "/dev/vdb"], ["/dev/vdb"], ["-f", "1", "/dev/other"]):
        assert run(capsys, "setup-snapshot", *argv, "/mnt/.datto", "0")[0] == 0
    assert [call.request for call in driver.calls].count(abi.IOCTL_SETUP_SNAP) == 3


def test_block_device_size_is_only_read_from_block_devices(tmp_path: Path) -> None:
    regular = tmp_path / "image"
    regular.write_bytes(b"\0" * 8192)
    assert dbdctl._block_device_size(str(regular)) is None
    assert dbdctl._block_device_size(str(tmp_path / "missing")) is None
