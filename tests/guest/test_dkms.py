"""INSTALL.md's DKMS install, run as written, then the installed module in a guest.

The block marked `<!-- runnable: dkms -->` in INSTALL.md is split in two:

* up to its `dkms install` line it runs in the target's module build chroot (vmimages/chroot.py),
  which plays the machine: dkms, build-essential and the kernel headers are installed there
  (`tool_packages` of the target in vmimages/matrix.toml), `uname -r` answers the target's kernel
  release, the current directory is a copy of the checkout (kernel/ and dkms.conf), and `apt-get
  install` only checks that the named packages are installed (the chroot is offline). It runs in an
  overlay mount, so the cached chroot is never changed;
* the rest (`modprobe dattobd && ...`) runs in a guest of the target, after the module tree that
  `dkms install` wrote (`updates/dkms/dattobd.ko`, depmod'ed) was copied into the guest's
  /lib/modules, as the guest's root file system has neither dkms nor headers.

Then the module must be the DKMS build (srcversion), report the version of dkms.conf in
/sys/module/dattobd/version, offer /dev/datto-ctl, and take a snapshot of an ext4 volume and drop it.
Any dkms failure fails the test with dkms's output and make.log. Targets without dkms in their build
chroot (all but debian-6.1) skip it; CI runs it on the default kernel only (`deep`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import module_under_test
from harness.docblocks import Block, collect
from harness.guest import Guest
from harness.pytest_plugin import Volume
from vmimages.cache import source_files
from vmimages.chroot import ensure_chroot
from vmimages.matrix import get_target
from vmimages.progress import Progress

pytestmark = [pytest.mark.guest, pytest.mark.deep]

ROOT = Path(__file__).resolve().parents[2]
DKMS_TIMEOUT = 900


def dkms_block() -> Block:
    blocks = [b for d in collect(ROOT) for b in d.of_kind("dkms")]
    assert len(blocks) == 1, f"expected one `<!-- runnable: dkms -->` block in the docs, found {len(blocks)}"
    return blocks[0]


def split_block(block: Block) -> tuple[str, str]:
    """(the lines up to the last `dkms` command, the lines from the first `modprobe` on)."""
    lines = block.text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("modprobe")]
    assert starts, f"{block.where}: the DKMS block has no `modprobe` line to run in the guest"
    machine, guest = lines[: starts[0]], lines[starts[0] :]
    assert any(ln.lstrip().startswith("dkms install") for ln in machine), (
        f"{block.where}: the DKMS block has no `dkms install` line before its `modprobe`"
    )
    return "".join(ln + "\n" for ln in machine), "".join(ln + "\n" for ln in guest)


def package_version(dkms_conf: Path) -> str:
    m = re.search(r'^PACKAGE_VERSION="([^"]+)"', dkms_conf.read_text(), re.M)
    assert m, f"{dkms_conf}: no PACKAGE_VERSION"
    return m.group(1)


# Stand-ins of the chroot: an offline apt-get that checks what the doc installs is there, and a
# uname whose -r answers the kernel the module is for.
_APT_GET = r"""
apt-get() {
    [ "$1" = install ] || { echo "apt-get stand-in: only 'install' is supported" >&2; return 2; }
    shift
    for p in "$@"; do
        case "$p" in -*) continue ;; esac
        s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) || s=missing
        [ "$s" = installed ] || { echo "package $p is not installed in the build chroot ($s)" >&2; return 1; }
        echo "apt-get stand-in: $p is installed"
    done
}
"""
_UNAME = """#!/bin/sh
if [ "$*" = "-r" ]; then echo {release}; else exec /usr/bin/uname "$@"; fi
"""


def run_dkms(target: str, script: str, work: Path) -> tuple[Path, str]:
    """Run `script` (bash -e) in an overlay of the target's build chroot; returns (the installed
    dattobd.ko in the overlay's upper dir, the output)."""
    t = get_target(target)
    lower = ensure_chroot(t.suite, Progress(False))
    upper, workdir, merged = work / "upper", work / "work", work / "merged"
    for d in (upper, workdir, merged):
        d.mkdir(parents=True)
    checkout = upper / "root" / "checkout"
    for f in [*source_files(ROOT / "kernel"), ROOT / "dkms.conf"]:
        dest = checkout / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest, follow_symlinks=False)
    uname = upper / "usr" / "local" / "bin" / "uname"
    uname.parent.mkdir(parents=True)
    uname.write_text(_UNAME.format(release=t.kernel_release))
    uname.chmod(0o755)
    (upper / "root" / "dkms-install.sh").write_text(
        f'set -e\n{_APT_GET}\n[ "$(uname -r)" = {t.kernel_release} ]\ncd /root/checkout\nset -x\n'
        f"{script}dkms status\n"
    )
    inner = (
        'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4" && '
        'mount -t proc proc "$4/proc" && '
        'exec chroot "$4" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin '
        "HOME=/root LC_ALL=C.UTF-8 bash /root/dkms-install.sh"
    )
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh"]
    cmd += [str(lower), str(upper), str(workdir), str(merged)]
    p = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=DKMS_TIMEOUT,
    )
    logs = sorted((upper / "var" / "lib" / "dkms").glob("dattobd/*/**/make.log"))
    log_text = "".join(f"--- {p.relative_to(upper)}\n{p.read_text(errors='replace')}" for p in logs)
    if p.returncode != 0:
        pytest.fail(f"the DKMS install failed (rc {p.returncode}):\n{p.stdout}\n{log_text}", pytrace=False)
    kos = sorted(upper.glob(f"**/modules/{t.kernel_release}/updates/dkms/dattobd.ko*"))
    assert len(kos) == 1, f"dkms install reported success but installed {kos}:\n{p.stdout}"
    return kos[0], p.stdout


