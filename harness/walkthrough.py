"""The main job: the seed README's backup walkthrough, done for real in a throwaway guest.

The guest gets two disks: /dev/vdb plays the server's volume (ext4, mounted at /mnt/server, the COW
files live on it as the seed's `/.datto` lives on the root volume) and /dev/vdc holds the backups. Every
step prints the command and what it printed; the run ends with the proof that the image brought up to
date by update-img equals the new snapshot, block for block (sha256 of both), twice in a row so the
alternating COW file names of step 9 are exercised too.
"""

from __future__ import annotations

import time

from harness.errors import GuestError, KernelWarningError
from harness.guest import Guest
from harness.qemu import DiskSpec

SERVER_DEV = "/dev/vdb"
SERVER_MNT = "/mnt/server"
BACKUP_IMG = "/backups/vdb-bkp"


class WalkthroughFailed(Exception):
    pass


def _say(text: str) -> None:
    print(f"[walkthrough] {text}", flush=True)


def _step(g: Guest, title: str, cmd: str, timeout: float = 300) -> str:
    """Run one step, show command and output, stop the walkthrough if it fails."""
    _say(title)
    print(f"  # {cmd}", flush=True)
    t0 = time.monotonic()
    r = g.run(cmd, timeout=timeout)
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        print(f"    {line}", flush=True)
    if r.rc != 0:
        raise WalkthroughFailed(f"{title}: `{cmd}` exited {r.rc}")
    print(f"    ({time.monotonic() - t0:.1f}s)", flush=True)
    return r.stdout


def _use_the_system(g: Guest, round_no: int) -> None:
    _step(
        g,
        f"5) continue using the system (round {round_no}): new files, rewrites, a deletion",
        f"cd {SERVER_MNT} && "
        f"dd if=/dev/urandom of=data/new-{round_no} bs=1M count=8 status=none && "
        f"dd if=/dev/urandom of=data/log bs=4k count=64 seek={round_no * 100} conv=notrunc status=none && "
        f"rm -f data/old-{round_no} && sync && ls -l data",
    )


def _prove_equal(g: Guest) -> None:
    out = _step(
        g,
        "proof: the updated backup equals the snapshot, byte for byte",
        f"sha256sum /dev/datto0 {BACKUP_IMG}",
    )
    sums = {line.split()[0] for line in out.splitlines() if line.strip()}
    if len(sums) != 1:
        raise WalkthroughFailed("the backup image differs from the snapshot")
    _say("  checksums match")


def _incremental_round(g: Guest, round_no: int, old_cow: str, new_cow: str) -> None:
    _step(g, "4) put the snapshot into incremental mode", "dbdctl transition-to-incremental 0")
    _use_the_system(g, round_no)
    _step(g, "   driver status", "dbdctl status")
    _step(g, "6) move the incremental back to snapshot mode", f"dbdctl transition-to-snapshot {new_cow} 0")
    _step(g, "7) copy the changes", f"update-img /dev/datto0 {old_cow} {BACKUP_IMG}")
    _prove_equal(g)
    _step(g, "8) clean up the leftover file", f"rm {old_cow}")


def _run(g: Guest) -> None:
    _say(f"booting a throwaway guest ({g.target})")
    g.boot()
    _say(f"  ready in {g.boot_seconds:.1f}s, kernel {g.run('uname -r').stdout.strip()}")
    _say("1) install the driver and its tools")
    _say(f"  loaded {g.load_module()}")
    g.install_pydbd_tools()
    _step(
        g,
        "   prepare the server volume and the backup volume",
        f"mkfs.ext4 -q -F {SERVER_DEV} && mkdir -p {SERVER_MNT} /backups && "
        f"mount {SERVER_DEV} {SERVER_MNT} && mkfs.ext4 -q -F /dev/vdc && mount /dev/vdc /backups && "
        f"mkdir -p {SERVER_MNT}/data && for i in 1 2 3; do "
        f"dd if=/dev/urandom of={SERVER_MNT}/data/old-$i bs=1M count=4 status=none; done && "
        f"sync && df -h {SERVER_MNT} /backups",
    )
    _step(g, "2) create a snapshot", f"dbdctl setup-snapshot {SERVER_DEV} {SERVER_MNT}/.datto 0")
    _step(g, "   driver status", "cat /proc/datto-info")
    _step(
        g, "3) copy the image off the snapshot device", f"dd if=/dev/datto0 of={BACKUP_IMG} bs=1M status=none"
    )
    _prove_equal(g)
    _incremental_round(g, 1, f"{SERVER_MNT}/.datto", f"{SERVER_MNT}/.datto1")
    _say("9) go back to step 4 and repeat, alternating the COW file names")
    _incremental_round(g, 2, f"{SERVER_MNT}/.datto1", f"{SERVER_MNT}/.datto")
    _step(
        g,
        "   the backup image is a clean filesystem holding the latest files",
        f"e2fsck -fn {BACKUP_IMG} && debugfs -R 'ls -l /data' {BACKUP_IMG}",
    )
    _step(g, "   stop tracking", "dbdctl destroy 0 && cat /proc/datto-info")


def walkthrough(target: str | None = None) -> int:
    """Run the walkthrough on `target` (default target when None); returns a process exit status."""
    g = Guest(target=target, module=False, name="walkthrough", disks=[DiskSpec(256), DiskSpec(512)])
    rc = 0
    try:
        _run(g)
        _say("SUCCESS: full backup, two incremental updates, each proven equal to its snapshot")
    except WalkthroughFailed as e:
        _say(f"FAILED: {e}")
        rc = 1
    except GuestError as e:
        _say(f"FAILED: {e}")
        rc = 2
    finally:
        try:
            g.finish(test_failed=rc != 0, artifact_dir=None)
        except KernelWarningError as e:
            _say(f"FAILED: kernel findings on the console: {e}")
            rc = rc or 3
    return rc
