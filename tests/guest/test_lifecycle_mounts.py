"""Dormancy follows the filesystem, not a mount: a lazy unmount makes the tracer dormant when the
last user of the filesystem is gone. (Bind mounts and other namespaces: test_lifecycle.py's
test_other_unmounts_and_failed_umount_keep_active.) See doc/lifecycle.md.
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
