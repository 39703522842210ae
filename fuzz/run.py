"""A time-budgeted fuzz campaign that resumes where the last one stopped.

    fuzz/run [--kernel debian-6.1] [--minutes 10] [--host-share 0.3] [--host-only]

1. Host (a `--host-share` of the budget): pytest on fuzz/ (Hypothesis state machine of the driver
   model, every parser of untrusted input) with the `dev` profile, over and over. Its example
   database lives in the harness cache, so failing examples replay first in the next campaign.
2. Guest consistency (a `--consistency-share` of the rest): the Hypothesis state machine of
   fuzz/guest_machine.py in one long-lived guest, fresh examples for the whole budget, its example
   database in the cache (`hypothesis-guest/<kernel>`), each shrunk failure exported to
   tests/regressions/ as a standalone pytest file. About one example in 6 may reboot the guest
   or cut its power (DBD_FUZZ_BOOT_ONE_IN; 30-60 s each under TCG).
3. Guest bad input (the rest): tests/guest/test_ioctl_fuzz.py (bad ioctl arguments in every tracer
   state, corrupt COW files handed to reload) on `--kernel`, one fresh seed per round. The next seed
   is kept in the cache (`fuzz-campaign/<kernel>.json`), so a campaign continues with seeds never tried.

Prints rounds, seeds and, for every failure, the one command that reproduces it. Exits 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmimages.cache import cache_dir  # noqa: E402

PYTEST = str(Path(sys.executable).with_name("pytest"))
GUEST_FILE = "tests/guest/test_ioctl_fuzz.py"
CONSISTENCY_FILE = "tests/guest/test_consistency_fuzz.py"
BOOT_ALLOWANCE_S = 60.0  # guest boot, module load, mkfs and agent start before the machine runs


@dataclass
class Campaign:
    kernel: str
    next_seed: int = 1
    rounds: list[dict[str, object]] = field(default_factory=list)

    @staticmethod
    def path(kernel: str) -> Path:
        return cache_dir() / "fuzz-campaign" / f"{kernel}.json"

    @classmethod
    def load(cls, kernel: str) -> Campaign:
        try:
            data = json.loads(cls.path(kernel).read_text())
            return cls(kernel, int(data["next_seed"]), list(data.get("rounds", [])))
        except (OSError, ValueError, KeyError):
            return cls(kernel)

    def save(self) -> None:
        p = self.path(self.kernel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next_seed": self.next_seed, "rounds": self.rounds[-500:]}, indent=1))
        tmp.replace(p)


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    start = time.monotonic()
    rc = subprocess.call(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - start


def host_phase(deadline: float) -> list[str]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "dev"}
    failures, rounds = [], 0
    while time.monotonic() < deadline:
        rc, took = _run([PYTEST, "-q", "-x", "fuzz", "-p", "no:cacheprovider"], env)
        rounds += 1
        print(
            f"  host round {rounds}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f}s", flush=True
        )
        if rc != 0:
            failures.append(
                "host: HYPOTHESIS_PROFILE=dev .venv/bin/pytest fuzz  (the failing example replays first)"
            )
            break
    return failures


def consistency_phase(kernel: str, deadline: float) -> list[str]:
    minutes = max(0.5, (deadline - time.monotonic() - BOOT_ALLOWANCE_S) / 60)
    env = {
        **os.environ,
        "DBD_FUZZ_RANDOM": "1",
        "DBD_FUZZ_MINUTES": f"{minutes:.2f}",
        "DBD_REGRESSIONS_DIR": str(REPO / "tests" / "regressions"),
    }
    argv = [PYTEST, "-q", "-s", CONSISTENCY_FILE, f"--kernel={kernel}", "-p", "no:cacheprovider"]
    start = time.monotonic()
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, errors="replace")
    took = time.monotonic() - start
    lines = [ln for ln in p.stdout.splitlines() if "consistency fuzzing:" in ln or "exported as" in ln]
    for ln in lines:
        print(f"  {ln.strip()}", flush=True)
    print(f"  consistency machine: {'ok' if p.returncode == 0 else f'FAILED (exit {p.returncode})'} "
          f"in {took:.0f}s", flush=True)  # fmt: skip
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-30:])
        print(tail, flush=True)
        return [
            f"consistency: see the exported file under tests/regressions/ (pytest it with --kernel {kernel})"
        ]
    return []


def guest_phase(kernel: str, deadline: float) -> list[str]:
    campaign = Campaign.load(kernel)
    failures = []
    while time.monotonic() < deadline:
        seed = campaign.next_seed
        campaign.next_seed += 1
        argv = [PYTEST, "-q", GUEST_FILE, f"--kernel={kernel}", f"--seed={seed}", "-p", "no:cacheprovider"]
        rc, took = _run(argv)
        campaign.rounds.append({"seed": seed, "rc": rc, "seconds": round(took, 1)})
        campaign.save()
        print(f"  guest seed {seed}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f}s", flush=True)
        if rc != 0:
            failures.append(f"guest: .venv/bin/pytest {GUEST_FILE} --kernel {kernel} --seed {seed}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuzz/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="debian-6.1")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--host-share", type=float, default=0.3)
    p.add_argument("--consistency-share", type=float, default=0.7, help="of the guest part")
    p.add_argument("--host-only", action="store_true")
    a = p.parse_args(argv)
    start = time.monotonic()
    end = start + a.minutes * 60
    host_end = end if a.host_only else start + a.minutes * 60 * a.host_share
    print(f"fuzz campaign: {a.minutes:g} minutes on {a.kernel} (cache {cache_dir()})", flush=True)
    failures = host_phase(host_end)
    if not a.host_only and not failures:
        consistency_end = time.monotonic() + (end - time.monotonic()) * a.consistency_share
        failures += consistency_phase(a.kernel, consistency_end)
        failures += guest_phase(a.kernel, end)
    campaign = Campaign.load(a.kernel)
    took = (time.monotonic() - start) / 60
    print(f"\nfuzz campaign done in {took:.1f} min; next guest seed {campaign.next_seed}")
    for f in failures:
        print(f"FAILED, reproduce with: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
