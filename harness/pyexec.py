"""Guest.py(): run a Python snippet in the guest and bring back `result` or the exception, structured.

The snippet and a small runner go into the exchange dir; the runner execs the snippet and writes a JSON
file next to it: {"ok": true, "result": ...} or {"ok": false, "type", "errno", "message", ...}.
bytes survive the trip ({"__bytes__": base64}); tuples come back as lists.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import GuestError, GuestPythonError

RUNNER = r"""
import base64, json, sys, traceback

def enc(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(o)).decode()}
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    raise TypeError(f"result of type {type(o).__name__} is not JSON serializable")

def fix(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return enc(o)
    if isinstance(o, dict):
        return {k: fix(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [fix(v) for v in o]
    return o

code_path, out_path = sys.argv[1], sys.argv[2]
ns = {"__name__": "__guest__"}
try:
    with open(code_path) as f:
        exec(compile(f.read(), code_path, "exec"), ns)
    out = json.dumps({"ok": True, "result": fix(ns.get("result"))}, default=enc)
except BaseException as e:
    out = json.dumps({
        "ok": False,
        "type": type(e).__name__,
        "module": type(e).__module__,
        "errno": e.errno if isinstance(e, OSError) else None,
        "strerror": e.strerror if isinstance(e, OSError) else None,
        "message": str(e),
        "traceback": traceback.format_exc(),
    })
with open(out_path + ".tmp", "w") as f:
    f.write(out)
import os
os.rename(out_path + ".tmp", out_path)
"""


@dataclass(frozen=True)
class JobFiles:
    runner: Path
    code: Path
    result: Path

    def guest_args(self, guest_dir: str) -> str:
        return f"{guest_dir}/{self.runner.name} {guest_dir}/{self.code.name} {guest_dir}/{self.result.name}"


def write_job(directory: Path, token: str, code: str) -> JobFiles:
    directory.mkdir(parents=True, exist_ok=True)
    runner = directory / "runner.py"
    if not runner.exists():
        runner.write_text(RUNNER)
    files = JobFiles(runner, directory / f"{token}.snippet.py", directory / f"{token}.json")
    files.result.unlink(missing_ok=True)
    files.code.write_text(code)
    return files


def decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def read_result(files: JobFiles, rc: int, stdout: str, stderr: str) -> Any:
    """The snippet's `result`, or raise GuestPythonError / GuestError (interpreter failed to start)."""
    try:
        data = json.loads(files.result.read_text())
    except (OSError, ValueError) as e:
        raise GuestError(
            f"guest python produced no result (rc={rc}, {e!r})\n--- stdout ---\n{stdout[-4000:]}"
            f"\n--- stderr ---\n{stderr[-4000:]}"
        ) from None
    finally:
        files.code.unlink(missing_ok=True)
    files.result.unlink(missing_ok=True)
    if data.get("ok"):
        return decode(data.get("result"))
    raise GuestPythonError(
        type=data.get("type", "Exception"),
        message=data.get("message", ""),
        errno=data.get("errno"),
        strerror=data.get("strerror"),
        traceback=data.get("traceback", ""),
        module=data.get("module", "builtins"),
    )
