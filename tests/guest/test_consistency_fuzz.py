"""The consistency state machine (fuzz/guest_machine.py) on a real module in one long-lived guest.

CI runs a short derandomized budget: the same examples every run, so a failure here is a change
in the module, not luck. `fuzz/run` runs the same test with fresh examples for a time budget
(DBD_FUZZ_MINUTES, DBD_FUZZ_RANDOM=1) and a Hypothesis database kept in the harness cache, and
exports each shrunk failure to tests/regressions/ (DBD_REGRESSIONS_DIR).

The boot rules (clean reboot, power cut: ~30-60 s each under TCG) run in about one example out of
DBD_FUZZ_BOOT_ONE_IN (default: never in the derandomized CI round, 1 in 6 in random campaigns).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fuzz.guest_machine import DISK_MIB, CampaignResult, prepare, replay, run_campaign
from harness import artifacts
from harness.guest import Guest
from harness.pytest_plugin import Volume
from harness.qemu import DiskSpec

EXAMPLES_PER_ROUND = int(os.environ.get("DBD_FUZZ_EXAMPLES", "4"))
RANDOM = os.environ.get("DBD_FUZZ_RANDOM") == "1"
# Examples start in any tracer mode (setup and transition recorded as steps): 15 steps keep the
# derandomized CI round as long as the 20 steps it had before the backup/update-img checks.
STEPS_PER_EXAMPLE = int(os.environ.get("DBD_FUZZ_STEPS") or ("20" if RANDOM else "15"))
BOOT_ONE_IN = int(os.environ.get("DBD_FUZZ_BOOT_ONE_IN") or ("6" if RANDOM else "0"))


# setup-snapshot, transition-to-incremental, file activity and raw writes, transition-to-snapshot
ROUND = [
    ("setup_snapshot", {"cache_bytes": 0, "backup": False}),
    ("transition_to_incremental", {}),
    ("file_activity", {"seed": 7, "count": 6, "fsync": True}),
    ("write", {"first": 3, "count": 5}),
    ("transition_to_snapshot", {"delete_old": True}),
]


def _database(target: str) -> Path | None:
    if not RANDOM:
        return None
    from vmimages.cache import cache_dir

    return cache_dir() / "hypothesis-guest" / target


@pytest.mark.debugkernel
@pytest.mark.guest_config(disks=[DiskSpec(DISK_MIB)])
def test_consistency_state_machine(
    target: str, module_guest: Guest, ext4_volume: Volume, request: pytest.FixtureRequest
) -> None:
    env = prepare(module_guest, ext4_volume.device, ext4_volume.mountpoint, boot_one_in=BOOT_ONE_IN)
    examples = EXAMPLES_PER_ROUND
    export_dir = Path(os.environ.get("DBD_REGRESSIONS_DIR") or artifacts.test_dir(request.node.nodeid))
    minutes = float(os.environ.get("DBD_FUZZ_MINUTES", "0"))
    deadline = time.monotonic() + minutes * 60
    start = time.monotonic()
    rounds = 0
    while True:  # one derandomized round in CI; rounds of fresh examples until the budget in campaigns
        run_campaign(
            env,
            max_examples=examples,
            steps=STEPS_PER_EXAMPLE,
            database_dir=_database(target),
            derandomize=not RANDOM,
            kernel=target,
            export_dir=export_dir,
        )
        rounds += 1
        if time.monotonic() >= deadline:
            break
    # One backup round that always reaches a closed change list, whatever the examples drew: the
    # whole-device precision bound must have judged at least one.
    replay(env, ROUND)
    result = CampaignResult(env.examples, env.steps, time.monotonic() - start)
    print(
        f"\n{target}: {result.line()}, {rounds} round(s), {env.client.calls} agent calls, "
        f"{env.boots} boot(s), {env.small_caches} tiny index cache(s), {env.precision_checks} change "
        f"list(s) bounded over the whole device (at most {env.most_spurious} spurious blocks)"
    )
    request.node.user_properties.extend(
        [
            ("fuzz_examples", env.examples),
            ("fuzz_steps", env.steps),
            ("fuzz_seconds", round(result.seconds)),
            ("fuzz_boots", env.boots),
            ("fuzz_tiny_caches", env.small_caches),
        ]
    )
    assert env.examples >= examples and env.steps > env.examples, "the machine ran no steps"
    assert env.precision_checks >= 1, "no change list was bounded over the whole device"
