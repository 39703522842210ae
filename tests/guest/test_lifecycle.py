"""Tracer lifecycle across unmount/mount, read-only remounts and reboots.

Spec: ../shared/spec/dattobd-0.12-interfaces.md section 3 (dormant and unverified states, mount
events), 4.4 (the COW file's CLEAN/INDEX_ONLY header at dormancy and reload), 7 (reload at boot)
and 9.12/9.18 (failed reloads, destroy of a dormant tracer).

Every test ends with assert_no_kernel_findings(); the guest fixture also fails a test at teardown
on any BUG/WARNING/oops/lockdep/... seen on the console.
"""

from __future__ import annotations

import errno
import re

import pytest
from dbd import (
    assert_image_matches,
    cow_report,
    ctl,
    dbdctl,
    device_sectors,
    drop_caches,
    fiemap,
    info,
    install_tools,
    proc_device,
    proc_devices,
    sha256,
    write_file,
)

from harness.guest import Guest
from harness.pytest_plugin import Volume
from harness.qemu import DiskSpec

# Small volumes: every test hashes or copies whole devices several times, and TCG reads ~20 MiB/s.
pytestmark = [pytest.mark.guest, pytest.mark.guest_config(disks=[DiskSpec(160)])]

MNT = "/mnt/vol"
COW = "/mnt/vol/.datto"
COW_REL = "/.datto"
CLEAN, INDEX_ONLY, VMALLOC_UPPER = 1, 2, 4
EMPTY_PROC = '{\n\t"version": "0.12.1",\n\t"devices": [\n\n\t]\n}\n'
TWO_DISKS = [DiskSpec(160), DiskSpec(256)]  # the traced volume /dev/vdb, backups on /dev/vdc


# -- helpers ---------------------------------------------------------------------------------------


def _state(g: Guest, minor: int = 0) -> tuple[int, int]:
    """(state, error) from INFO, checked against /proc/datto-info (which omits error 0)."""
    i = info(g, minor)
    d = proc_device(g, minor)
    assert d is not None, f"minor {minor} missing from /proc/datto-info"
    assert (d["state"], d.get("error", 0)) == (i.state, i.error), (d, i)
    return i.state, i.error


def _flags(report: dict[str, object]) -> int:
    header = report["header"]
    assert isinstance(header, dict), report
    return int(header["flags"]) & ~VMALLOC_UPPER


def _header(report: dict[str, object]) -> dict[str, int]:
    header = report["header"]
    assert isinstance(header, dict), report
    return header


def _umount(g: Guest, where: str = MNT) -> None:
    r = g.run(f"umount {where}")
    assert r.rc == 0, f"umount {where} failed (rc {r.rc}): {r.stderr}"


def _mount(g: Guest, dev: str, options: str = "") -> None:
    r = g.run(f"mount {options} {dev} {MNT}".replace("  ", " "))
    assert r.rc == 0, f"mount failed (rc {r.rc}): {r.stderr}"


def _cow_via_ro_mount(g: Guest, dev: str, rel: str = COW_REL) -> dict[str, object]:
    """Verify the COW file of an unmounted volume through a temporary read-only mount (ignored by
    the module: read-only mounts never activate a tracer)."""
    g.check(f"mkdir -p /mnt/ro && mount -o ro {dev} /mnt/ro")
    try:
        return cow_report(g, f"/mnt/ro{rel}", device_sectors(g, dev))
    finally:
        g.check("umount /mnt/ro")


def _backups(g: Guest) -> None:
    install_tools(g)
    g.check("mkfs.ext4 -q -F -O ^orphan_file /dev/vdc && mkdir -p /backups && mount /dev/vdc /backups")


def _full_image(g: Guest, vol: Volume) -> None:
    """setup-snapshot, copy /dev/datto0 to /backups/img, transition-to-incremental."""
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    g.check("dd if=/dev/datto0 of=/backups/img bs=1M status=none", timeout=300)
    assert dbdctl(g, "transition-to-incremental 0").rc == 0
    assert _state(g) == (2, 0)


def _incremental_with_changes(g: Guest, vol: Volume, tag: str) -> str:
    """Full image, then incremental with 10 MiB changed (base rewritten, `pre` new); returns the uuid."""
    _backups(g)
    write_file(g, f"{MNT}/base", 16, "base")
    _full_image(g, vol)
    uuid = info(g, 0).uuid
    write_file(g, f"{MNT}/base", 4, "changed")
    write_file(g, f"{MNT}/pre", 6, tag)
    g.check("sync")
    return uuid


