"""Self-tests of the guest harness: they boot real guests on the selected kernels (--kernel)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import (
    Guest,
    GuestBootError,
    GuestCrashError,
    GuestPythonError,
    GuestTimeout,
    KernelCrashError,
    KernelWarningError,
    run_batch,
)
from harness.images import module_path
from harness.pytest_plugin import Volume

pytestmark = pytest.mark.guest
TESTMODS = Path(__file__).with_name("testmods")


@contextlib.contextmanager
def _selftest_guest(
    target: str, image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> Iterator[Guest]:
    """A guest named after `module` (tests/guest/testmods), without dattobd, with /xchg/<module>.ko;
    its artifacts go to tmp_path/<module>. Kernel findings raise when the block is left."""
    monkeypatch.setenv("DBD_ARTIFACTS", str(tmp_path))
    ko = module_path(target, TESTMODS, module=module)
    with Guest(target, image=image, module=False, name=module) as g:
        (g.xchg / f"{module}.ko").write_bytes(ko.read_bytes())
        yield g


@pytest.mark.debugkernel
def test_boot_and_uname(guest: Guest, guest_image: Any) -> None:
    assert guest.run("uname -r").stdout.strip() == guest_image.kernel_release
    mounts = guest.check("cat /proc/mounts").stdout
    assert re.search(r"^src /src 9p ro[,\s]", mounts, re.M)
    assert re.search(r"^xchg /xchg 9p rw[,\s]", mounts, re.M)
    assert guest.run("touch /src/x").rc != 0  # the checkout is read-only
    assert guest.check("ls /dev/vdb").rc == 0
    assert guest.boot_seconds is not None and guest.boot_seconds < 120


@pytest.mark.deep
def test_exact_binary_and_long_output(guest: Guest) -> None:
    r = guest.run("python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * 64)'; echo err >&2")
    assert r.stdout_bytes == bytes(range(256)) * 64 and r.stderr == "err\n" and r.rc == 0
    r = guest.run("head -c 3000000 /dev/urandom > /tmp/r; cat /tmp/r")
    digest = guest.check("sha256sum /tmp/r").stdout.split()[0]
    assert len(r.stdout_bytes) == 3_000_000 and hashlib.sha256(r.stdout_bytes).hexdigest() == digest
    long_line = guest.run("python3 -c \"print('x' * 100000)\"").stdout
    assert long_line == "x" * 100000 + "\n"
    # printk noise on the console while a command runs does not leak into its output
    r = guest.run("for i in 1 2 3; do echo noise-$i > /dev/kmsg; done; echo clean")
    assert r.stdout == "clean\n"
    assert guest.run("exit 7").rc == 7


@pytest.mark.deep
def test_py_structured_results_and_errno(guest: Guest) -> None:
    got = guest.py("import os, pydbd\nresult = {'pid': os.getpid(), 'raw': b'\\0\\xff', 'm': pydbd.__file__}")
    assert got["raw"] == b"\x00\xff" and got["m"] == "/src/pydbd/__init__.py" and got["pid"] > 1
    with pytest.raises(GuestPythonError) as ei:
        guest.py("import os\nos.open('/nonexistent', os.O_RDONLY)")
    assert (ei.value.type, ei.value.errno) == ("FileNotFoundError", 2)
    with pytest.raises(GuestPythonError) as ei:
        guest.py("import fcntl, os\nfd = os.open('/dev/null', os.O_RDONLY)\nfcntl.ioctl(fd, 0x1234)")
    assert ei.value.errno == 25 and ei.value.type == "OSError"  # ENOTTY from a bad ioctl
    with pytest.raises(GuestPythonError) as ei:
        guest.py("raise KeyError('k')")
    assert ei.value.type == "KeyError" and ei.value.errno is None


@pytest.mark.debugkernel
def test_warning_is_caught_and_fails_unless_expected(
    target: str, guest_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        pytest.raises(KernelWarningError) as ei,
        _selftest_guest(target, guest_image, tmp_path, monkeypatch, "warnmod") as g,
    ):
        with g.expect_kernel_finding("WARNING:"):
            g.check("insmod /xchg/warnmod.ko")
        [expected] = g.kernel_findings()
        assert expected.expected and expected.kind == "warning" and "warnmod_init" in expected.excerpt
        assert "Call Trace" in expected.excerpt
        g.check("rmmod warnmod && insmod /xchg/warnmod.ko")  # the same warning, not announced this time
    [unexpected] = ei.value.findings
    assert unexpected.kind == "warning" and not unexpected.expected
    saved = tmp_path / "warnmod"
    assert (saved / "console.log").is_file() and "warnmod_init" in (saved / "findings.txt").read_text()


@pytest.mark.deep
def test_an_oops_ends_the_command_and_names_itself(
    target: str, guest_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """insmod never returns after its module's thread oopses: the command ends at the report, not at
    its timeout (GuestTimeout), and the failure's first line is the kernel's own."""
    with (
        pytest.raises(KernelWarningError),  # the oops is still an unexpected finding at close
        _selftest_guest(target, guest_image, tmp_path, monkeypatch, "oopsmod") as g,
    ):
        with pytest.raises(KernelCrashError) as ei:
            g.run("insmod /xchg/oopsmod.ko", timeout=600)
        first = str(ei.value).splitlines()[0]
        assert first.startswith("kernel ") and "insmod /xchg/oopsmod.ko" in first, first
        assert re.search(r"BUG: kernel NULL pointer dereference|general protection", first), first
        assert any("oopsmod_thread" in f.excerpt for f in ei.value.findings), ei.value.findings


@pytest.mark.debugonly
def test_kmemleak_finds_a_leak_and_fails_the_test(
    target: str, guest_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a debug kernel every guest ends with a kmemleak scan; prove a real leak fails the test."""
    with (
        pytest.raises(KernelWarningError) as ei,
        _selftest_guest(target, guest_image, tmp_path, monkeypatch, "leakmod") as g,
    ):
        assert g.kmemleak_scan() == "", "kmemleak reports objects before the test did anything"
        g.check("insmod /xchg/leakmod.ko")
        report = g.kmemleak_scan(clear=True)
        assert report.count("unreferenced object") >= 1 and "leakmod" in report, report
        g.check("rmmod leakmod && insmod /xchg/leakmod.ko")  # leaks again; the close-time scan sees it
    # kmemleak's own console line ("N new suspected memory leaks") is a finding too
    leaks = ei.value.findings
    assert leaks and all(f.kind == "kmemleak" for f in leaks), leaks
    assert any("leakmod" in f.excerpt for f in leaks)
    # the full report is kept with the artifacts (host files are copied under files/)
    assert "leakmod" in (tmp_path / "leakmod" / "files" / "kmemleak.txt").read_text()


