"""Host side of the backup oracles: run guestlib's checks inside a guest, fail a test with the
oracle's own explanation (first wrong block and why), and count what was verified.

The checks themselves live in guestlib (run in the guest, next to the devices); this module only
calls `python3 -m guestlib ...`, parses its one JSON line and keeps a :class:`Tally` that the pytest
plugin folds into the run's summary line (scenarios, blocks verified, crash points, failures).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from harness.guest import Guest

GUESTLIB = "PYTHONPATH=/src python3 -m guestlib"
EXIT_CHECK_FAILED = 1
# Marked blocks that did not change that one incremental round may report. What the round itself
# makes is a new COW file (its inode, extent tree and bitmaps, the header and last block, and up to
# 32 KiB that ext4 zeroes next to each while converting them) and the previous change list handed
# over to update-img (its few index sections and header): a few dozen blocks of metadata, whatever
# the volume's size. Same-content rewrites by the workload's filesystem add a few more.
SPURIOUS_BOUND = 64


class GuestlibError(RuntimeError):
    """guestlib could not run a check at all (bad input, missing file): not an oracle verdict."""


class OracleFailure(AssertionError):
    """An oracle found the backup wrong; the message names the oracle, the first bad block and why."""


@dataclass
class Tally:
    """What one test verified, reported as pytest user properties (see harness.pytest_plugin)."""

    blocks_verified: int = 0
    crash_points: int = 0
    checks_passed: int = 0

    def properties(self) -> list[tuple[str, int]]:
        return [
            ("oracle_blocks_verified", self.blocks_verified),
            ("oracle_crash_points", self.crash_points),
            ("oracle_checks_passed", self.checks_passed),
        ]


def _verified_blocks(data: dict[str, Any]) -> int:
    """Blocks an oracle compared, from whichever count its result carries."""
    details = data.get("details") or {}
    for key in ("blocks", "compared"):
        if isinstance(details.get(key), int):
            return int(details[key])
    counts = data.get("counts")
    if isinstance(counts, dict):  # signed-check: every classified location
        return sum(int(v) for v in counts.values())
    return 0


class Oracles:
    """guestlib commands in one guest. `context` (e.g. the seed and how to rerun) ends every failure."""

    def __init__(self, guest: Guest, tally: Tally | None = None, context: str = "") -> None:
        self.guest = guest
        self.tally = tally if tally is not None else Tally()
        self.context = context

    def run(self, *args: object, timeout: float = 900) -> dict[str, Any]:
        """Run one guestlib command; its JSON result whatever the verdict (GuestlibError if none)."""
        cmd = f"{GUESTLIB} {shlex.join(str(a) for a in args)}"
        r = self.guest.run(cmd, timeout=timeout)
        lines = r.stdout.strip().splitlines()
        try:
            data = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or r.rc not in (0, EXIT_CHECK_FAILED):
            said = r.stderr.strip()[-1500:] or r.stdout[-1500:]
            raise GuestlibError(f"guestlib {args[0]} failed to run (exit {r.rc}): {said}\ncommand: {cmd}")
        return data

    def require(self, *args: object, timeout: float = 900) -> dict[str, Any]:
        """Run a check; raise OracleFailure unless it passed. Returns the result (details, counts)."""
        data = self.run(*args, timeout=timeout)
        if not data.get("ok", False):
            name = data.get("oracle", args[0])
            first = data.get("first_block")
            where = f" (first wrong block {first})" if first is not None else ""
            extra = f"\n{self.context}" if self.context else ""
            raise OracleFailure(f"oracle {name} failed{where}: {data.get('message')}{extra}")
        self.tally.checks_passed += 1
        self.tally.blocks_verified += _verified_blocks(data)
        return data

    # -- the oracles by name (see guestlib/__main__.py for the commands) ------------------------------

    def hash(self, device: str, out: str) -> int:
        """Per-block digests of `device` into the guest file `out`; returns the block count. Hashing
        a snapshot also records the COW files in use (guestlib.cowchain), whose extents the later
        change-list and update-img checks leave out, and traces discards from then on."""
        if device.startswith("/dev/datto"):
            self.record_cow_files()
        return int(self.run("hash", device, out)["blocks"])

    def start_write_trace(self) -> None:
        """Trace writes, discards and write-zeroes below the filesystems from now on: change-list
        takes what the workload did there as changed (guestlib.discards)."""
        self.run("trace-start")

    def record_cow_files(self) -> None:
        """Record the extents of the COW files in use now (after a setup, transition or expansion)."""
        self.run("chain-record")

    def stability(self, earlier: str, later: str) -> dict[str, Any]:
        return self.require("stability", earlier, later)

    def point_in_time(self, root: str, manifest: str, fsck: str | None = None, fstype: str = "ext4") -> str:
        args: list[object] = ["point-in-time", root, manifest]
        if fsck:
            args += ["--fsck", fsck, "--fstype", fstype]
        return str(self.require(*args)["message"])

    def nothing_lost(self, root: str, manifest: str, fsck: str | None = None, fstype: str = "ext4") -> str:
        args: list[object] = ["check-manifest", root, manifest]
        if fsck:
            args += ["--fsck", fsck, "--fstype", fstype]
        return str(self.require(*args)["message"])

    def fsck(self, device: str, fstype: str) -> str:
        return str(self.require("fsck", device, "--fstype", fstype)["message"])

    def change_list(
        self,
        hash_n: str,
        hash_n1: str,
        cow: str,
        max_spurious: int | None = SPURIOUS_BOUND,
    ) -> dict[str, Any]:
        """Oracle 3a; the details carry differing/marked/spurious/discarded/precision. More than
        `max_spurious` marked blocks that neither changed nor were discarded (traced since the
        first snapshot was hashed) fail (None: only measured)."""
        bound = [] if max_spurious is None else ["--max-spurious", max_spurious]
        args = ("change-list", hash_n, hash_n1, cow, "--discards", *bound)
        return dict(self.require(*args)["details"])

    def change_list_traced(self, cow: str, max_spurious: int | None = SPURIOUS_BOUND) -> dict[str, Any]:
        """Oracle 3a from the block trace (no snapshot read): details carry marked/traced/spurious."""
        bound = [] if max_spurious is None else ["--max-spurious", max_spurious]
        return dict(self.require("change-list-traced", cow, *bound)["details"])

    def update_img(self, snapshot: str, cow: str, image: str) -> str:
        return str(self.require("update-img", snapshot, cow, image)["message"])

    def update_img_copied(self, snapshot: str, cow: str, image: str) -> int:
        """update-img and its check, as update_img(); returns the blocks it copied."""
        stdout = str(self.require("update-img", snapshot, cow, image)["details"]["stdout"])
        m = re.search(r"copying complete: (\d+) blocks changed", stdout)
        if not m:
            raise GuestlibError(f"update-img printed no block count: {stdout[-500:]}")
        return int(m.group(1))

    def cow_structure(self, cow: str, snapshot: str, *options: object) -> str:
        return str(self.require("cow-structure", cow, snapshot, *options)["message"])

    def signed_check(self, path: str, state: str) -> str:
        return str(self.require("signed-check", path, "--state", state)["message"])

    def signed_check_files(self, directory: str, state: str) -> str:
        return str(self.require("signed-check-files", directory, "--state", state)["message"])

    def crash_point(self, count: int = 1) -> None:
        """Count crash points whose aftermath the caller has checked."""
        self.tally.crash_points += count

    def replay_check(self, log: str, target: str, *options: object, timeout: float = 1800) -> dict[str, Any]:
        """Write-point replay (guestlib.logwrites); the crash points it checked are counted."""
        data = self.require("replay-check", log, target, *options, timeout=timeout)
        self.crash_point(int(data["crash_points"]))
        return data