def _update_img_is_exact(g: Guest, new_cow: str = "/mnt/vol/.datto1", old_cow: str = COW) -> None:
    """transition-to-snapshot, update-img from the old (now CLEAN|INDEX_ONLY) file: image == snapshot."""
    r = dbdctl(g, f"transition-to-snapshot {new_cow} 0")
    assert r.rc == 0, r.stderr
    assert _state(g) == (3, 0)
    rep = cow_report(g, old_cow, device_sectors(g, "/dev/vdb"))
    assert rep["valid"] and _flags(rep) == CLEAN | INDEX_ONLY, rep
    r = g.run(f"update-img /dev/datto0 {old_cow} /backups/img", timeout=300)
    assert r.rc == 0 and "copying complete" in r.stdout, r.stdout + r.stderr
    assert_image_matches(g, "/backups/img", "/dev/datto0", new_cow)


def _dattobd_lines(g: Guest) -> list[str]:
    return [line for line in g.dmesg().splitlines() if "datto" in line]


# -- tests -----------------------------------------------------------------------------------------


# The old mount API (bookworm's util-linux) on the default kernel only: the new one (trixie's
# fsopen/fsmount) reaches the same vfs_get_tree observer and runs everywhere.
@pytest.mark.parametrize("rootfs", [pytest.param("bookworm", marks=pytest.mark.deep), "trixie"])
def test_umount_mount_cycle_snapshot(module_guest: Guest, ext4_volume: Volume, rootfs: str) -> None:
    """umount of a snapshotted volume succeeds, leaves a dormant snapshot (1) with a CLEAN file;
    mount reactivates it (3) with the snapshot unchanged (also by raw writes to the unmounted device)
    and still copy-on-writing; the dormant /dev/datto0 reads as the snapshot. On trixie mount(8) uses
    the new mount API (fsopen/fsmount/move_mount)."""
    g, vol = module_guest, ext4_volume
    if rootfs == "trixie":
        assert "fd-based-mount" in g.check("mount --version").stdout
    write_file(g, f"{MNT}/a", 8, "before")
    write_file(g, f"{MNT}/r", 1, "raw")  # not written again while mounted: its blocks get no COW copy
    before, raw_before = sha256(g, f"{MNT}/a"), sha256(g, f"{MNT}/r")
    _, physical, length = fiemap(g, f"{MNT}/r")[0]
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    write_file(g, f"{MNT}/a", 4, "during")  # some COW data in the file before the umount
    g.check("sync")
    snap = sha256(g, "/dev/datto0")
    active = info(g, 0)
    assert (active.state, active.error) == (3, 0)

    _umount(g)
    assert _state(g) == (1, 0)
    assert g.run("test -b /dev/datto0").rc == 0, "a dormant snapshot keeps /dev/datto0 (spec 3)"
    rep = _cow_via_ro_mount(g, vol.device)
    assert rep["valid"], rep
    hdr = _header(rep)
    assert _flags(rep) == CLEAN, rep
    assert (hdr["seqid"], hdr["uuid"], hdr["version"]) == (1, active.uuid, 1)
    assert hdr["nr_changed_blocks"] >= active.nr_changed_blocks > 0
    assert _state(g) == (1, 0), "a read-only mount must not activate the tracer"
    # A raw write to the unmounted origin: the snapshot must still show the old data afterwards, and
    # the header is dirty again on disk until the next mount (doc/lifecycle.md, "Going dormant").
    blocks = min(length, 1 << 20) // 4096
    g.check(
        f"head -c {blocks * 4096} /dev/urandom > /root/rand && dd if=/root/rand of={vol.device} bs=1024 "
        f"seek={physical // 1024} count={blocks * 4} conv=notrunc oflag=direct status=none"
    )
    assert not _flags(_cow_via_ro_mount(g, vol.device)) & CLEAN, "a write while dormant must dirty the header"

    _mount(g, vol.device)
    assert _state(g) == (3, 0)
    i = info(g, 0)
    assert (i.seqid, i.uuid, i.cow, i.bdev) == (1, active.uuid, COW_REL, vol.device)
    assert i.nr_changed_blocks >= hdr["nr_changed_blocks"]
    drop_caches(g)
    assert not _flags(cow_report(g, COW)) & CLEAN, "the reopened file is marked dirty while active"
    landed = g.check(f"head -c {blocks * 4096} {MNT}/r | sha256sum").stdout.split()[0]
    assert landed == sha256(g, "/root/rand"), "the raw write did not reach the device"
    assert sha256(g, "/dev/datto0") == snap, "snapshot changed across the umount/raw write/mount cycle"
    write_file(g, f"{MNT}/a", 8, "after")
    write_file(g, f"{MNT}/b", 4, "new")
    g.check("sync")
    assert sha256(g, "/dev/datto0") == snap, "writes after the re-mount were not copied on write"
    g.check("mkdir -p /mnt/snap && mount -o ro /dev/datto0 /mnt/snap")
    assert sha256(g, "/mnt/snap/a") == before
    assert sha256(g, "/mnt/snap/r") == raw_before
    g.check("umount /mnt/snap")
    assert _state(g) == (3, 0)

    # Second cycle. Upstream answers EBUSY to reads of a dormant snapshot; ours stays readable
    # (doc/compat.md) and must show the same snapshot.
    _umount(g)
    assert _state(g) == (1, 0)
    assert sha256(g, "/dev/datto0") == snap, "the dormant snapshot device does not show the snapshot"
    _mount(g, vol.device)
    assert _state(g) == (3, 0)
    assert sha256(g, "/dev/datto0") == snap
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.deep  # the snapshot cycle reaches the same unmount and mount observers everywhere
@pytest.mark.guest_config(disks=TWO_DISKS)
def test_umount_mount_cycle_incremental(module_guest: Guest, ext4_volume: Volume) -> None:
    """umount of an incremental volume leaves a dormant incremental (0) with a CLEAN|INDEX_ONLY file;
    mount reactivates it (2); blocks changed before the umount and after the mount all reach update-img."""
    g, vol = module_guest, ext4_volume
    uuid = _incremental_with_changes(g, vol, "pre-umount")
    nr_before = info(g, 0).nr_changed_blocks
    assert nr_before >= 2560

    _umount(g)
    assert _state(g) == (0, 0)
    assert g.run("test -e /dev/datto0").rc != 0
    dormant = info(g, 0)
    rep = _cow_via_ro_mount(g, vol.device)
    assert rep["valid"], rep
    hdr = _header(rep)
    assert _flags(rep) == CLEAN | INDEX_ONLY, rep
    assert (hdr["seqid"], hdr["uuid"]) == (1, uuid)
    assert nr_before <= hdr["nr_changed_blocks"] <= dormant.nr_changed_blocks
    assert _state(g) == (0, 0)

    _mount(g, vol.device)
    assert _state(g) == (2, 0)
    i = info(g, 0)
    assert (i.seqid, i.uuid) == (1, uuid)
    assert i.nr_changed_blocks >= dormant.nr_changed_blocks, "changed-block count lost across the cycle"
    write_file(g, f"{MNT}/post", 5, "post-mount")
    write_file(g, f"{MNT}/pre", 2, "rewritten")
    g.check("sync")
    _update_img_is_exact(g)
    g.check(f"rm {COW}")
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


