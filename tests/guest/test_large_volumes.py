"""Large sparse volumes: a backup round costs what changed, not what the volume holds.

The seed README's round on a volume of 64 GiB (per change, default kernel) or 1 TiB (nightly), ext4
and XFS: setup-snapshot with the default COW size (10 % of the volume), transition-to-incremental,
1 MiB written and synced, transition-to-snapshot with a new default-size COW file, update-img. The
change list is checked against the writes traced below the filesystem (guestlib change-list-traced:
no snapshot is read, so the check costs the same at any size): every write is marked, at most
SPURIOUS_BOUND blocks more. The backup image is a sparse file standing for the full copy; the blocks
update-img copied must equal the snapshot's. Each round prints its ioctl times and blocks copied.
The module's vmalloc'ed memory, read in incremental mode after the change, must grow with the
volume only by its per-section arrays (VMALLOC_PER_SECTION), not by a bit per block.
"""

from __future__ import annotations

import re
import time

import pytest
from dbd import DBDCTL, install_tools

from harness.guest import Guest
from harness.oracles import Oracles
from harness.qemu import DiskSpec

pytestmark = [pytest.mark.guest]

MNT = "/mnt/vol"
# no background inode-table zeroing (ext4 lazy init sends WRITE_ZEROES into every round)
MKFS = {"ext4": "mkfs.ext4 -q -F -O ^orphan_file -E lazy_itable_init=1", "xfs": "mkfs.xfs -q -f"}
MOUNT = {"ext4": "mount -o noinit_itable", "xfs": "mount"}
SECTION_BYTES = 16 << 20  # volume covered by one index section (4096 entries of 4 KiB blocks)
# Per index section the module keeps a section pointer, a hit count, two block-map leaf pointers
# and a few bits: 28 bytes; a flat bitmap of one bit per block would be 512 per map.
VMALLOC_PER_SECTION = 32
VMALLOC_SLACK = 1 << 20  # index sections kvmalloc places in vmalloc space, and small arrays


def _module_vmalloc(g: Guest) -> dict[str, int]:
    """Bytes the module holds in vmalloc space, by allocating function (/proc/vmallocinfo)."""
    held: dict[str, int] = {}
    for line in g.check("cat /proc/vmallocinfo").stdout.splitlines():
        f = line.split()
        if "[dattobd]" in f and len(f) > 2 and "load_module" not in line:
            caller = f[2].split("+")[0]
            held[caller] = held.get(caller, 0) + int(f[1])
    return held


def _volume(gib: int, fs: str, *marks: pytest.MarkDecorator) -> object:
    disks = pytest.mark.guest_config(disks=[DiskSpec(gib * 1024), DiskSpec(512)])
    return pytest.param(gib, fs, marks=[disks, pytest.mark.deep, *marks], id=f"{gib}GiB-{fs}")


def _timed_ms(g: Guest, args: str) -> float:
    """One dbdctl call timed in the guest around the ioctl's process (Python start-up included)."""
    start = time.monotonic()
    r = g.run(f"{DBDCTL} {args}", timeout=600)
    took = (time.monotonic() - start) * 1000
    assert r.rc == 0, f"dbdctl {args}: rc {r.rc}: {r.stderr.strip()}"
    return took


@pytest.mark.parametrize(
    "gib,fs",
    [
        _volume(64, "ext4"),
        _volume(64, "xfs"),
        _volume(1024, "ext4", pytest.mark.soak),
        _volume(1024, "xfs", pytest.mark.soak),
    ],
)
def test_backup_round_on_a_large_volume(module_guest: Guest, oracles: Oracles, gib: int, fs: str) -> None:
    g, o = module_guest, oracles
    install_tools(g)
    g.check(f"{MKFS[fs]} /dev/vdb && mkdir -p {MNT} && {MOUNT[fs]} /dev/vdb {MNT}", timeout=900)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")
    o.run("trace-mark", 0, "--device", "/dev/vdb")
    setup = _timed_ms(g, f"setup-snapshot /dev/vdb {MNT}/.datto 0")
    o.run("trace-mark", 0, "--taken")
    o.record_cow_files()
    g.check(f"truncate -s {gib}G /backups/img")  # the full copy, as far as the check reads it
    to_inc = _timed_ms(g, "transition-to-incremental 0")
    g.check(f"dd if=/dev/urandom of={MNT}/round bs=1M count=1 status=none && sync")
    held = _module_vmalloc(g)
    bound = gib * (1 << 30) // SECTION_BYTES * VMALLOC_PER_SECTION + VMALLOC_SLACK
    print(f"{gib} GiB {fs}: module vmalloc {sum(held.values()) // 1024} KiB in incremental mode: {held}")
    assert sum(held.values()) <= bound, (
        f"module vmalloc {sum(held.values()) // 1024} KiB on a {gib} GiB volume in incremental mode, "
        f"over {bound // 1024} KiB ({VMALLOC_PER_SECTION} B per 16 MiB section + "
        f"{VMALLOC_SLACK >> 20} MiB): {held}"
    )
    o.run("trace-mark", 0)
    to_snap = _timed_ms(g, f"transition-to-snapshot {MNT}/.datto1 0")
    o.run("trace-mark", 0, "--taken")
    o.record_cow_files()
    details = o.change_list_traced(f"{MNT}/.datto")
    start = time.monotonic()
    r = g.run(f"update-img /dev/datto0 {MNT}/.datto /backups/img", timeout=1800)
    update = time.monotonic() - start
    assert r.rc == 0, r.stdout + r.stderr
    m = re.search(r"copying complete: (\d+) blocks changed", r.stdout)
    assert m, r.stdout
    copied = int(m.group(1))
    print(
        f"{gib} GiB {fs}: setup-snapshot {setup:.0f} ms, transition-to-incremental {to_inc:.0f} ms, "
        f"transition-to-snapshot {to_snap:.0f} ms (dbdctl, Python start-up included); update-img "
        f"{update:.1f} s, {copied} blocks copied ({details['traced']} written below the filesystem, "
        f"{details['spurious']} spurious)"
    )
    assert copied == details["marked"]
    o.require("marked-blocks-match", "/backups/img", "/dev/datto0", f"{MNT}/.datto")
    r = g.run(f"{DBDCTL} destroy 0")
    assert r.rc == 0, r.stderr
    g.assert_no_kernel_findings()
