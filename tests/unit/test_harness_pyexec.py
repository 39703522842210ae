"""Guest.py() plumbing: the runner executed by the host python (host only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import pyexec
from harness.errors import GuestError, GuestPythonError


def _run(tmp_path: Path, code: str) -> Any:
    files = pyexec.write_job(tmp_path, "t1", code)
    p = subprocess.run(
        [sys.executable, *files.guest_args(str(tmp_path)).split()], capture_output=True, text=True
    )
    return pyexec.read_result(files, p.returncode, p.stdout, p.stderr)


def test_result_round_trip(tmp_path: Path) -> None:
    got = _run(tmp_path, "import os\nresult = {'a': (1, 2), 'b': b'\\x00\\xff', 'c': None, 'd': [b'x']}")
    assert got == {"a": [1, 2], "b": b"\x00\xff", "c": None, "d": [b"x"]}
    assert _run(tmp_path, "x = 1") is None


def test_oserror_keeps_errno(tmp_path: Path) -> None:
    with pytest.raises(GuestPythonError) as ei:
        _run(tmp_path, "import os\nos.open('/nonexistent/x', os.O_RDONLY)")
    e = ei.value
    assert (e.type, e.errno, e.strerror) == ("FileNotFoundError", 2, "No such file or directory")
    assert "t1.snippet.py" in e.traceback


def test_other_exceptions_and_unserializable_results(tmp_path: Path) -> None:
    with pytest.raises(GuestPythonError) as ei:
        _run(tmp_path, "raise ValueError('bad value')")
    assert (ei.value.type, ei.value.errno, ei.value.message) == ("ValueError", None, "bad value")
    with pytest.raises(GuestPythonError) as ei:
        _run(tmp_path, "result = object()")
    assert ei.value.type == "TypeError"


def test_missing_result_file_is_guest_error(tmp_path: Path) -> None:
    files = pyexec.write_job(tmp_path, "t2", "result = 1")
    with pytest.raises(GuestError, match="no result"):
        pyexec.read_result(files, 127, "", "python3: not found")