# remount via mount(2) everywhere, via fsconfig(FSCONFIG_CMD_RECONFIGURE) on the default kernel
@pytest.mark.parametrize("rootfs", ["bookworm", pytest.param("trixie", marks=pytest.mark.deep)])
def test_remount_ro_makes_dormant_and_rw_reactivates(
    module_guest: Guest, ext4_volume: Volume, rootfs: str
) -> None:
    """`mount -o remount,ro` turns an active snapshot (3) / incremental (2) dormant (1 / 0) with a clean
    header on disk; `remount,rw` makes it active again, the snapshot unchanged."""
    g, vol = module_guest, ext4_volume
    sectors = device_sectors(g, vol.device)
    write_file(g, f"{MNT}/a", 8, "before")
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    write_file(g, f"{MNT}/a", 4, "during")
    g.check("sync")
    snap = sha256(g, "/dev/datto0")

    g.check(f"mount -o remount,ro {MNT}")
    assert _state(g) == (1, 0)
    drop_caches(g)
    rep = cow_report(g, COW, sectors)
    assert rep["valid"] and _flags(rep) == CLEAN, rep
    g.check(f"mount -o remount,rw {MNT}")
    assert _state(g) == (3, 0)
    assert sha256(g, "/dev/datto0") == snap
    write_file(g, f"{MNT}/a", 8, "after")
    g.check("sync")
    assert sha256(g, "/dev/datto0") == snap

    assert dbdctl(g, "transition-to-incremental 0").rc == 0
    write_file(g, f"{MNT}/c", 2, "inc")
    g.check("sync")
    nr = info(g, 0).nr_changed_blocks
    g.check(f"mount -o remount,ro {MNT}")
    assert _state(g) == (0, 0)
    drop_caches(g)
    rep = cow_report(g, COW, sectors)
    assert rep["valid"] and _flags(rep) == CLEAN | INDEX_ONLY, rep
    assert _header(rep)["nr_changed_blocks"] >= nr
    g.check(f"mount -o remount,rw {MNT}")
    assert _state(g) == (2, 0)
    assert info(g, 0).nr_changed_blocks >= nr
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.deep
@pytest.mark.guest_config(disks=TWO_DISKS)
def test_raw_writes_while_dormant_are_tracked(module_guest: Guest, ext4_volume: Volume) -> None:
    """Writes to the unmounted device while the tracer is dormant (0) are marked changed at the next
    mount, so update-img still produces a byte-exact image."""
    g, vol = module_guest, ext4_volume
    _backups(g)
    write_file(g, f"{MNT}/target", 1, "target")  # in the full image with this content
    g.check("sync")
    extents = fiemap(g, f"{MNT}/target")
    assert sum(length for _, _, length in extents) == 1 << 20, extents
    _full_image(g, vol)
    write_file(g, f"{MNT}/inc", 2, "inc")
    g.check("sync")

    _umount(g)
    assert _state(g) == (0, 0)
    dormant = info(g, 0).nr_changed_blocks
    g.check("head -c 1048576 /dev/urandom > /root/rand")
    for logical, physical, length in extents:
        assert logical % 1024 == physical % 1024 == length % 1024 == 0  # 1 KiB-block ext4 too
        g.check(
            f"dd if=/root/rand of={vol.device} bs=1024 skip={logical // 1024} seek={physical // 1024} "
            f"count={length // 1024} conv=notrunc oflag=direct status=none"
        )
    assert _state(g) == (0, 0)
    assert not _flags(_cow_via_ro_mount(g, vol.device)) & CLEAN, "a write while dormant must dirty the header"

    _mount(g, vol.device)
    assert _state(g) == (2, 0)
    assert sha256(g, f"{MNT}/target") == sha256(g, "/root/rand")
    assert info(g, 0).nr_changed_blocks >= dormant + 256, "the 256 raw-written blocks were not marked"
    _update_img_is_exact(g)
    g.check("mkdir -p /mnt/snap && mount -o ro /dev/datto0 /mnt/snap")
    assert sha256(g, "/mnt/snap/target") == sha256(g, "/root/rand")
    g.check("umount /mnt/snap")
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


