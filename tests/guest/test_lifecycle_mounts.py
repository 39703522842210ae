"""Dormancy follows the filesystem, not a mount (upstream defect #410 and lazy unmounts).

A tracer goes dormant only when its filesystem is really shut down (or remounted read-only):
unmounting one of several mounts, or a mount in another mount namespace, keeps it active; a lazy
unmount makes it dormant when the last user is gone. See doc/lifecycle.md.
"""

from __future__ import annotations

import pytest
from dbd import dbdctl, info

from harness.guest import Guest
from harness.pytest_plugin import Volume
from harness.qemu import DiskSpec

SMALL = pytest.mark.guest_config(disks=[DiskSpec(128)])


def _setup_inc(g: Guest, vol: Volume) -> None:
    r = dbdctl(g, f"setup-snapshot -f 8 {vol.device} /mnt/vol/.datto 0")
    assert r.rc == 0, r.stderr
    assert dbdctl(g, "transition-to-incremental 0").rc == 0


@SMALL
def test_unmount_in_another_namespace_keeps_tracking(module_guest: Guest, ext4_volume: Volume) -> None:
    g = module_guest
    _setup_inc(g, ext4_volume)
    g.check("unshare -m --propagation private sh -c 'umount /mnt/vol && ! mountpoint -q /mnt/vol'")
    assert info(g, 0).state == 2, "still mounted in the initial namespace: must stay active"
    before = info(g, 0).nr_changed_blocks
    g.check("dd if=/dev/urandom of=/mnt/vol/f bs=1M count=2 conv=fsync status=none")
    assert info(g, 0).nr_changed_blocks >= before + 512
    g.check("umount /mnt/vol")
    assert info(g, 0).state == 0


@SMALL
def test_bind_mounts_dormant_only_after_the_last_unmount(module_guest: Guest, ext4_volume: Volume) -> None:
    g = module_guest
    _setup_inc(g, ext4_volume)
    g.check("mkdir -p /mnt/bind && mount --bind /mnt/vol /mnt/bind")
    g.check("umount /mnt/vol")
    assert info(g, 0).state == 2
    g.check("umount /mnt/bind")
    assert info(g, 0).state == 0
    g.check("mount /dev/vdb /mnt/vol")
    assert info(g, 0).state == 2


@SMALL
def test_lazy_unmount_goes_dormant_when_the_last_file_closes(
    module_guest: Guest, ext4_volume: Volume
) -> None:
    g = module_guest
    _setup_inc(g, ext4_volume)
    g.check("sleep 600 < /mnt/vol/.datto > /dev/null 2>&1 & echo $! > /tmp/holder")
    g.check("umount -l /mnt/vol")
    assert info(g, 0).state == 2, "a process still uses the filesystem"
    g.check("kill $(cat /tmp/holder); wait 2>/dev/null; sleep 1")
    g.check("for i in $(seq 50); do grep -q '\"state\": 0' /proc/datto-info && break; sleep 0.2; done")
    assert info(g, 0).state == 0
    assert g.run("umount /mnt/vol").rc != 0  # nothing left mounted there
