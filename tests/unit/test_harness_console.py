"""Console + Shell protocol against a local bash standing in for the guest (host only)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.console import Console, Shell
from harness.errors import GuestCrashError, GuestTimeout

# +m: no job control, so the commands stay in the shell's process group and die with it, as a
# guest's processes die with QEMU
FAKE_INIT = "echo booting; echo TESTINIT-START; exec bash --norc --noprofile +m -i"


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    xchg = tmp_path / "xchg"
    xchg.mkdir()
    con = Console(["bash", "-c", FAKE_INIT], tmp_path / "console.log")
    sh = Shell(con, xchg, str(xchg), tmp_path / "commands.log")
    m = con.expect("TESTINIT-START", 10)
    assert m is not None
    sh.init(m.start(), 10)
    yield sh
    con.close()


def test_exact_binary_output_and_status(shell: Shell) -> None:
    r = shell.run(r"printf 'a\0b\377\r\n'; echo err >&2; exit 3", 10)
    assert (r.stdout, r.stderr, r.rc) == (b"a\x00b\xff\r\n", b"err\n", 3)


def test_long_output_and_multiline_commands(shell: Shell) -> None:
    r = shell.run("seq 1 200000", 30)
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 200001)).encode()
    script = "cat <<'EOF'\nline '1' \"$HOME\"\nEOF\nfor i in 1 2; do echo $i; done"
    assert shell.run(script, 10).stdout == b"line '1' \"$HOME\"\n1\n2\n"
    assert shell.run("x" * 10000 + "=1; echo ok", 10).stdout == b"ok\n"  # longer than a tty line


def test_commands_run_in_subshells_with_null_stdin(shell: Shell) -> None:
    assert shell.run("cd /; export FOO=1; cat", 10).rc == 0
    assert shell.run("echo ${FOO:-unset}", 10).stdout == b"unset\n"


def test_console_noise_does_not_corrupt_results(shell: Shell) -> None:
    # Output written straight to the console (like printk) lands between markers, not in results.
    r = shell.run("for i in 1 2 3; do echo NOISE-$i >/dev/tty; done; echo result", 10)
    assert r.stdout == b"result\n"
    assert "NOISE-3" in shell.console.text_from(0)


def test_timeout_kills_and_reports_tail(shell: Shell, tmp_path: Path) -> None:
    shell.run("echo before-timeout >/dev/tty", 10)
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as ei:
        shell.run("sleep 30", 1)
    assert time.monotonic() - t0 < 10  # killed, not waited for: the command would take 30 s
    assert "before-timeout" in ei.value.console_tail
    assert not shell.console.alive() and shell.console.killed
    assert "before-timeout" in (tmp_path / "console.log").read_text()
    assert not shell.ready


def test_exit_during_command_is_a_crash(shell: Shell) -> None:
    with pytest.raises(GuestCrashError):
        shell.run("kill -9 $$", 10)  # the "guest" shell dies: console EOF


def test_commands_log(shell: Shell, tmp_path: Path) -> None:
    shell.run("true", 10)
    shell.run("false", 10)
    log = (tmp_path / "commands.log").read_text().splitlines()
    assert log[0].startswith("[1] rc=0") and log[1].startswith("[2] rc=1") and log[1].endswith("false")