# Cache size of the reload: 0 is the default; 1 byte leaves room for no index section (spec 4.6), so
# the reloaded index stays in the file and every section is read back when it is needed.
# The default-cache reloads also run on the debug kernel: CI's consistency round has no reboot.
# There the snapshot reload (index sections read back) is in every CI run; the incremental reload,
# six minutes of debug-kernel reboots on a slow machine, is in the nightly soak tier.
RELOAD_CACHES = [
    pytest.param(0, id="default-cache", marks=pytest.mark.debugkernel),
    pytest.param(1, id="1-byte-cache", marks=pytest.mark.deep),
]
INCREMENTAL_RELOAD_CACHES = [
    # deep: the snapshot reload reads the same file through the same kernel calls everywhere
    pytest.param(0, id="default-cache", marks=[pytest.mark.deep, pytest.mark.debugkernel(soak=True)]),
    RELOAD_CACHES[1],
]


@pytest.mark.guest_config(disks=TWO_DISKS)
@pytest.mark.parametrize("cache", INCREMENTAL_RELOAD_CACHES)
def test_reload_incremental_after_clean_reboot(module_guest: Guest, ext4_volume: Volume, cache: int) -> None:
    """A cleanly unmounted incremental survives a reboot: reload-incremental before the mount gives
    an unverified tracer (4); the rw mount activates it (2) with seqid, uuid and change count kept,
    and the update-img chain stays byte-exact across the reboot."""
    g, vol = module_guest, ext4_volume
    uuid = _incremental_with_changes(g, vol, "pre-reboot")
    _umount(g)
    assert _state(g) == (0, 0)
    hdr = _header(_cow_via_ro_mount(g, vol.device))
    assert hdr["flags"] & ~VMALLOC_UPPER == CLEAN | INDEX_ONLY and hdr["nr_changed_blocks"] >= 2560

    g.reboot()
    g.load_module()
    install_tools(g)
    g.check(f"mkdir -p {MNT} /backups && mount /dev/vdc /backups")
    r = dbdctl(g, f"reload-incremental -c {cache} {vol.device} {COW_REL} 0")
    assert r.rc == 0, r.stderr
    assert _state(g) == (4, 0)
    i = info(g, 0)
    assert (i.cow, i.bdev, i.cache_size) == (COW_REL, vol.device, cache or 314572800)
    assert g.run("test -e /dev/datto0").rc != 0

    _mount(g, vol.device)
    assert _state(g) == (2, 0)
    i = info(g, 0)
    assert (i.seqid, i.uuid, i.version, i.cow) == (1, uuid, 1, COW_REL)
    assert i.nr_changed_blocks >= hdr["nr_changed_blocks"], "changed-block count not adopted from the file"
    drop_caches(g)
    assert not _flags(cow_report(g, COW)) & CLEAN, "the reloaded file is marked dirty while active"
    write_file(g, f"{MNT}/post", 5, "post-reboot")
    write_file(g, f"{MNT}/pre", 2, "rewritten")
    g.check("sync")
    _update_img_is_exact(g)
    assert info(g, 0).seqid == 2
    g.check(f"rm {COW}")
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.deep  # the reload's header checks are not kernel-specific
@pytest.mark.debugkernel(soak=True)  # nightly there: a power cut and two debug-kernel boots
def test_power_cut_leaves_reload_unverified_with_einval(module_guest: Guest, ext4_volume: Volume) -> None:
    """After a power cut the COW file's header is dirty: the reloaded tracer is not activated by the
    mount (stays 4, error -22, reported in INFO, /proc and dmesg), not by a second mount either, and
    destroy removes it."""
    g, vol = module_guest, ext4_volume
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    assert dbdctl(g, "transition-to-incremental 0").rc == 0
    write_file(g, f"{MNT}/pre", 4, "pre-crash")
    g.check("sync")

    g.power_cut()
    g.load_module()
    g.check(f"mkdir -p {MNT}")
    assert dbdctl(g, f"reload-incremental {vol.device} {COW_REL} 0").rc == 0
    assert _state(g) == (4, 0)
    _mount(g, vol.device)
    assert _state(g) == (4, -errno.EINVAL)
    d = proc_device(g, 0)
    assert d is not None and d["error"] == -22 and d["state"] == 4
    assert '"error": -22' in g.check("cat /proc/datto-info").stdout
    lines = _dattobd_lines(g)
    assert any(re.search(r"clean|dirty", line, re.I) for line in lines), "\n".join(lines)
    assert g.run("test -e /dev/datto0").rc != 0
    write_file(g, f"{MNT}/post", 1, "untracked")

    _umount(g)
    assert _state(g) == (4, -errno.EINVAL)
    _mount(g, vol.device)
    assert _state(g) == (4, -errno.EINVAL), "a failed reload must not be accepted by a later mount"
    assert ctl(g, "transition_to_snapshot", "/mnt/vol/.datto1", 0, 0) == errno.EINVAL
    assert dbdctl(g, "destroy 0").rc == 0
    assert ctl(g, "info", 0) == errno.ENOENT
    assert g.check("cat /proc/datto-info").stdout == EMPTY_PROC
    g.assert_no_kernel_findings()