def test_panic_is_a_failure_although_qemu_exits_0(guest: Guest, guest_image: Any) -> None:
    with guest.expect_kernel_finding("Kernel panic"), pytest.raises(GuestCrashError) as ei:
        guest.run("echo c > /proc/sysrq-trigger", timeout=60)
    assert "sysrq triggered crash" in ei.value.console_tail
    assert guest.qemu_exit_status == 0 and not guest.alive

    res = run_batch("echo c > /proc/sysrq-trigger", guest_image.target.name, image=guest_image, name="panic")
    assert res.qemu_status == 0 and res.rc is None and not res.ok
    assert "panic" in [f.kind for f in res.findings] and "no TESTINIT-END" in res.reason
    ok = run_batch("echo hello; echo oops >&2; exit 0", guest_image.target.name, image=guest_image)
    assert ok.ok and ok.rc == 0 and ok.stdout == b"hello\n" and ok.stderr == b"oops\n"


def test_power_cut_during_write_and_clean_reboot(guest: Guest, ext4_volume: Volume) -> None:
    dev = ext4_volume.device
    old_boot = guest.check("cat /proc/sys/kernel/random/boot_id").stdout
    guest.check("sync")
    guest.run(f"dd if=/dev/zero of={ext4_volume.mountpoint}/big bs=1M count=2000 >/dev/null 2>&1 &")
    deadline = time.monotonic() + 60
    while int(guest.check(f"stat -c %s {ext4_volume.mountpoint}/big").stdout) < 20 << 20:
        assert time.monotonic() < deadline, "dd did not get going"
        time.sleep(0.2)
    since = guest.qmp.event_count()
    guest.power_cut(wait=False)
    assert guest.qmp.wait_event("RESET", 5, since, lambda e: e["data"]["reason"] == "host-qmp-system-reset")
    guest.wait_ready()
    assert guest.check("cat /proc/sys/kernel/random/boot_id").stdout != old_boot
    fsck = guest.run(f"e2fsck -fy {dev}")
    assert fsck.rc in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected (journal replay)
    guest.check(f"e2fsck -fn {dev}")
    guest.check(f"mkdir -p /mnt/vol && mount {dev} /mnt/vol && echo persisted > /mnt/vol/f && sync")

    guest.reboot()
    assert guest.check(f"mkdir -p /mnt/vol && mount {dev} /mnt/vol && cat /mnt/vol/f").stdout == "persisted\n"
    assert guest.check("echo still scriptable").stdout == "still scriptable\n"


