"""kernel/ passes the kernel's own checkpatch.pl, except for the compat layer's deliberate constructs.

checkpatch.pl comes from the source tree of the debug kernel target (vmimages/srckernel.py), which
`./run-tests` has cached before this runs on any machine that ran the matrix once.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[2] / "kernel"
# (file, message) pairs checkpatch reports that we keep on purpose, with why.
ACCEPTED = {
    # the void-vs-blk_qc_t return of submit_bio hooks differs by kernel: a typedef and a
    # return macro hide it from the snapshot code (the compat layer's whole point)
    ("kernel/compat.h", "do not add new typedefs"),
    ("kernel/compat.h", "Macros with flow control statements should be avoided"),
    ("kernel/compat.h", "Macros with complex values should be enclosed in parentheses"),
    # the pre-5.11 branch of dbd_kmap(): kmap_local_page() does not exist there
    ("kernel/compat.h", "Deprecated use of 'kmap_atomic', prefer 'kmap_local_page' instead"),
    ("kernel/compat.h", "Deprecated use of 'kunmap_atomic', prefer 'kunmap_local' instead"),
    # ftrace_set_filter() takes a writable buffer
    ("kernel/lifecycle.c", "static char array declaration should probably be static const char"),
}


def _checkpatch() -> Path | None:
    from vmimages.cache import cache_dir

    hits = sorted((cache_dir() / "kernel").glob("*/src/scripts/checkpatch.pl"))
    return hits[-1] if hits else None


def test_kernel_sources_pass_checkpatch() -> None:
    script = _checkpatch()
    if script is None or shutil.which("perl") is None:
        pytest.skip(
            "checkpatch.pl comes with the debug kernel: python -m vmimages build --target debian-6.12-debug"
        )
    files = sorted(str(p.relative_to(KERNEL.parent)) for p in (*KERNEL.glob("*.c"), *KERNEL.glob("*.h")))
    p = subprocess.run(
        ["perl", str(script), "--no-tree", "--terse", "--show-types", "-f", *files],
        cwd=KERNEL.parent, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = []
    for line in p.stdout.splitlines():
        parts = line.split(":", 3)
        if len(parts) < 4 or parts[2].strip() not in ("ERROR", "WARNING", "CHECK"):
            continue
        message = parts[3].split(":", 1)[1].strip() if ":" in parts[3] else parts[3].strip()
        if (parts[0], message) not in ACCEPTED:
            found.append(line)
    assert files and not found, "checkpatch.pl:\n" + "\n".join(found)
