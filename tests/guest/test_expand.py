"""COW file growth: reconfigure-auto-expand and expand-cow-file (spec sections 2.1, 5 and 9 defect 1).

All tests use the default 512 MiB scratch disk with ext4. Its index takes 1 MiB + 4 KiB, so a 2 MiB
COW file holds under 256 data blocks; the 16 MiB workload needs about 4100, i.e. two 8 MiB steps.
"""

from __future__ import annotations

import errno

import pytest
from dbd import Info, ctl, dbdctl, info, proc_devices, sha256, write_file

from harness.guest import Guest
from harness.pytest_plugin import Volume

MIB = 1024 * 1024
COW = "/mnt/vol/.datto"
DATA_OFFSET = 4096 + 32 * 32768  # header + index of a 512 MiB device
INITIAL_MIB = 2
STEP_MIB = 8
RESERVED_MIB = 2
# Every ioctl after an expansion gets a bound: upstream leaked the table lock there (defect 1).
IOCTL_TIMEOUT = 60


def _setup_and_overwrite(g: Guest, vol: Volume, auto_expand: bool) -> str:
    """Write a file, take a 2 MiB snapshot (optionally auto-expanding), then rewrite 16 MiB.

    Returns the sha256 of the file as it was before the setup."""
    write_file(g, "/mnt/vol/a", 8, "before")
    before = sha256(g, "/mnt/vol/a")
    r = dbdctl(g, f"setup-snapshot -f {INITIAL_MIB} {vol.device} {COW} 0")
    assert r.rc == 0, r.stderr
    if auto_expand:
        r = dbdctl(g, f"reconfigure-auto-expand -r {RESERVED_MIB} {STEP_MIB} 0", timeout=IOCTL_TIMEOUT)
        assert r.rc == 0, r.stderr
    write_file(g, "/mnt/vol/a", 8, "after")
    write_file(g, "/mnt/vol/b", 8, "more")
    g.check("sync")
    return before


def _expected_proc(i: Info, nr_changed_blocks: int, tail: str) -> str:
    """/proc/datto-info for one active tracer on minor 0, exactly as spec section 5 prints it."""
    return (
        '{\n\t"version": "0.12.1",\n\t"devices": [\n'
        "\t\t{\n"
        '\t\t\t"minor": 0,\n'
        f'\t\t\t"cow_file": "{i.cow}",\n'
        f'\t\t\t"block_device": "{i.bdev}",\n'
        f'\t\t\t"max_cache": {i.cache_size},\n'
        f'\t\t\t"fallocate": {INITIAL_MIB * MIB},\n'
        f'\t\t\t"cow_size_current": {i.falloc_size},\n'
        f'\t\t\t"seq_id": {i.seqid},\n'
        f'\t\t\t"uuid": "{i.uuid}",\n'
        f'\t\t\t"version": {i.version},\n'
        f'\t\t\t"nr_changed_blocks": {nr_changed_blocks},\n'
        f"{tail}"
        "\t\t}\n\t]\n}\n"
    )


def _proc_nr_changed(text: str) -> int:
    [line] = [ln for ln in text.splitlines() if '"nr_changed_blocks"' in ln]
    return int(line.split(":")[1].strip().rstrip(","))


def test_auto_expand_keeps_snapshot_alive(module_guest: Guest, ext4_volume: Volume) -> None:
    g, vol = module_guest, ext4_volume
    before = _setup_and_overwrite(g, vol, auto_expand=True)
    i = info(g, 0)
    assert (i.state, i.error) == (3, 0)
    assert i.nr_changed_blocks * 4096 > INITIAL_MIB * MIB, "the workload must not fit the initial file"
    grown = i.falloc_size - INITIAL_MIB * MIB
    assert grown >= 2 * STEP_MIB * MIB and grown % (STEP_MIB * MIB) == 0, i.falloc_size
    # /proc: the auto_expand object sits between nr_changed_blocks and state; no error line.
    text = g.check("cat /proc/datto-info").stdout
    assert _proc_nr_changed(text) >= i.nr_changed_blocks
    auto_expand = (
        '\t\t\t"auto_expand": {\n'
        f'\t\t\t\t"step_size_mib": {STEP_MIB},\n'
        f'\t\t\t\t"reserved_space_mib": {RESERVED_MIB}\n'
        "\t\t\t},\n"
        '\t\t\t"state": 3\n'
    )
    assert text == _expected_proc(i, _proc_nr_changed(text), auto_expand)
    [d] = proc_devices(g)
    assert d["auto_expand"] == {"step_size_mib": STEP_MIB, "reserved_space_mib": RESERVED_MIB}
    assert "error" not in d
    # The snapshot still shows the data from before the setup, and checks clean.
    g.check("mkdir -p /mnt/snap && mount -o ro /dev/datto0 /mnt/snap")
    assert sha256(g, "/mnt/snap/a") == before
    assert g.run("test -e /mnt/snap/b").rc != 0
    g.check("umount /mnt/snap")
    g.check("e2fsck -fn /dev/datto0", timeout=300)
    assert info(g, 0).error == 0
    assert dbdctl(g, "destroy 0", timeout=IOCTL_TIMEOUT).rc == 0
    assert g.run(f"test -e {COW}").rc != 0