@pytest.mark.deep
def test_failed_reload_then_destroy_and_reload(module_guest: Guest, ext4_volume: Volume) -> None:
    """A reload naming a missing file fails at mount with -2 (ENOENT, state 4); after destroy, a reload
    with the right path activates at the next mount (2) with the change count kept."""
    g, vol = module_guest, ext4_volume
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    assert dbdctl(g, "transition-to-incremental 0").rc == 0
    uuid = info(g, 0).uuid
    write_file(g, f"{MNT}/pre", 4, "pre")
    g.check("sync")
    _umount(g)
    assert _state(g) == (0, 0)
    nr = info(g, 0).nr_changed_blocks
    assert dbdctl(g, "destroy 0").rc == 0
    assert ctl(g, "info", 0) == errno.ENOENT

    assert dbdctl(g, f"reload-incremental {vol.device} /.missing 0").rc == 0
    assert _state(g) == (4, 0)
    _mount(g, vol.device)
    assert _state(g) == (4, -errno.ENOENT)
    assert g.run("test -e /mnt/vol/.missing").rc != 0
    _umount(g)
    assert dbdctl(g, "destroy 0").rc == 0

    assert dbdctl(g, f"reload-incremental {vol.device} {COW_REL} 0").rc == 0
    assert _state(g) == (4, 0)
    _mount(g, vol.device)
    assert _state(g) == (2, 0)
    i = info(g, 0)
    assert (i.uuid, i.seqid) == (uuid, 1) and i.nr_changed_blocks >= nr
    assert dbdctl(g, "transition-to-snapshot /mnt/vol/.datto1 0").rc == 0
    assert _state(g) == (3, 0)
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.deep
def test_destroy_dormant_keeps_clean_cow_file(module_guest: Guest, ext4_volume: Volume) -> None:
    """Destroy of a dormant snapshot (1) and of a dormant incremental (0) succeeds, removes the tracer
    and /dev/datto0 and keeps the closed COW file with its clean header (upstream defect 18)."""
    g, vol = module_guest, ext4_volume
    for mode, state, flags in (("snapshot", 1, CLEAN), ("incremental", 0, CLEAN | INDEX_ONLY)):
        cow = f"{COW}-{mode}"
        assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {cow} 0").rc == 0
        if mode == "incremental":
            assert dbdctl(g, "transition-to-incremental 0").rc == 0
        write_file(g, f"{MNT}/{mode}", 2, mode)
        g.check("sync")
        uuid = info(g, 0).uuid
        _umount(g)
        assert _state(g) == (state, 0)
        r = dbdctl(g, "destroy 0")
        assert r.rc == 0, f"destroy of a dormant {mode} tracer: {r.stderr}"
        assert ctl(g, "info", 0) == errno.ENOENT
        assert g.check("cat /proc/datto-info").stdout == EMPTY_PROC
        assert g.run("test -e /dev/datto0").rc != 0
        rep = _cow_via_ro_mount(g, vol.device, f"/.datto-{mode}")
        assert rep["valid"] and _flags(rep) == flags and _header(rep)["uuid"] == uuid, rep
        _mount(g, vol.device)
        assert proc_devices(g) == []
        assert g.run(f"test -f {cow}").rc == 0
        g.check(f"rm {cow}")  # the file is no longer held: an ordinary file again
    g.assert_no_kernel_findings()


