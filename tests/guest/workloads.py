"""Seeded write workloads for the oracle scenarios (tests/guest/test_scenarios.py), run in a guest.

Each workload is a pure function of its seed: guestlib's file churn (create, overwrite, truncate,
delete, fallocate, punch hole, rename; a manifest of what was fsynced), guestlib's signed files
(every 4 KiB block names its sequence number, offset and checksum), fio jobs (random 4 KiB O_DIRECT
from parallel jobs, mixed buffered read/write with periodic fsync, sequential 1 MiB O_DIRECT) and
fstrim (the data disks are discard-capable).
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass

from harness.guest import Guest
from harness.oracles import Oracles


@dataclass(frozen=True)
class Sizes:
    """How much one workload round writes; 'small' fits a 160 MiB volume with a 48 MiB COW file."""

    churn_ops: int = 120
    churn_bytes: int = 12 << 20
    signed_ops: int = 150
    signed_files: int = 4
    signed_blocks: int = 256
    fio_mib: int = 4


SMALL = Sizes()
# For gigabyte volumes (the long scenarios): about 40x the small round's writes.
LARGE = Sizes(
    churn_ops=600, churn_bytes=160 << 20, signed_ops=1200, signed_files=8, signed_blocks=4096, fio_mib=96
)


def fio_command(directory: str, seed: int, mib: int) -> str:
    """Four fio jobs over files in `directory` (global options first, then one --name per job)."""
    job = [
        "fio", f"--directory={directory}", f"--randseed={seed}", f"--size={mib}M",
        "--ioengine=psync", "--group_reporting", "--output=/dev/null",
        "--name=rand4k", "--rw=randwrite", "--bs=4k", "--direct=1", "--numjobs=2",
        "--name=mixed", "--rw=randrw", "--bs=16k", "--direct=0", "--fsync=16",
        "--name=seq", "--rw=write", "--bs=1M", "--direct=1",
    ]  # fmt: skip
    return shlex.join(job)


def churn(
    o: Oracles, directory: str, seed: int, manifest: str, sizes: Sizes = SMALL, unsynced: int = 0
) -> None:
    """guestlib file churn in `directory`; what it fsynced is recorded in `manifest`."""
    o.guest.check(f"mkdir -p {directory}")
    o.run(
        "churn", directory, "--seed", seed, "--ops", sizes.churn_ops, "--manifest", manifest,
        "--max-bytes", sizes.churn_bytes, "--unsynced-ops", unsynced,
    )  # fmt: skip


def mixed(o: Oracles, root: str, seed: int, sizes: Sizes = SMALL, tag: str = "") -> str:
    """Churn, signed files and fio under `root`, then fstrim and sync. Returns the signed-files state
    path (check it with Oracles.signed_check_files on `root`/signed<tag>)."""
    g: Guest = o.guest
    churn(o, f"{root}/churn{tag}", seed, f"/root/churn{tag}-{seed}.json", sizes)
    state = f"/root/signed{tag}-{seed}.json"
    g.check(f"mkdir -p {root}/signed{tag} {root}/fio{tag}")
    o.run(
        "signed-files", f"{root}/signed{tag}", "--seed", seed, "--ops", sizes.signed_ops,
        "--files", sizes.signed_files, "--max-file-blocks", sizes.signed_blocks, "--state", state,
    )  # fmt: skip
    g.check(fio_command(f"{root}/fio{tag}", seed, sizes.fio_mib), timeout=600)
    g.check(f"rm -rf {root}/fio{tag}/* && fstrim {root} && sync", timeout=300)
    return state


def background(g: Guest, root: str, seed: int, sizes: Sizes = SMALL) -> None:
    """Start an endless write load under `root` (churn rounds without syncs, fio) for a power cut."""
    loop = (
        f"mkdir -p {root}/bg; i=0; while :; do i=$((i+1)); "
        f"PYTHONPATH=/src python3 -m guestlib churn {root}/bg/c$i --seed $(({seed}+i)) "
        f"--ops {sizes.churn_ops} --manifest /tmp/bg$i.json --max-bytes {sizes.churn_bytes} "
        "--unsynced-ops 50; "
        f"{fio_command(f'{root}/bg', seed, sizes.fio_mib)}; done"
    )
    g.check(f"( {loop} ) >/dev/null 2>&1 </dev/null & echo $! >> /tmp/bg.pids")


def stop_background(g: Guest) -> None:
    """Stop every background load: the loops first (else they start the next round), then their
    current churn and fio, and wait until none is left."""
    g.check(
        "kill $(cat /tmp/bg.pids) 2>/dev/null; rm -f /tmp/bg.pids; pkill -f 'guestlib churn|fio'; "
        "while pgrep -f 'guestlib churn|fio' >/dev/null; do sleep 0.2; done",
        timeout=120,
    )


def discard_heavy(g: Guest, root: str, seed: int, rounds: int = 4, files: int = 8) -> None:
    """A workload whose frees turn into discards, for a file system mounted with `-o discard`
    (online discard: every freed extent is discarded at the next journal commit): per round, files
    of 64 KiB to 2 MiB (about 7 MiB) written and fsynced, holes punched into half of them, some
    truncated, a third deleted, then fstrim and sync. The data disks unmap on discard, so discarded
    blocks read back as zeros: a discard changes what the device holds, like a write."""
    rng = random.Random(seed)
    d = f"{root}/discard-{seed}"
    steps = [f"mkdir -p {d}"]
    for rnd in range(rounds):
        for i in range(files):
            kib = rng.choice((64, 256, 1024, 2048))
            steps.append(
                f"dd if=/dev/urandom of={d}/f{rnd}-{i} bs=64k count={kib // 64} conv=fsync status=none"
            )
        for i in rng.sample(range(files), files // 2):
            kib = rng.randrange(0, 2048, 4)
            steps.append(f"fallocate -p -o {kib}KiB -l {rng.choice((4, 64, 512))}KiB {d}/f{rnd}-{i} || true")
        for i in rng.sample(range(files), files // 4):
            steps.append(f"truncate -s {rng.randrange(0, 64) * 4}K {d}/f{rnd}-{i}")
        for i in rng.sample(range(files), files // 3):
            steps.append(f"rm -f {d}/f{rnd}-{i}")
        steps.append("sync")
    steps.append(f"fstrim {root} && sync")
    g.check(" && ".join(steps), timeout=900)


def precision_line(details: dict[str, object]) -> str:
    """One line of a change-list oracle's counts: what was marked and why."""
    return (
        f"{details['marked']} marked: {details['differing']} changed, {details['discarded']} written, "
        f"discarded or zeroed unchanged, {details['spurious']} spurious; precision {details['precision']:.3f}"
    )