@pytest.fixture
def dkms_module(target: str, tmp_path: Path) -> tuple[Path, str]:
    """INSTALL.md's DKMS lines run in the target's build chroot (before the guest boots)."""
    if "dkms" not in get_target(target).tool_packages:
        pytest.skip(f"{target}: no dkms in its build chroot (tool_packages in vmimages/matrix.toml)")
    if module_under_test.from_env().foreign:
        pytest.skip(
            f"DKMS packages kernel/, not the module under test ({module_under_test.from_env().describe()})"
        )
    machine, _ = split_block(dkms_block())
    return run_dkms(target, machine, tmp_path / "dkms")


def test_dkms_install_of_install_md(dkms_module: tuple[Path, str], guest: Guest, ext4_volume: Volume) -> None:
    ko, dkms_output = dkms_module
    print(dkms_output)
    block = dkms_block()
    _, guest_lines = split_block(block)
    g = guest
    rel = g.check("uname -r").stdout.strip()
    shutil.copyfile(ko, g.xchg / ko.name)
    g.check(
        f"mkdir -p /lib/modules/{rel}/updates/dkms && cp /xchg/{ko.name} /lib/modules/{rel}/updates/dkms/ "
        "&& depmod -a"
    )
    r = g.run(f"cd /src && bash -e -x -c {_q(guest_lines)}", timeout=120)
    assert r.rc == 0, f"{block.where}: the guest part of the DKMS block exited {r.rc}:\n{r.stdout}{r.stderr}"
    assert "version" in r.stdout, f"no /proc/datto-info after modprobe:\n{r.stdout}"

    # It is the module dkms built, of the version dkms.conf names.
    srcversion = subprocess.run(
        ["modinfo", "-F", "srcversion", str(ko)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert g.check("cat /sys/module/dattobd/srcversion").stdout.strip() == srcversion
    assert g.check("cat /sys/module/dattobd/version").stdout.strip() == package_version(ROOT / "dkms.conf")
    assert g.check("modinfo -n dattobd").stdout.strip().endswith("/updates/dkms/dattobd.ko")
    g.check("test -c /dev/datto-ctl")

    # A snapshot, and it goes away again.
    g.install_pydbd_tools()
    v = ext4_volume
    g.check(f"echo hello > {v.mountpoint}/file && sync")
    g.check(f"dbdctl setup-snapshot {v.device} {v.mountpoint}/.datto 0 && test -b /dev/datto0")
    g.check("dbdctl status 0 | grep -q 'active snapshot'")
    g.check("mkdir -p /mnt/snap && mount -o ro /dev/datto0 /mnt/snap")
    assert g.check("cat /mnt/snap/file").stdout == "hello\n"
    g.check("umount /mnt/snap")
    g.check("dbdctl destroy 0 && test ! -e /dev/datto0")
    g.check("modprobe -r dattobd && test ! -e /dev/datto-ctl")


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
