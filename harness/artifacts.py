"""Where failing tests leave their evidence: `${DBD_ARTIFACTS:-<repo>/artifacts}/<test-id>/`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from harness.qemu import REPO_ROOT


def artifacts_root() -> Path:
    return Path(os.environ.get("DBD_ARTIFACTS") or REPO_ROOT / "artifacts")


def max_artifact_bytes() -> int:
    """Registered files larger than this (allocated size, so sparse images count small) are skipped."""
    return int(float(os.environ.get("DBD_ARTIFACT_MAX_MIB", "64")) * (1 << 20))


def safe_name(test_id: str) -> str:
    """A directory name for a pytest node id or guest name: tests/x.py::test_a[debian-6.1] ->
    tests-x.py--test_a-debian-6.1"""
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "-", test_id.replace("::", "--")).strip("-.")
    return name[:180] or "guest"


def test_dir(test_id: str) -> Path:
    return artifacts_root() / safe_name(test_id)


def copy_small(src: Path, dest_dir: Path, limit: int | None = None) -> str:
    """Copy `src` into dest_dir (sparse-aware) if small enough; returns a line for the index file."""
    limit = max_artifact_bytes() if limit is None else limit
    try:
        st = src.stat()
    except OSError as e:
        return f"missing  {src}: {e.strerror}"
    allocated = st.st_blocks * 512
    if min(allocated, st.st_size) > limit:
        return f"skipped  {src}: {st.st_size} bytes ({allocated} allocated) > limit {limit}"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    if subprocess.run(["cp", "--sparse=always", str(src), str(dest)], capture_output=True).returncode != 0:
        shutil.copyfile(src, dest)
    return f"copied   {src} -> {dest.name}"