@pytest.mark.deep
def test_two_guests_in_parallel_do_not_interfere(target: str, guest_image: Any) -> None:
    # One vCPU each: with another xdist worker's guest beside them, 2+2 vCPUs would starve (RCU stalls).
    guests = [Guest(target, image=guest_image, module=False, name=f"par{i}", smp=1) for i in range(2)]
    errors: list[BaseException] = []

    def boot(g: Guest) -> None:
        try:
            g.boot()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=boot, args=(g,)) for g in guests]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert guests[0].run_dir != guests[1].run_dir
        for i, g in enumerate(guests):
            g.check(f"echo guest-{i} > /xchg/who; echo guest-{i} > /root/who")
        for i, g in enumerate(guests):
            assert g.check("cat /xchg/who /root/who").stdout == f"guest-{i}\nguest-{i}\n"
            assert (g.xchg / "who").read_text() == f"guest-{i}\n"
        ids = {g.check("cat /proc/sys/kernel/random/boot_id").stdout for g in guests}
        assert len(ids) == 2
    finally:
        for g in guests:
            g.finish(test_failed=False, artifact_dir=None)


@pytest.mark.deep
def test_timeout_kills_the_guest(guest: Guest) -> None:
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as ei:
        guest.run("echo about-to-hang > /dev/console; sleep 600", timeout=3)
    assert time.monotonic() - t0 < 15
    assert "about-to-hang" in ei.value.console_tail and not guest.alive
    assert "about-to-hang" in guest.console_log.read_text()


@pytest.mark.deep
def test_boot_failure_raises_with_console_tail(target: str, guest_image: Any) -> None:
    g = Guest(target, image=guest_image, module=False, name="noboot", append_extra=("init=/nonexistent",))
    with pytest.raises(GuestBootError) as ei:
        g.boot()
    assert "Kernel panic" in ei.value.console_tail or "TESTINIT-FAIL" in ei.value.console_tail
    g.finish(test_failed=True, artifact_dir=None)


@pytest.mark.deep
def test_trixie_rootfs_has_the_new_mount_api(target: str) -> None:
    """The second rootfs exists so tests can mount with util-linux >= 2.39 (fsopen/fsmount/move_mount)."""
    g = Guest(target, rootfs="trixie", module=False, name="trixie-rootfs")
    try:
        g.boot()
        version = g.check("mount --version").stdout
        major, minor = (int(x) for x in re.search(r"util-linux (\d+)\.(\d+)", version).groups())  # type: ignore[union-attr]
        assert (major, minor) >= (2, 39), version
        assert "fd-based-mount" in version
        assert g.check("cat /etc/debian_version").stdout.startswith("13")
    finally:
        g.finish(test_failed=False, artifact_dir=None)