@pytest.mark.deep  # the failing half of the auto-expand pair; cow-full EFBIG runs everywhere
def test_same_workload_without_auto_expand_fails_with_efbig(module_guest: Guest, ext4_volume: Volume) -> None:
    g, vol = module_guest, ext4_volume
    _setup_and_overwrite(g, vol, auto_expand=False)
    i = info(g, 0)
    assert (i.state, i.error) == (3, -errno.EFBIG)
    assert i.falloc_size == INITIAL_MIB * MIB
    text = g.check("cat /proc/datto-info").stdout
    assert text == _expected_proc(i, _proc_nr_changed(text), '\t\t\t"error": -27,\n\t\t\t"state": 3\n')
    [d] = proc_devices(g)
    assert (d["error"], d["state"]) == (-errno.EFBIG, 3)
    assert "auto_expand" not in d
    # Failed: snapshot reads fail, the COW file is gone, only info and destroy work.
    assert g.run("dd if=/dev/datto0 of=/dev/null bs=4096 count=1 iflag=direct").rc != 0
    assert g.run(f"test -e {COW}").rc != 0
    assert ctl(g, "reconfigure_auto_expand", 0, STEP_MIB, 0) == errno.EINVAL
    assert ctl(g, "expand_cow_file", 0, STEP_MIB) == errno.EINVAL
    assert ctl(g, "destroy", 0) == 0


def test_expand_grows_file_and_keeps_ioctls_working(module_guest: Guest, ext4_volume: Volume) -> None:
    g, vol = module_guest, ext4_volume
    r = dbdctl(g, f"setup-snapshot -f {INITIAL_MIB} {vol.device} {COW} 0")
    assert r.rc == 0, r.stderr
    assert info(g, 0).falloc_size == INITIAL_MIB * MIB
    assert dbdctl(g, "expand-cow-file 14 0", timeout=IOCTL_TIMEOUT).rc == 0
    i = info(g, 0)
    assert (i.state, i.error, i.falloc_size) == (3, 0, 16 * MIB)
    # The added space is really usable: 8 MiB of copy-on-write fits 16 MiB, not the initial 2 MiB.
    write_file(g, "/mnt/vol/a", 8, "a")
    g.check("sync")
    i = info(g, 0)
    assert (i.state, i.error) == (3, 0)
    assert i.nr_changed_blocks * 4096 > INITIAL_MIB * MIB
    # Both transitions and info still work (each bounded: a leaked lock would hang them).
    assert dbdctl(g, "transition-to-incremental 0", timeout=IOCTL_TIMEOUT).rc == 0
    i = info(g, 0)
    assert (i.state, i.error, i.seqid, i.falloc_size) == (2, 0, 1, DATA_OFFSET)
    r = dbdctl(g, f"transition-to-snapshot -f 4 {COW}1 0", timeout=IOCTL_TIMEOUT)
    assert r.rc == 0, r.stderr
    i = info(g, 0)
    assert (i.state, i.error, i.seqid, i.falloc_size) == (3, 0, 2, 4 * MIB)
    # The first file, closed by the transition, is a valid clean index-only file.
    sectors = g.check(f"blockdev --getsz {vol.device}").stdout.strip()
    r = dbdctl(g, f"cow-info --sectors {sectors} {COW}")
    assert r.rc == 0, r.stdout + r.stderr
    # Expand the second snapshot too, then the table is still usable.
    assert dbdctl(g, "expand-cow-file 3 0", timeout=IOCTL_TIMEOUT).rc == 0
    assert info(g, 0).falloc_size == 7 * MIB
    [d] = proc_devices(g)
    assert (d["fallocate"], d["cow_size_current"], d["seq_id"], d["state"]) == (4 * MIB, 7 * MIB, 2, 3)
    assert dbdctl(g, "get-free", timeout=IOCTL_TIMEOUT).stdout.strip() == "1"
    assert dbdctl(g, "destroy 0", timeout=IOCTL_TIMEOUT).rc == 0
    assert ctl(g, "info", 0) == errno.ENOENT
