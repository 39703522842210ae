"""Boot integration (spec section 7, dist/): the root filesystem stays tracked across a clean reboot.

The guest's initramfs runs dist/'s datto-premount (harness.bootint): it loads the module, mounts the
root read-only, runs the reload scripts written by `dbdctl persist-reload`, unmounts it; the
read-write root mount that follows activates the reloaded tracer. The clean reboot (sync, unmount,
remount / read-only, reboot) is what makes the root's tracer dormant with a clean COW header.
"""

from __future__ import annotations

import pytest
from dbd import cow_report, dbdctl, device_sectors, fiemap, info

from harness.guest import Guest

ROOT = "/dev/vda"
# The root's COW size. ext4's lazy inode-table init (the image is made with lazy_itable_init=1)
# zeroes up to 32 MiB of inode tables in the first minutes after every boot, and every one of
# those blocks is copied on write: 16 MiB filled up within a second of setup on 6.12 (ENOSPC).
ROOT_COW_MIB = 96


def _ok(g: Guest, args: str) -> None:
    r = dbdctl(g, args)
    assert r.rc == 0, f"dbdctl {args}: {r.stderr}\n{g.dmesg()[-2000:]}"


def _changed_blocks(g: Guest, cow: str, sectors: int) -> set[int]:
    code = (
        "from pydbd.cow import CowFile\n"
        f"with CowFile({cow!r}, {sectors}) as c:\n"
        "    result = [b for b, _v in c.iter_changed()]\n"
    )
    blocks = g.py(code, timeout=300)
    assert isinstance(blocks, list)
    return {int(b) for b in blocks}


def _file_blocks(g: Guest, path: str) -> set[int]:
    g.check("sync")
    return {
        b
        for _logical, physical, length in fiemap(g, path)
        for b in range(physical // 4096, (physical + length + 4095) // 4096)
    }


def test_root_tracking_survives_clean_reboot(boot_integration_guest: Guest) -> None:
    """Incremental tracking of / continues across a reboot: blocks written before and after it are
    all in the change list that transition-to-snapshot hands to update-img."""
    g = boot_integration_guest
    g.install_pydbd_tools()
    g.check("test -c /dev/datto-ctl")  # loaded by the initramfs
    _ok(g, f"setup-snapshot -f {ROOT_COW_MIB} {ROOT} /.datto 0")
    _ok(g, "transition-to-incremental 0")
    g.check("dd if=/dev/urandom of=/root/before bs=1M count=4 conv=fsync status=none")
    before = _file_blocks(g, "/root/before")
    r = dbdctl(g, "persist-reload 0")
    assert r.rc == 0, r.stderr
    script = g.check("cat /etc/datto/dla/reload_0").stdout
    assert f"reload-incremental {ROOT} /.datto 0" in script, script
    nr_before = info(g, 0).nr_changed_blocks

    g.reboot()

    i = info(g, 0)
    assert (i.state, i.error) == (2, 0), (i, g.dmesg()[-3000:])
    assert i.nr_changed_blocks >= nr_before
    assert "reloaded minor 0 is active" in g.dmesg()
    g.check("dd if=/dev/urandom of=/root/after bs=1M count=4 conv=fsync status=none")
    after = _file_blocks(g, "/root/after")
    _ok(g, f"transition-to-snapshot -f {ROOT_COW_MIB} /.datto2 0")
    assert info(g, 0).state == 3

    sectors = device_sectors(g, ROOT)
    report = cow_report(g, "/.datto", sectors)
    assert report["valid"], report["violations"]
    assert report["header"]["flags_decoded"].startswith("0x3 "), report["header"]
    changed = _changed_blocks(g, "/.datto", sectors)
    assert before <= changed, f"{len(before - changed)} blocks written before the reboot are missing"
    assert after <= changed, f"{len(after - changed)} blocks written after the reboot are missing"
    assert dbdctl(g, "destroy 0").rc == 0


@pytest.mark.deep
def test_root_reload_refused_after_unclean_stop(boot_integration_guest: Guest) -> None:
    """After a power cut the root's COW header is dirty and its journal needs recovery: the
    premount's read-only mount (on a read-only device) cannot replay it, so nothing is reloaded,
    the console says why, and no stale change list is ever activated."""
    g = boot_integration_guest
    g.install_pydbd_tools()
    _ok(g, f"setup-snapshot -f {ROOT_COW_MIB} {ROOT} /.datto 0")
    _ok(g, "transition-to-incremental 0")
    assert dbdctl(g, "persist-reload 0").rc == 0
    g.check("sync")
    mark = len(g.console_log.read_text(errors="replace"))
    g.power_cut()
    assert '"minor": 0' not in g.check("cat /proc/datto-info").stdout
    assert dbdctl(g, "info 0").rc != 0
    boot_log = g.console_log.read_text(errors="replace")[mark:]
    assert "dattobd: cannot mount /dev/vda read-only" in boot_log, boot_log[-3000:]
    assert "nothing reloaded" in boot_log
