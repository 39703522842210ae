"""Upstream dattobd 0.12.1 defects (spec section 9) that our module fixes, one guest test each.

Defect 18 (destroy of a dormant tracer) needs dormancy, which comes with the lifecycle work.
"""

from __future__ import annotations

import errno
import json

import pytest
from dbd import ctl, dbdctl, info, proc_devices

from harness.guest import Guest
from harness.pytest_plugin import Volume

MIB = 1024 * 1024


@pytest.mark.deep
def test_1_expand_releases_the_table_lock(module_guest: Guest, ext4_volume: Volume) -> None:
    """Upstream leaks the device-table lock after a successful expand: every later ioctl hangs."""
    g, vol = module_guest, ext4_volume
    assert dbdctl(g, f"setup-snapshot -f 64 {vol.device} /mnt/vol/.datto 0").rc == 0
    before = info(g, 0).falloc_size
    assert dbdctl(g, "expand-cow-file 4 0", timeout=60).rc == 0
    assert info(g, 0).falloc_size == before + 4 * MIB
    # The table is usable afterwards: more ioctls and /proc, each bounded by a timeout.
    assert dbdctl(g, "expand-cow-file 2 0", timeout=60).rc == 0
    assert info(g, 0).falloc_size == before + 6 * MIB
    assert dbdctl(g, "reconfigure-auto-expand -r 1 4 0", timeout=60).rc == 0
    [d] = proc_devices(g)
    assert d["auto_expand"] == {"step_size_mib": 4, "reserved_space_mib": 1}
    assert dbdctl(g, "get-free", timeout=60).stdout.strip() == "1"
    assert dbdctl(g, "destroy 0", timeout=60).rc == 0


@pytest.mark.deep
def test_6_transition_to_snapshot_keeps_cache_and_a_usable_size(
    module_guest: Guest, ext4_volume: Volume
) -> None:
    """Upstream reverts the cache size to the default and may inherit a size smaller than the index."""
    g, vol = module_guest, ext4_volume
    # 512 MiB device: the index alone takes 1 MiB + 4 KiB, so 2 MiB leaves little room for data.
    assert dbdctl(g, f"setup-snapshot -c 8388608 -f 2 {vol.device} /mnt/vol/.datto 0").rc == 0
    assert dbdctl(g, "transition-to-incremental 0").rc == 0
    assert dbdctl(g, "transition-to-snapshot /mnt/vol/.datto1 0").rc == 0
    i = info(g, 0)
    assert i.cache_size == 8388608
    data_offset = 4096 + 32 * 32768
    assert i.falloc_size >= data_offset + MIB
    g.check("dd if=/dev/urandom of=/mnt/vol/f bs=1M count=1 conv=fsync status=none")
    assert info(g, 0).error == 0
    assert dbdctl(g, "destroy 0").rc == 0


@pytest.mark.deep
def test_8_proc_escapes_paths(module_guest: Guest, ext4_volume: Volume) -> None:
    """Upstream prints paths unescaped, so a quote or backslash breaks /proc/datto-info as JSON."""
    g, vol = module_guest, ext4_volume
    name = 'we"ird\\name'
    assert ctl(g, "setup_snapshot", vol.device, f"/mnt/vol/{name}", 0) == 0
    text = g.check("cat /proc/datto-info").stdout
    assert json.loads(text)["devices"][0]["cow_file"] == f"/{name}"
    [d] = proc_devices(g)
    assert d["cow_file"] == f"/{name}"
    assert ctl(g, "destroy", 0) == 0


@pytest.mark.deep
def test_destroy_works_in_the_failed_state(module_guest: Guest, ext4_volume: Volume) -> None:
    g, vol = module_guest, ext4_volume
    assert dbdctl(g, f"setup-snapshot -f 2 {vol.device} /mnt/vol/.datto 0").rc == 0
    g.check("dd if=/dev/urandom of=/mnt/vol/f bs=1M count=16 conv=fsync status=none", timeout=300)
    assert info(g, 0).error == -errno.EFBIG
    assert ctl(g, "reconfigure", 0, 0) == errno.EINVAL
    assert ctl(g, "destroy", 0) == 0
    assert ctl(g, "info", 0) == errno.ENOENT


@pytest.mark.deep
def test_7_cow_data_never_passes_fsize(module_guest: Guest, ext4_volume: Volume) -> None:
    """Upstream checks `fpos * 4096 >= fsize`, so with the default size (10 % of the device, not a
    multiple of 4096) one more block than fits is written past fsize. Ours only uses whole 4 KiB slots
    below fsize (a copy batch that would not fit fails as a whole, so a few slots may stay unused),
    then fails with EFBIG."""
    g, vol = module_guest, ext4_volume
    assert dbdctl(g, f"setup-snapshot {vol.device} /mnt/vol/.datto 0").rc == 0
    fsize = info(g, 0).falloc_size
    device_bytes = int(g.check(f"blockdev --getsize64 {vol.device}").stdout)
    assert fsize == device_bytes * 10 // 100 and fsize % 4096 != 0
    g.check("dd if=/dev/urandom of=/mnt/vol/f bs=1M count=80 conv=fsync status=none", timeout=300)
    i = info(g, 0)
    assert i.error == -errno.EFBIG
    data_offset = 4096 + 32 * 32768
    slots = (fsize - data_offset) // 4096
    assert slots * 0.95 <= i.nr_changed_blocks <= slots
    assert ctl(g, "destroy", 0) == 0
