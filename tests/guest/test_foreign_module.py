"""The harness tests a module it did not build from kernel/: a prebuilt one given with --ko.

Upstream's or a user's module cannot be downloaded in CI, so the foreign module is ours with a planted
bug (ci/mutants), built like any out-of-tree module and handed over as a directory of <target>.ko.
A pytest run with --ko must load that module, not kernel/'s, and so fail where the bug shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci import mutation
from harness import module_under_test
from harness.images import module_path

pytestmark = [pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
MUTANT = REPO / "ci" / "mutants" / "write-end-rounded-down.patch"
KILLER = "tests/guest/test_module_basic.py::test_partial_last_block_of_a_partition_is_tracked"


def _planted(tmp_path: Path) -> Path:
    """kernel/ copied with the planted bug applied, as ci/mutation does it."""
    why = mutation.apply(MUTANT, tmp_path)
    assert not why, f"{MUTANT.name} {why}"
    return tmp_path / "kernel"


@pytest.mark.deep
def test_a_prebuilt_module_given_with_ko_is_the_one_tested(target: str, tmp_path: Path) -> None:
    kodir = tmp_path / "ko"
    kodir.mkdir()
    shutil.copyfile(module_path(target, _planted(tmp_path)), kodir / f"{target}.ko")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (module_under_test.ENV_SRC, module_under_test.ENV_BUILD)
    }
    env[module_under_test.ENV_KO] = ""  # only the option below chooses the module
    argv = [sys.executable, "-m", "pytest", KILLER, "--kernel", target, "--ko", str(kodir)]
    r = subprocess.run(
        [*argv, "-p", "no:cacheprovider", "-p", "no:xdist", "-rf"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert f"module under test: --ko {kodir}" in out, out[-3000:]
    assert r.returncode == 1, (
        f"the planted bug was not found through --ko (exit {r.returncode}):\n{out[-3000:]}"
    )
    assert f"FAILED {KILLER}[{target}]" in out, out[-3000:]
