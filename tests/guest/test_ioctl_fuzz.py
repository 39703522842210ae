"""Bad-input fuzzing of the kernel interface (issue 7): guestlib.ioctlfuzz in a guest.

Every ioctl with random and boundary arguments (minors, sizes, NULL/unmapped/unterminated string
and struct pointers, over-long paths, paths to every file type and to other filesystems), while
tracers exist in several states; then the same without CAP_SYS_ADMIN. A failed call must give a
documented errno and change nothing in /proc/datto-info; no kernel warning; the module unloads at
the end (nothing leaked a reference).
"""

from __future__ import annotations

import pytest
from dbd import dbdctl, info

from harness.guest import Guest
from harness.oracles import Oracles
from harness.qemu import DiskSpec

pytestmark = [pytest.mark.guest]

CALLS, UNPRIVILEGED_CALLS = 400, 100


@pytest.mark.guest_config(disks=[DiskSpec(160), DiskSpec(160), DiskSpec(64)])
def test_bad_arguments_give_documented_errors_and_change_nothing(
    module_guest: Guest, oracles: Oracles, seed: int
) -> None:
    g, o = module_guest, oracles
    mkfs = "mkfs.ext4 -q -F -O ^orphan_file"
    g.check(
        f"{mkfs} /dev/vdb && {mkfs} /dev/vdc && {mkfs} /dev/vdd && mkdir -p /mnt/vol /mnt/other && "
        "mount /dev/vdb /mnt/vol && mount /dev/vdc /mnt/other && touch /mnt/other/file"
    )
    # tracers in other states for the fuzzer to meet: active incremental (3) and unverified snapshot (5)
    assert dbdctl(g, "setup-snapshot -f 16 /dev/vdc /mnt/other/.datto 3").rc == 0
    assert dbdctl(g, "transition-to-incremental 3").rc == 0
    assert dbdctl(g, "reload-snapshot /dev/vdd /.datto 5").rc == 0
    assert (info(g, 3).state, info(g, 5).state) == (2, 5)

    common = [
        "--bdev", "/dev/vdb", "--cow-dir", "/mnt/vol", "--other", "/mnt/other/.datto",
        "--other", "/mnt/other/file", "--other", "/dev/vdc", "--other", "/dev/vdd", "--other", "/dev/vda",
    ]  # fmt: skip
    result = o.require("ioctl-fuzz", "--seed", seed, "--calls", CALLS, *common, timeout=1200)
    assert result["calls"] == CALLS
    result = o.require(
        "ioctl-fuzz",
        "--seed",
        seed + 1,
        "--calls",
        UNPRIVILEGED_CALLS,
        "--unprivileged",
        *common,
        timeout=600,
    )
    assert result["results"] == {"EPERM": UNPRIVILEGED_CALLS}

    for minor in (3, 5):
        r = dbdctl(g, f"destroy {minor}")
        assert r.rc == 0 or "No such file" in r.stderr, r.stderr
    g.check("umount /mnt/vol /mnt/other")
    g.unload_module()  # a leaked reference would make this fail
    g.assert_no_kernel_findings()
