"""Oracle scenarios: backups taken under real workloads are exactly right.

Every scenario runs seeded workloads (tests/guest/workloads.py) against a tracked volume and checks
guestlib's oracles through harness.oracles:
  1 snapshot stability (per-block hashes of /dev/datto0 before and after the origin is rewritten),
  2 point-in-time truth (files fsynced before setup read back from the mounted snapshot; fsck clean),
  3 change-list completeness and precision (every block that differs between snapshots N and N+1
    is marked in COW N; at most SPURIOUS_BOUND marked blocks neither changed nor were written,
    discarded or zeroed by the workload below the filesystem; update-img turns image N into N+1
    byte for byte outside the chain's COW file extents, doc/compat.md),
  4 COW structure (the clean file after dormancy: header, index, every data block = snapshot block),
  5 nothing lost (after a power cut the origin is consistent and holds every fsynced file).
A failure names the oracle, the first wrong block and the seed (`--seed N` reruns the same workload).
Tests marked `deep` run on the default kernel only in CI (see harness.pytest_plugin).
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
from collections.abc import Iterator

import pytest
import workloads
from dbd import dbdctl, device_sectors, drop_caches, fiemap, info, install_tools

from harness.guest import Guest
from harness.oracles import Oracles
from harness.qemu import DiskSpec

pytestmark = [pytest.mark.guest]

MNT = "/mnt/vol"
SNAP = "/mnt/snap"
COW = f"{MNT}/.datto"
# Volumes are small (TCG reads about 30 MiB/s and every oracle reads whole devices); XFS needs 300 MiB.
EXT4_DISK, XFS_DISK, BACKUP_DISK = DiskSpec(192), DiskSpec(320), DiskSpec(512)
# Per parameter, never also on the function: the function's guest_config marker would win.
EXT4_GUEST = pytest.mark.guest_config(disks=[EXT4_DISK, BACKUP_DISK])
XFS_GUEST = pytest.mark.guest_config(disks=[XFS_DISK, BACKUP_DISK])
FSTYPES = [
    pytest.param("ext4", marks=EXT4_GUEST),
    pytest.param("xfs", marks=[pytest.mark.deep, XFS_GUEST]),
]
MKFS = {
    "ext4": "mkfs.ext4 -q -F -O ^orphan_file -E lazy_itable_init=0,lazy_journal_init=0",
    "xfs": "mkfs.xfs -q -f",
}
# read-only mounts of a snapshot: never replay a journal/log onto the read-only device
SNAP_MOUNT = {"ext4": "ro,noload", "xfs": "ro,norecovery,nouuid"}


# -- helpers ---------------------------------------------------------------------------------------


def _prepare(g: Guest, device: str, fstype: str) -> None:
    install_tools(g)
    g.check(f"{MKFS[fstype]} {device} && mkdir -p {MNT} {SNAP} && mount {device} {MNT}")


def _ok(g: Guest, args: str) -> None:
    r = dbdctl(g, args)
    assert r.rc == 0, f"dbdctl {args}: rc {r.rc}: {r.stderr.strip()}"


def _fsck_snapshot(g: Guest, o: Oracles, fstype: str, scratch: str = "/root") -> None:
    """Oracle 2's consistency half. An XFS freeze leaves its log uncovered, so an XFS snapshot is
    checked on a copy (in `scratch`) whose log was replayed (the snapshot itself is read-only)."""
    if fstype == "ext4":
        o.fsck("/dev/datto0", "ext4")
        return
    g.check(
        f"modprobe loop && dd if=/dev/datto0 of={scratch}/snap.img bs=1M status=none && "
        f"dev=$(losetup -f --show {scratch}/snap.img) && mount -o nouuid $dev {SNAP} && umount {SNAP} && "
        "echo $dev > /root/snap.loop",
        timeout=600,
    )
    loop = g.check("cat /root/snap.loop").stdout.strip()
    try:
        o.fsck(loop, "xfs")
    finally:
        g.check(f"losetup -d {loop} && rm -f {scratch}/snap.img")


def _cow_after_dormancy(g: Guest, o: Oracles, device: str, fstype: str, uuid: str, seqid: int) -> str:
    """Oracle 4: unmount (the tracer goes dormant and writes a clean header), read the COW file
    through a read-only mount (ignored by the module), compare it with /dev/datto0."""
    g.check(f"umount {MNT}")
    assert info(g, 0).state in (0, 1), "unmount did not make the tracer dormant"
    opts = "ro,nouuid,norecovery" if fstype == "xfs" else "ro"
    g.check(f"mkdir -p /mnt/ro && mount -o {opts} {device} /mnt/ro")
    try:
        return o.cow_structure(
            "/mnt/ro/.datto",
            "/dev/datto0",
            "--sectors",
            device_sectors(g, device),
            "--uuid",
            uuid,
            "--seqid",
            seqid,
        )
    finally:
        g.check("umount /mnt/ro")


# -- scenario 1: one snapshot under a mixed workload --------------------------------------------------


# FSTYPES, and the ext4 run also on the debug kernel: snapshot reads racing writes under KASAN
# (nightly there: five minutes and more of fio under KASAN on a slow machine)
# XFS: nightly (soak); XFS snapshots, flush points and incremental chains run per change.
SNAPSHOT_FSTYPES = [
    pytest.param("ext4", marks=[EXT4_GUEST, pytest.mark.debugkernel(soak=True)]),
    pytest.param("xfs", marks=[pytest.mark.deep, pytest.mark.soak, XFS_GUEST]),
]


@pytest.mark.parametrize("fstype", SNAPSHOT_FSTYPES)
def test_snapshot_is_stable_point_in_time_and_stored_exactly(
    module_guest: Guest, oracles: Oracles, seed: int, fstype: str
) -> None:
    """Oracles 1, 2, 4 (and the origin's own data) around one snapshot of a volume under churn,
    signed files, fio and fstrim."""
    _one_snapshot_under_churn(module_guest, oracles, seed, fstype, cache=0)


# Nightly (soak): per change, the 1-byte cache runs in the incremental chain, both reloads and the
# consistency machine (which also runs on the debug kernel; this one takes 700 s there).
@pytest.mark.deep
@pytest.mark.soak
@EXT4_GUEST
def test_snapshot_with_a_one_byte_index_cache(module_guest: Guest, oracles: Oracles, seed: int) -> None:
    """Scenario 1 with cache size 1: the cache may hold no index section (spec 4.6), so the worker
    writes every section back after each batch and reads it again for the next write or snapshot
    read. The oracles must not see a difference, and the module must report that it did evict."""
    _one_snapshot_under_churn(module_guest, oracles, seed, "ext4", cache=1)


def _one_snapshot_under_churn(g: Guest, o: Oracles, seed: int, fstype: str, cache: int) -> None:
    dev = "/dev/vdb"
    _prepare(g, dev, fstype)
    workloads.churn(o, f"{MNT}/pre", seed, "/root/pre.json")
    if cache:
        _debug_log(g, True)
    _ok(g, f"setup-snapshot -c {cache} -f 80 {dev} {COW} 0")
    before = info(g, 0)
    assert before.cache_size == (cache or 314572800), before
    o.hash("/dev/datto0", "/root/h0")

    workloads.churn(o, f"{MNT}/pre", seed + 1, "/root/pre-after.json")  # rewrites the pre files
    signed = workloads.mixed(o, MNT, seed + 2)
    drop_caches(g)
    o.hash("/dev/datto0", "/root/h1")
    o.stability("/root/h0", "/root/h1")
    assert info(g, 0).error == 0, f"tracer failed under the workload: {info(g, 0)}"

    _fsck_snapshot(g, o, fstype)
    g.check(f"mount -o {SNAP_MOUNT[fstype]} /dev/datto0 {SNAP}")
    try:
        o.point_in_time(f"{SNAP}/pre", "/root/pre.json")
    finally:
        g.check(f"umount {SNAP}")
    # the origin holds what was written after setup
    o.nothing_lost(f"{MNT}/pre", "/root/pre-after.json")
    o.signed_check_files(f"{MNT}/signed", signed)

    _cow_after_dormancy(g, o, dev, fstype, before.uuid, before.seqid)
    o.hash("/dev/datto0", "/root/h2")
    o.stability("/root/h0", "/root/h2")  # also while dormant
    _destroy_and_check_eviction(g, cache)
    g.assert_no_kernel_findings()


def _debug_log(g: Guest, on: bool) -> None:
    """The module's debug lines (ioctls, transitions, index-cache counts; none per write)."""
    g.check(f"echo {int(on)} > /sys/module/dattobd/parameters/debug")


def _destroy_and_check_eviction(g: Guest, cache: int) -> None:
    """Destroy minor 0; with a tiny cache, the debug lines of each COW file's end (transition or
    destroy) must add up to sections dropped and read back, else the test passed without ever
    exercising the cache."""
    _ok(g, "destroy 0")
    if not cache:
        return
    _debug_log(g, False)
    counts = [
        (int(m[0]), int(m[1]))
        for m in re.findall(r"index cache dropped (\d+) sections and read back (\d+)", g.dmesg())
    ]
    print(f"index cache (dropped, read back) per COW file: {counts}")
    assert counts and sum(d for d, _ in counts) > 0, f"no section was dropped: {counts}"
    assert sum(r for _, r in counts) > 0, f"no section was read back: {counts}"


# -- scenario 2: an incremental chain, update-img exact each round -------------------------------------


def _partition(g: Guest) -> str:
    """One partition of /dev/vdb from 1 MiB to 1 MiB before its end (devtmpfs makes /dev/vdb1)."""
    size = device_sectors(g, "/dev/vdb") - 4096
    g.check(f"echo 'start=2048, size={size}' | sfdisk -q /dev/vdb")
    g.check("for i in $(seq 50); do test -b /dev/vdb1 && break; sleep 0.1; done; test -b /dev/vdb1")
    return "/dev/vdb1"


@pytest.mark.parametrize(
    "layout,fs",
    [
        pytest.param("disk", "ext4", marks=EXT4_GUEST),
        pytest.param("partition", "ext4", marks=[pytest.mark.deep, EXT4_GUEST]),
        # XFS: one incremental round per run in test_two_tracked_volumes_keep_separate_change_lists;
        # the two-round chain is in the nightly set
        pytest.param("disk", "xfs", marks=[pytest.mark.deep, pytest.mark.long, XFS_GUEST]),
        # every index section written back after each batch and read back when needed (spec 4.6)
        pytest.param("disk-1-byte-cache", "ext4", marks=[pytest.mark.deep, EXT4_GUEST]),
    ],
)
def test_incremental_chain_marks_every_changed_block(
    request: pytest.FixtureRequest, module_guest: Guest, oracles: Oracles, seed: int, layout: str, fs: str
) -> None:
    """Oracle 3 over two incremental rounds: image N + update-img(COW N) == snapshot N+1, and every
    block differing between the snapshots is marked (precision reported in the test's properties)."""
    g, o = module_guest, oracles
    dev = _partition(g) if layout == "partition" else "/dev/vdb"
    cache = 1 if layout.endswith("1-byte-cache") else 0
    _prepare(g, dev, fs)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")
    workloads.churn(o, f"{MNT}/base", seed, "/root/base.json")
    if cache:
        _debug_log(g, True)
    _ok(g, f"setup-snapshot -c {cache} -f 48 {dev} {COW} 0")
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none", timeout=600)
    o.hash("/dev/datto0", "/root/h0")
    _ok(g, "transition-to-incremental 0")
    cow = COW
    for rnd in (1, 2):
        workloads.mixed(o, MNT, seed + 10 * rnd, tag=str(rnd))
        workloads.churn(o, f"{MNT}/base", seed + 10 * rnd + 1, f"/root/base{rnd}.json")
        new_cow = f"{MNT}/.datto{rnd}"
        _ok(g, f"transition-to-snapshot -f 48 {new_cow} 0")
        o.hash("/dev/datto0", f"/root/h{rnd}")
        details = o.change_list(f"/root/h{rnd - 1}", f"/root/h{rnd}", cow)
        request.node.user_properties.append((f"round{rnd}_precision", round(details["precision"], 3)))
        print(f"round {rnd}: {workloads.precision_line(details)}")
        o.update_img("/dev/datto0", cow, "/backups/img")
        _ok(g, "transition-to-incremental 0")
        g.check(f"rm -f {cow}")
        cow = new_cow
    _destroy_and_check_eviction(g, cache)
    g.assert_no_kernel_findings()


# -- scenario 2a: what a backup round costs ----------------------------------------------------------


@pytest.mark.parametrize("fs", FSTYPES)
def test_backup_round_reports_only_what_changed(module_guest: Guest, oracles: Oracles, fs: str) -> None:
    """The seed README's round, twice: 1 MiB written and synced, transition-to-snapshot with a new
    COW file of the default size, update-img. The change list must report what the workload changed
    and no more than SPURIOUS_BOUND other blocks (the new COW file's preallocation is not a change),
    update-img copies only what it reports, and the image equals the snapshot."""
    g, o = module_guest, oracles
    _prepare(g, "/dev/vdb", fs)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")
    _ok(g, f"setup-snapshot /dev/vdb {COW} 0")
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none", timeout=600)
    o.hash("/dev/datto0", "/root/h0")
    _ok(g, "transition-to-incremental 0")
    cow = COW
    for rnd in (1, 2):
        g.check(f"dd if=/dev/urandom of={MNT}/round{rnd} bs=1M count=1 status=none && sync")
        new_cow = f"{MNT}/.datto{rnd}"
        _ok(g, f"transition-to-snapshot {new_cow} 0")
        o.hash("/dev/datto0", f"/root/h{rnd}")
        details = o.change_list(f"/root/h{rnd - 1}", f"/root/h{rnd}", cow)
        print(f"round {rnd}: {workloads.precision_line(details)}")
        copied = o.update_img_copied("/dev/datto0", cow, "/backups/img")
        marked = details["marked"]
        assert copied == marked, f"update-img copied {copied} blocks, the change list has {marked}"
        assert copied >= 256, f"round {rnd}: {copied} blocks copied for a 1 MiB change"
        _ok(g, "transition-to-incremental 0")
        g.check(f"rm -f {cow}")
        cow = new_cow
    _ok(g, "destroy 0")
    g.assert_no_kernel_findings()


# -- scenario 2c: discard-heavy ---------------------------------------------------------------------


@pytest.mark.deep
@pytest.mark.parametrize(
    "fs", [pytest.param("ext4", marks=EXT4_GUEST), pytest.param("xfs", marks=[pytest.mark.soak, XFS_GUEST])]
)
def test_discard_heavy_workload_keeps_snapshot_and_change_list_exact(
    request: pytest.FixtureRequest, module_guest: Guest, oracles: Oracles, seed: int, fs: str
) -> None:
    """Oracles 1 and 3 under online discard (`-o discard`, hole punching, truncation, deletion,
    fstrim) on a disk that unmaps, so a discarded block reads back as zeros. In snapshot mode the
    snapshot must not change (discards are completed without effect while it exists); in
    incremental mode every discarded block that changed must be marked, so update-img stays exact."""
    g, o, dev = module_guest, oracles, "/dev/vdb"
    install_tools(g)
    g.check(f"{MKFS[fs]} {dev} && mkdir -p {MNT} && mount -o discard {dev} {MNT}")
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")
    workloads.churn(o, f"{MNT}/base", seed, "/root/base.json")
    _ok(g, f"setup-snapshot -f 64 {dev} {COW} 0")  # the first round's ~28 MiB, with room
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none", timeout=600)
    o.hash("/dev/datto0", "/root/h0")
    workloads.discard_heavy(g, MNT, seed + 1)
    drop_caches(g)
    o.hash("/dev/datto0", "/root/h0b")
    o.stability("/root/h0", "/root/h0b")
    assert info(g, 0).error == 0, info(g, 0)

    _ok(g, "transition-to-incremental 0")
    workloads.churn(o, f"{MNT}/base", seed + 2, "/root/base1.json")  # rewrites, then frees
    workloads.discard_heavy(g, MNT, seed + 3)
    new_cow = f"{MNT}/.datto1"
    _ok(g, f"transition-to-snapshot -f 48 {new_cow} 0")
    o.hash("/dev/datto0", "/root/h1")
    details = o.change_list("/root/h0", "/root/h1", COW)
    request.node.user_properties.append(("precision", round(details["precision"], 3)))
    o.update_img("/dev/datto0", COW, "/backups/img")
    _ok(g, "destroy 0")
    g.assert_no_kernel_findings()


# -- scenario 2b: two tracked volumes at once ---------------------------------------------------------


@pytest.mark.deep  # one incremental round on each of two minors; the chain above runs everywhere
@pytest.mark.guest_config(disks=[EXT4_DISK, XFS_DISK, DiskSpec(768)])
def test_two_tracked_volumes_keep_separate_change_lists(
    request: pytest.FixtureRequest, module_guest: Guest, oracles: Oracles, seed: int
) -> None:
    """An ext4 volume on minor 0 and an XFS volume on minor 1, written at the same time: each
    snapshot stays stable, each COW file marks every block changed on its own volume (oracle 3),
    update-img brings each backup image to its next snapshot, and the two seqids and COW files
    never mix."""
    g, o = module_guest, oracles
    vols = [("/dev/vdb", "ext4", "/mnt/a", 0), ("/dev/vdc", "xfs", "/mnt/b", 1)]
    install_tools(g)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdd && mkdir -p /backups && mount /dev/vdd /backups")
    for dev, fs, mnt, minor in vols:
        g.check(f"{MKFS[fs]} {dev} && mkdir -p {mnt} && mount {dev} {mnt}")
        workloads.churn(o, f"{mnt}/base", seed + minor, f"/root/base{minor}.json")
        _ok(g, f"setup-snapshot -f 64 {dev} {mnt}/.datto {minor}")
    for _dev, _fs, _mnt, minor in vols:
        g.check(f"dd if=/dev/datto{minor} of=/backups/img{minor} bs=1M status=none", timeout=600)
        o.hash(f"/dev/datto{minor}", f"/root/h{minor}-0")
        _ok(g, f"transition-to-incremental {minor}")

    # the XFS volume is written in the background while the ext4 one churns in the foreground
    workloads.background(g, "/mnt/b", seed + 50)
    workloads.churn(o, "/mnt/a/base", seed + 60, "/root/base0-after.json")
    workloads.stop_background(g)
    g.check("sync")

    for dev, _fs, mnt, minor in vols:
        _ok(g, f"transition-to-snapshot -f 64 {mnt}/.datto.next {minor}")
        state = info(g, minor)
        assert (state.bdev, state.seqid, state.error) == (dev, 2, 0), f"minor {minor}: {state}"
        assert state.cow == "/.datto.next", f"minor {minor} tracks another COW file: {state}"
        o.hash(f"/dev/datto{minor}", f"/root/h{minor}-1")
        details = o.change_list(f"/root/h{minor}-0", f"/root/h{minor}-1", f"{mnt}/.datto")
        assert details["differing"] > 0, f"minor {minor}: no block changed, the workload missed it"
        request.node.user_properties.append((f"minor{minor}_precision", round(details["precision"], 3)))
        o.update_img(f"/dev/datto{minor}", f"{mnt}/.datto", f"/backups/img{minor}")
    for _dev, _fs, mnt, minor in vols:
        o.nothing_lost(f"{mnt}/base", f"/root/base{minor}{'-after' if minor == 0 else ''}.json")
    for _dev, _fs, _mnt, minor in vols:
        _ok(g, f"destroy {minor}")
    g.assert_no_kernel_findings()


# -- scenario 2c: gigabyte volumes (long) ---------------------------------------------------------------


# Nightly (soak): nine minutes and more of worker time under TCG; per change, the same code paths
# run on 96 to 512 MiB volumes (the index sections of a 2 GiB volume differ only in number).
@pytest.mark.long
@pytest.mark.deep
@pytest.mark.soak
@pytest.mark.guest_config(disks=[DiskSpec(2048), DiskSpec(4608)], memory_mib=1536)
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_two_gib_volume_snapshot_and_incremental_round(
    request: pytest.FixtureRequest, module_guest: Guest, oracles: Oracles, seed: int, fs: str
) -> None:
    """Oracles 1-4 on a 2 GiB volume with a workload forty times the small one: the snapshot is
    stable and point-in-time under the workload, the COW file matches it byte for byte after
    dormancy, and one incremental round marks every changed block and updates a full image."""
    g, o, dev = module_guest, oracles, "/dev/vdb"
    big = workloads.LARGE
    _prepare(g, dev, fs)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")
    workloads.churn(o, f"{MNT}/pre", seed, "/root/pre.json", big)
    _ok(g, f"setup-snapshot -f 600 {dev} {COW} 0")
    first = info(g, 0)
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none", timeout=1800)
    o.hash("/dev/datto0", "/root/h0")
    workloads.mixed(o, MNT, seed + 1, big, tag="a")
    drop_caches(g)
    o.hash("/dev/datto0", "/root/h0b")
    o.stability("/root/h0", "/root/h0b")
    _fsck_snapshot(g, o, fs, scratch="/backups")  # the root overlay cannot hold 2 GiB
    g.check(f"mount -o {SNAP_MOUNT[fs]} /dev/datto0 {SNAP}")
    try:
        o.point_in_time(f"{SNAP}/pre", "/root/pre.json")
    finally:
        g.check(f"umount {SNAP}")

    _ok(g, "transition-to-incremental 0")
    workloads.mixed(o, MNT, seed + 2, big, tag="b")
    workloads.churn(o, f"{MNT}/pre", seed + 3, "/root/pre-after.json", big)
    _ok(g, f"transition-to-snapshot -f 600 {MNT}/.datto1 0")
    o.hash("/dev/datto0", "/root/h1")
    details = o.change_list("/root/h0", "/root/h1", COW)
    request.node.user_properties.append(("precision", round(details["precision"], 3)))
    o.update_img("/dev/datto0", COW, "/backups/img")
    g.check(f"rm -f {COW}")
    second = info(g, 0)
    assert (second.seqid, second.uuid) == (first.seqid + 1, first.uuid), f"{first} -> {second}"
    g.check(f"umount {MNT}")
    opts = "ro,nouuid,norecovery" if fs == "xfs" else "ro"
    g.check(f"mkdir -p /mnt/ro && mount -o {opts} {dev} /mnt/ro")
    try:
        o.cow_structure(
            "/mnt/ro/.datto1", "/dev/datto0", "--sectors", device_sectors(g, dev),
            "--uuid", second.uuid, "--seqid", second.seqid,
        )  # fmt: skip
    finally:
        g.check("umount /mnt/ro")
    _ok(g, "destroy 0")
    g.assert_no_kernel_findings()


# -- scenario 3: power cuts in the middle of a workload ------------------------------------------------


def _replay_and_fsck(g: Guest, o: Oracles, dev: str, fs: str) -> None:
    """After a power cut: replay the journal (e2fsck -fy; exit 1 means it fixed something, fine) or
    the XFS log (a mount), then the read-only check must find the filesystem clean."""
    if fs == "xfs":
        g.check(f"mkdir -p /mnt/replay && mount {dev} /mnt/replay && umount /mnt/replay", timeout=300)
    else:
        r = g.run(f"e2fsck -fy {dev}", timeout=300)
        assert r.rc in (0, 1), f"e2fsck -fy {dev} after the power cut: rc {r.rc}: {r.stdout[-2000:]}"
    o.fsck(dev, fs)


@pytest.mark.parametrize(
    "mode,fs",
    [
        # deep: what a power cut leaves (a dirty COW file that reload refuses) is not kernel-specific;
        # reloads after a clean reboot and the harness's power-cut self-test run everywhere
        pytest.param("snapshot", "ext4", marks=pytest.mark.deep),
        pytest.param("incremental", "ext4", marks=pytest.mark.deep),
        pytest.param("snapshot", "xfs", marks=[pytest.mark.deep, pytest.mark.long]),
    ],
)
@pytest.mark.guest_config(disks=[DiskSpec(320)])
def test_power_cut_mid_workload_loses_nothing_fsynced(
    module_guest: Guest, oracles: Oracles, seed: int, mode: str, fs: str
) -> None:
    """Oracle 5 at two crash points per run: cut the power at a seeded moment while a tracked volume is
    being written; after the reboot the origin checks clean, every fsynced file is intact, and the
    (dirty) COW file is an ordinary deletable file."""
    g, o, dev = module_guest, oracles, "/dev/vdb"
    rng = random.Random(seed)
    _prepare(g, dev, fs)
    for cut in range(2):
        workloads.churn(o, f"{MNT}/keep{cut}", seed + cut, f"/root/keep{cut}.json")
        g.check("sync")  # the manifest on the root disk must survive the cut too
        _ok(g, f"setup-snapshot -f 96 {dev} {COW} 0")
        if mode == "incremental":
            _ok(g, "transition-to-incremental 0")
        workloads.background(g, MNT, seed + 100 * cut)
        g.run(f"sleep {rng.uniform(1.0, 6.0):.2f}", timeout=60)
        state = info(g, 0)
        assert state.error == 0, f"tracer failed before the power cut: {state}"
        g.power_cut()
        _after_cut(g, o, dev, [f"/root/keep{k}.json" for k in range(cut + 1)], fs)
    g.assert_no_kernel_findings()


# -- scenario 3b: power cuts during a transition and during update-img ------------------------------


def _cut_during(g: Guest, rng: random.Random, tag: str, command: str, window: float) -> bool:
    """Start `command` in the background and cut the power a seeded moment later (0 to `window`
    seconds). Kernel log markers around the command tell, from the host's console log, whether the
    cut landed while it ran; returns True when it did."""
    log = g.console_log
    g.check(
        f"( echo dbd-phase-start-{tag} > /dev/kmsg; {command}; "
        f"echo dbd-phase-done-{tag} rc=$? > /dev/kmsg ) >/dev/null 2>&1 </dev/null &"
    )
    deadline = time.monotonic() + 60
    while f"dbd-phase-start-{tag}" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{tag}: the command did not start within 60 s"
        time.sleep(0.05)
    g.run(f"sleep {rng.uniform(0.0, window):.2f}", timeout=60)
    g.power_cut()
    return f"dbd-phase-done-{tag}" not in log.read_text(errors="replace")


def _after_cut(g: Guest, o: Oracles, dev: str, manifests: list[str], fs: str = "ext4") -> None:
    """Oracle 5 after a cut: the journal replays, fsck is clean, every fsynced file (manifest k
    covers MNT/keep<k>) is intact, and the COW files (dirty or not) are ordinary deletable files."""
    o.crash_point()
    _replay_and_fsck(g, o, dev, fs)
    g.check(f"mount {dev} {MNT}")
    for k, manifest in enumerate(manifests):
        o.nothing_lost(f"{MNT}/keep{k}", manifest)
    g.check(f"rm -rf {MNT}/.datto* {MNT}/bg", timeout=300)
    g.load_module()


@pytest.mark.deep  # the plain power-cut scenario runs everywhere; these paths are not kernel-specific
@pytest.mark.guest_config(disks=[DiskSpec(320), DiskSpec(512)])
def test_power_cut_during_transitions_and_update_img(
    request: pytest.FixtureRequest, module_guest: Guest, oracles: Oracles, seed: int
) -> None:
    """Oracle 5 at three crash points that land inside an operation: transition-to-incremental and
    transition-to-snapshot under a write load (the filesystem is being frozen and the COW files
    switched), and update-img applying a period to a backup image. After each: the origin checks
    clean and holds every fsynced file, the COW files are deletable, the module loads again, and the
    backup disk's filesystem (written by update-img) checks clean."""
    g, o, dev = module_guest, oracles, "/dev/vdb"
    rng = random.Random(seed)
    _prepare(g, dev, "ext4")
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups")
    manifests: list[str] = []
    landed = 0

    def keep(k: int) -> None:
        manifests.append(f"/root/keep{k}.json")
        workloads.churn(o, f"{MNT}/keep{k}", seed + k, manifests[-1])
        g.check("sync")  # the manifest on the root disk must survive the cut too

    # 1: transition-to-incremental while writers run
    keep(0)
    _ok(g, f"setup-snapshot -f 96 {dev} {COW} 0")
    workloads.background(g, MNT, seed + 100)
    g.run("sleep 1", timeout=30)
    landed += _cut_during(g, rng, "t2i", "dbdctl transition-to-incremental 0", 1.5)
    _after_cut(g, o, dev, manifests)

    # 2: transition-to-snapshot while writers run
    keep(1)
    _ok(g, f"setup-snapshot -f 96 {dev} {COW} 0")
    _ok(g, "transition-to-incremental 0")
    workloads.background(g, MNT, seed + 200)
    g.run("sleep 1", timeout=30)
    landed += _cut_during(g, rng, "t2s", f"dbdctl transition-to-snapshot -f 96 {MNT}/.datto1 0", 1.5)
    _after_cut(g, o, dev, manifests)

    # 3: update-img applying an incremental period to the backup image
    keep(2)
    g.check("mount /dev/vdc /backups")
    _ok(g, f"setup-snapshot -f 96 {dev} {COW} 0")
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none && sync", timeout=600)
    _ok(g, "transition-to-incremental 0")
    workloads.churn(o, f"{MNT}/period", seed + 300, "/root/period.json")
    _ok(g, f"transition-to-snapshot -f 96 {MNT}/.datto1 0")
    landed += _cut_during(g, rng, "upd", f"update-img /dev/datto0 {COW} /backups/img", 4.0)
    _after_cut(g, o, dev, manifests)
    _replay_and_fsck(g, o, "/dev/vdc", "ext4")

    request.node.user_properties.append(("cuts_inside_the_operation", landed))
    print(f"power cuts that landed inside the operation: {landed} of 3")
    g.assert_no_kernel_findings()


# -- scenario 4: I/O errors under the COW file or the origin ------------------------------------------


def _error_table(sectors: int, holes: list[tuple[int, int]], under: str) -> str:
    """dm table: linear over `under` except error targets on `holes` (start, length in sectors)."""
    lines, pos = [], 0
    for start, length in sorted(holes):
        if start > pos:
            lines.append(f"{pos} {start - pos} linear {under} {pos}")
        lines.append(f"{start} {length} error")
        pos = start + length
    if pos < sectors:
        lines.append(f"{pos} {sectors - pos} linear {under} {pos}")
    return "\\n".join(lines)


# The COW-file side everywhere (and on the debug kernel); the origin side on the default kernel.
@pytest.mark.parametrize(
    "where",
    [pytest.param("cow", marks=pytest.mark.debugkernel), pytest.param("origin", marks=pytest.mark.deep)],
)
@pytest.mark.guest_config(disks=[DiskSpec(160)])
def test_io_error_fails_the_tracer_and_the_origin_keeps_working(
    module_guest: Guest, oracles: Oracles, seed: int, where: str
) -> None:
    """dm-error under the COW file's extents (its copy-on-write write fails) or under a file's blocks
    (reading the old data fails): the tracer enters the failed state with -EIO, /dev/datto0 reads
    fail, writes elsewhere on the origin keep working, destroy works, no kernel warning."""
    g, o = module_guest, oracles
    sectors = device_sectors(g, "/dev/vdb")
    g.check(f"dmsetup create dbdo --table '0 {sectors} linear /dev/vdb 0'")
    dev = "/dev/mapper/dbdo"
    _prepare(g, dev, "ext4")
    g.check(
        f"dd if=/dev/urandom of={MNT}/victim bs=1M count=4 conv=fsync status=none && "
        f"dd if=/dev/urandom of={MNT}/other bs=1M count=4 conv=fsync status=none"
    )
    _ok(g, f"setup-snapshot -f 40 {dev} {COW} 0")
    target = COW if where == "cow" else f"{MNT}/victim"
    holes = [(phys // 512, length // 512) for _logical, phys, length in fiemap(g, target)]
    assert holes, f"no extents for {target}"
    table = _error_table(sectors, holes, "/dev/vdb")
    g.check(
        f"printf '{table}\\n' | dmsetup load dbdo && dmsetup suspend --nolockfs dbdo && dmsetup resume dbdo"
    )

    # Overwrite the victim in place: its old data must be copied (read from the origin, written to
    # the COW file) before the write may proceed; one of the two hits the error target.
    r = g.run(
        f"dd if=/dev/urandom of={MNT}/victim bs=4k count=64 conv=notrunc,fsync oflag=direct status=none"
    )
    state = info(g, 0)
    assert state.error == -errno.EIO, f"expected the tracer failed with -EIO (-5), got {state}"
    if where == "cow":
        assert r.rc == 0, f"the origin write failed although only the COW file's blocks error: {r.stderr}"
    assert g.run("dd if=/dev/datto0 of=/dev/null bs=4k count=1 iflag=direct status=none").rc != 0, (
        "a failed tracer's snapshot must not be readable"
    )
    # The fault goes away (the COW file's freed blocks would otherwise fail new files): the origin
    # keeps working untracked, and the failed tracer never resumes.
    g.check(f"dmsetup load dbdo --table '0 {sectors} linear /dev/vdb 0' && dmsetup resume dbdo")
    workloads.churn(o, f"{MNT}/after", seed, "/root/after.json")
    o.nothing_lost(f"{MNT}/after", "/root/after.json")
    assert info(g, 0).error == -errno.EIO
    _ok(g, "destroy 0")
    g.check(f"umount {MNT}")
    o.fsck(dev, "ext4")  # only file data sat under the error holes
    g.check("dmsetup remove dbdo")
    g.assert_no_kernel_findings()


# -- scenario 5: write-point replay (dm-log-writes, fstests generic/482 style) -----------------------


# origin, log, replay target; XFS needs 300 MiB (mkfs.xfs's minimum)
REPLAY_EXT4 = pytest.mark.guest_config(disks=[DiskSpec(128), DiskSpec(768), DiskSpec(128)])
REPLAY_XFS = pytest.mark.guest_config(disks=[DiskSpec(320), DiskSpec(768), DiskSpec(320)])


@pytest.mark.parametrize(
    "fstype",
    [pytest.param("ext4", marks=REPLAY_EXT4), pytest.param("xfs", marks=[pytest.mark.deep, REPLAY_XFS])],
)
def test_every_flush_point_is_consistent_and_the_cow_file_clean_or_refused(
    module_guest: Guest, oracles: Oracles, seed: int, fstype: str
) -> None:
    """Record every write below the tracked filesystem with dm-log-writes through snapshot, incremental
    and snapshot periods and an unmount; rebuild the device at sampled FLUSH/FUA points. At each: the
    journal (XFS: the log) replays, fsck is clean, files fsynced before setup are intact, and the COW
    file is either not CLEAN (a reload refuses it) or CLEAN and valid."""
    g, o = module_guest, oracles
    sectors = device_sectors(g, "/dev/vdb")
    g.check(f"modprobe dm-log-writes && dmsetup create lw --table '0 {sectors} log-writes /dev/vdb /dev/vdc'")
    dev = "/dev/mapper/lw"
    _prepare(g, dev, fstype)  # mkfs is in the log too: the replay starts from the zeroed /dev/vdd
    small = workloads.Sizes(churn_ops=60, churn_bytes=4 << 20)
    workloads.churn(o, f"{MNT}/pre", seed, "/root/pre.json", small)
    g.check("sync && dmsetup message lw 0 mark setup")
    _ok(g, f"setup-snapshot -f 24 {dev} {COW} 0")
    workloads.churn(o, f"{MNT}/a", seed + 1, "/root/a.json", small)
    _ok(g, "transition-to-incremental 0")
    workloads.churn(o, f"{MNT}/b", seed + 2, "/root/b.json", small)
    _ok(g, f"transition-to-snapshot -f 24 {MNT}/.datto1 0")  # .datto is final (CLEAN) from here
    workloads.churn(o, f"{MNT}/c", seed + 3, "/root/c.json", small)
    g.check(f"umount {MNT} && dmsetup message lw 0 mark end")
    _ok(g, "destroy 0")
    g.check("dmsetup remove lw")
    result = o.replay_check(
        "/dev/vdc", "/dev/vdd", "--image", "/tmp/point.img", "--cow", "/.datto", "--sectors", sectors,
        "--points", 10, "--after-mark", "setup", "--manifest", "/root/pre.json", "--manifest-dir", "/pre",
        "--fstype", fstype,
    )  # fmt: skip
    print(result["message"])
    assert result["cow_dirty"] > 0, f"no crash point saw the active (dirty) COW file: {result['message']}"
    assert result["cow_clean"] > 0, f"no crash point saw the finalized COW file: {result['message']}"
    g.assert_no_kernel_findings()


# -- scenario 6: writers, snapshot readers and transitions racing --------------------------------------


@pytest.fixture
def racing(module_guest: Guest) -> Iterator[Guest]:
    yield module_guest
    module_guest.run("pkill -f 'guestlib churn|fio|dd if=/dev/datto0' || true")


# Nightly (soak) only, 3 minutes by default (the workflow gives 20); per change, the 4-round race
RACE_MINUTES = float(os.environ.get("DBD_RACE_MINUTES", "3"))


@pytest.mark.deep  # ~2 min per kernel; the dm-error and replay scenarios cover the I/O paths everywhere
@pytest.mark.guest_config(disks=[DiskSpec(320)])
@pytest.mark.parametrize(
    "minutes",
    [
        pytest.param(0, id="4rounds"),
        pytest.param(RACE_MINUTES, marks=[pytest.mark.long, pytest.mark.soak], id="minutes"),
    ],
)
def test_writers_readers_and_transitions_race(
    racing: Guest, oracles: Oracles, seed: int, minutes: float
) -> None:
    """Background writers and /dev/datto0 readers while the host cycles transition-to-incremental and
    transition-to-snapshot: every ioctl succeeds, nothing hangs, and the last snapshot checks clean.
    Four rounds in CI; with --long, rounds for DBD_RACE_MINUTES (default 10)."""
    g, o, dev = racing, oracles, "/dev/vdb"
    _prepare(g, dev, "ext4")
    _ok(g, f"setup-snapshot -f 96 {dev} {COW} 0")
    workloads.background(g, MNT, seed)
    cow = COW
    deadline = time.monotonic() + minutes * 60
    i = 0
    while i < 4 or time.monotonic() < deadline:
        i += 1
        # Readers only while in snapshot mode: transition-to-incremental refuses an open /dev/datto0.
        g.check(
            "( while :; do dd if=/dev/datto0 of=/dev/null bs=64k count=64 skip=$((RANDOM % 3000)) "
            "status=none; done ) "
            ">/dev/null 2>&1 </dev/null & echo $! > /tmp/readers.pid"
        )
        g.run("sleep 2", timeout=30)
        g.check(
            "kill $(cat /tmp/readers.pid); pkill -f 'dd if=/dev/datto0'; "
            "while pgrep -f 'dd if=/dev/datto0' >/dev/null; do sleep 0.1; done",
            timeout=60,
        )
        _ok(g, "transition-to-incremental 0")
        g.run("sleep 2", timeout=30)
        _ok(g, f"transition-to-snapshot -f 96 {MNT}/.datto{i} 0")
        g.check(f"rm -f {cow}")  # the incremental period's file, released by the transition
        cow = f"{MNT}/.datto{i}"
        # the background load keeps creating trees: keep the newest two so the volume never fills
        g.check(f"ls -dt {MNT}/bg/c* 2>/dev/null | tail -n +3 | xargs -r rm -rf", timeout=300)
        assert info(g, 0).error == 0, f"tracer failed in round {i}: {info(g, 0)}"
    g.check("pkill -f 'guestlib churn|fio'; sleep 1; sync")
    o.fsck("/dev/datto0", "ext4")
    _ok(g, "destroy 0")
    g.assert_no_kernel_findings()