@pytest.mark.deep
def test_other_unmounts_and_failed_umount_keep_active(module_guest: Guest, ext4_volume: Volume) -> None:
    """Only the unmount of the mount holding the COW file matters: unmounting a bind mount or a copy in
    another mount namespace leaves the snapshot active (3); an umount that fails (busy) reactivates it,
    and the snapshot stays unchanged through later writes."""
    g, vol = module_guest, ext4_volume
    write_file(g, f"{MNT}/a", 8, "before")
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    snap = sha256(g, "/dev/datto0")

    g.check(f"mkdir -p /mnt/bind && mount --bind {MNT} /mnt/bind && umount /mnt/bind")
    assert _state(g) == (3, 0)
    g.check(f"unshare -m --propagation private umount {MNT}")
    assert _state(g) == (3, 0)
    assert g.check(f"findmnt -n -o SOURCE {MNT}").stdout.strip() == vol.device

    pid = g.check(f"nohup sleep 600 < {MNT}/a > /dev/null 2>&1 & echo $!").stdout.strip()
    r = g.run(f"umount {MNT}")
    assert r.rc != 0 and "busy" in r.stderr, r.stderr
    assert _state(g) == (3, 0), "a failed umount must leave the tracer active"
    write_file(g, f"{MNT}/a", 8, "after")
    g.check("sync")
    assert sha256(g, "/dev/datto0") == snap
    g.check(f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done")

    _umount(g)
    assert _state(g) == (1, 0)
    _mount(g, vol.device)
    assert _state(g) == (3, 0)
    assert sha256(g, "/dev/datto0") == snap
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.parametrize("cache", RELOAD_CACHES)
def test_reload_snapshot_after_clean_reboot(module_guest: Guest, ext4_volume: Volume, cache: int) -> None:
    """A snapshot survives a clean reboot: reload-snapshot (5) before the mount, the read-write
    mount activates it (3) and /dev/datto0 is byte-identical to before the reboot, although the
    mount itself rewrote the ext4 superblock before activation (old data kept since the reload)."""
    g, vol = module_guest, ext4_volume
    write_file(g, f"{MNT}/a", 4, "before")
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    write_file(g, f"{MNT}/a", 4, "after")
    g.check("sync")
    snap = sha256(g, "/dev/datto0")
    _umount(g)
    assert _state(g) == (1, 0)

    g.reboot()
    g.load_module()
    install_tools(g)
    r = dbdctl(g, f"reload-snapshot -c {cache} {vol.device} {COW_REL} 0")
    assert r.rc == 0, r.stderr
    assert _state(g) == (5, 0)
    assert g.run("test -e /dev/datto0").rc != 0, "no snapshot device while unverified (spec 3)"
    _mount(g, vol.device)
    assert _state(g) == (3, 0)
    assert sha256(g, "/dev/datto0") == snap, "the reloaded snapshot differs from the one before the reboot"
    write_file(g, f"{MNT}/a", 4, "later")
    g.check("sync")
    assert sha256(g, "/dev/datto0") == snap
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()


@pytest.mark.deep
def test_reload_of_an_upstream_sized_cow_file(module_guest: Guest, ext4_volume: Volume) -> None:
    """Upstream makes a COW file exactly fsize long, 10 % of the device in bytes, which is rarely a
    multiple of 4 KiB. A clean snapshot file cut to such a length (header fsize and i_size edited
    beneath the unmounted filesystem, as upstream would have left it) reloads and activates, and the
    snapshot still shows the data of its point in time."""
    g, vol = module_guest, ext4_volume
    write_file(g, f"{MNT}/a", 4, "before")
    before = sha256(g, f"{MNT}/a")
    assert dbdctl(g, f"setup-snapshot -f 40 {vol.device} {COW} 0").rc == 0
    write_file(g, f"{MNT}/a", 4, "after")
    g.check("sync")
    [(logical, phys, _length), *_] = fiemap(g, COW)
    assert logical == 0
    _umount(g)
    assert dbdctl(g, "destroy 0").rc == 0  # dormant destroy keeps the clean file

    fsize = (40 << 20) - 1000  # not a multiple of 4096, as upstream's 10 % default mostly is
    g.py(
        "import dataclasses, os\n"
        "from pydbd.cow import CowHeader, HEADER_SIZE\n"
        f"fd = os.open({vol.device!r}, os.O_RDWR)\n"
        f"raw = os.pread(fd, HEADER_SIZE, {phys})\n"
        "h = CowHeader.unpack(raw)\n"
        "assert h.clean and h.fsize == 40 << 20, h\n"
        f"h = dataclasses.replace(h, fsize={fsize})\n"
        f"os.pwrite(fd, h.pack(), {phys})\n"
        "os.fsync(fd)\n"
        "os.close(fd)\n"
        "result = None\n"
    )
    g.check(
        f"debugfs -w -R 'sif {COW_REL} size {fsize}' {vol.device} && "
        "sync && echo 3 > /proc/sys/vm/drop_caches"
    )
    rep = _cow_via_ro_mount(g, vol.device)
    assert rep["valid"] and _header(rep)["fsize"] == fsize, rep

    r = dbdctl(g, f"reload-snapshot {vol.device} {COW_REL} 0")
    assert r.rc == 0, r.stderr
    _mount(g, vol.device)
    assert _state(g) == (3, 0), "the upstream-sized COW file did not activate"
    assert g.check(f"stat -c %s {COW}").stdout.strip() == str(fsize)
    write_file(g, f"{MNT}/a", 4, "later")
    g.check("sync && mkdir -p /mnt/snap && mount -o ro,noload /dev/datto0 /mnt/snap")
    assert sha256(g, "/mnt/snap/a") == before, "the reloaded snapshot lost its point in time"
    g.check("umount /mnt/snap")
    _umount(g)  # dormant again: the file is finalized at its odd length
    rep = _cow_via_ro_mount(g, vol.device)
    assert rep["valid"] and _flags(rep) == CLEAN, rep
    assert dbdctl(g, "destroy 0").rc == 0
    g.assert_no_kernel_findings()
