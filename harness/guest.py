"""`Guest`: one throwaway QEMU guest with a scriptable shell, QMP, a console watcher and artifacts.

    with Guest(target="debian-6.1", disks=[DiskSpec(256)], module=False) as g:
        r = g.run("uname -r")              # CommandResult(stdout, stderr, rc, ...)
        g.check("mkfs.ext4 -q /dev/vdb")   # raises GuestCommandError on rc != 0
        info = g.py("import os; result = os.uname().release")
        g.power_cut(); g.check("e2fsck -fy /dev/vdb")

Leaving the block shuts the guest down (killing QEMU if it hangs) and raises KernelWarningError if the
console showed kernel warnings/oopses/panics the test did not announce with `expect_kernel_finding`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness import artifacts, pyexec
from harness.console import Console, Shell
from harness.errors import (
    GuestBootError,
    GuestCommandError,
    GuestCrashError,
    GuestError,
    KernelCrashError,
    KernelWarningError,
)
from harness.images import (
    GuestDisk,
    ImageLike,
    guest_image,
    image_files_exist,
    is_debug_target,
    module_path,
    prepare_run,
)
from harness.qemu import XCHG_MOUNT, DiskSpec, QemuConfig, RunDir, build_command, format_command
from harness.qmp import QMP
from harness.watch import ConsoleWatcher, Expectation, Finding

DEFAULT_TIMEOUT = 120.0
DEBUG_TIME_SCALE = 4.0
# kmemleak's report of unreferenced objects at least 5 s old (its minimum age), debugfs mounted first.
# Two scans: kmemleak reports an object only when its checksum did not change since the scan before.
KMEMLEAK_SCAN = (
    "d=/sys/kernel/debug; [ -e $d/kmemleak ] || mount -t debugfs debugfs $d; "
    "[ -e $d/kmemleak ] || { echo 'no $d/kmemleak: CONFIG_DEBUG_KMEMLEAK unset?' >&2; exit 3; }; "
    "sleep 5 && echo scan > $d/kmemleak && echo scan > $d/kmemleak && cat $d/kmemleak"
)
BOOT_TIMEOUT = 120.0
DEFAULT_DISKS = (DiskSpec(size_mib=512),)  # one sparse raw scratch disk, /dev/vdb (XFS needs >= 300 MiB)
_REBOOT_LINE = (
    "sync; umount -a -r -t noproc,sysfs,devtmpfs,devpts,tmpfs,9p,cgroup2,debugfs 2>/dev/null; "
    "mount -o remount,ro / 2>/dev/null; sync; busybox reboot -f || echo b >/proc/sysrq-trigger"
)


@dataclass(frozen=True)
class CommandResult:
    stdout: str
    stderr: str
    rc: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    cmd: str = ""
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class _State:
    rundir: RunDir
    config: QemuConfig
    argv: list[str]
    disks: list[GuestDisk]
    console: Console
    qmp: QMP
    shell: Shell
    boot_mark: int = 0
    dmesg: str | None = None
    guest_files: list[str] = field(default_factory=list)
    host_files: list[Path] = field(default_factory=list)


class Guest:
    def __init__(
        self,
        target: str | None = None,
        rootfs: str = "bookworm",
        disks: list[DiskSpec] | tuple[DiskSpec, ...] = DEFAULT_DISKS,
        memory_mib: int = 1024,
        smp: int = 1,
        module: bool = True,
        name: str | None = None,
        *,
        module_params: dict[str, object] | None = None,
        module_src: Path | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        accel: str | None = None,
        append_extra: tuple[str, ...] = (),
        image: ImageLike | None = None,
        keep: bool = False,
    ) -> None:
        from harness.images import default_target

        self.target = target or default_target()
        self.rootfs = rootfs
        self.disk_specs = tuple(disks)
        self.memory_mib = memory_mib
        self.smp = smp
        self.module = module
        self.module_params = dict(module_params or {})
        self.module_src = module_src
        self.name = name or f"guest-{self.target}"
        # Debug kernels (KASAN, lockdep, kmemleak) run several times slower under TCG: every command
        # and boot timeout is stretched by this factor there, so tests keep one set of timeouts.
        self.time_scale = DEBUG_TIME_SCALE if is_debug_target(self.target) else 1.0
        self.boot_timeout = boot_timeout * self.time_scale
        self.accel = accel
        self.append_extra = append_extra
        self.image: ImageLike | None = image
        self.keep = keep
        self.watcher = ConsoleWatcher()
        # Findings that did not come from the console (the kmemleak scan at close, on debug kernels).
        self.extra_findings: list[Finding] = []
        self._st: _State | None = None
        self._reset_pending: tuple[int, float] | None = None  # (console offset, time) of a reset
        self._closed = False
        self.boot_seconds: float | None = None  # QEMU start (or reset) -> shell usable, last (re)boot
        self.init_seconds: float | None = None  # TESTINIT-START -> shell usable (harness share of it)

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Guest:
        if self._st is None:
            try:
                self.boot()
            except BaseException:  # __exit__ will not run: clean up (and keep artifacts) here
                self.finish(test_failed=True, artifact_dir=artifacts.test_dir(self.name))
                raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(test_failed=et is not None, artifact_dir=artifacts.test_dir(self.name))

    def boot(self) -> Guest:
        """Start QEMU and wait for a usable shell; GuestBootError (with the console tail) otherwise."""
        if self._st is not None:
            raise GuestError("guest already booted")
        if self.image is None or not image_files_exist(self.image):
            self.image = guest_image(self.target, self.rootfs)
        rundir, cfg, disks = prepare_run(
            self.image, name=self.name, disks=self.disk_specs, memory_mib=self.memory_mib, smp=self.smp,
            accel=self.accel, append_extra=self.append_extra,
        )  # fmt: skip
        argv = build_command(cfg)
        (rundir.path / "qemu-cmdline.txt").write_text(format_command(argv) + "\n")
        t0 = time.monotonic()
        console = Console(argv, rundir.console_log, self.watcher, cwd=rundir.path)
        shell = Shell(console, rundir.xchg, XCHG_MOUNT, rundir.commands_log)
        self._st = _State(rundir, cfg, argv, disks, console, QMP(rundir.qmp_socket, self.name), shell)
        try:
            self._st.qmp.connect(timeout=30, alive=console.alive)
            self._wait_ready(0, self.boot_timeout)
        except GuestError as e:
            console.kill()  # also drains the pump: the tail then includes QEMU's own error messages
            msg = f"guest {self.name} ({self.target}) did not boot: {e.message}"
            raise GuestBootError(msg, console.tail()) from e
        self.boot_seconds = time.monotonic() - t0
        if self.module:
            self.load_module(**self.module_params)
        return self

    def _wait_ready(self, start: int, timeout: float) -> None:
        st = self._require()
        deadline = time.monotonic() + timeout
        m = st.console.expect(
            r"TESTINIT-(START|FAIL[^\n]*)", timeout, start=start, what="TESTINIT-START", error=GuestBootError
        )
        assert m is not None
        if m.group(1) != "START":
            st.console.wait_exit(5)
            raise GuestBootError(f"testinit failed: {m.group(0).strip()}", st.console.tail())
        st.boot_mark = start + m.start()
        t0 = time.monotonic()
        st.shell.init(st.boot_mark, max(5.0, deadline - time.monotonic()))
        self.init_seconds = time.monotonic() - t0

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """After power_cut(wait=False)/reboot(wait=False): wait for the new boot's testinit and shell."""
        st = self._require()
        if self._reset_pending is None:
            raise GuestError("wait_ready() without a pending power_cut()/reboot()")
        mark, t0 = self._reset_pending
        self._wait_ready(mark, timeout * self.time_scale)
        self.boot_seconds = time.monotonic() - t0
        self._reset_pending = None
        st.qmp.set_reboot_action("shutdown")  # a reboot or panic ends QEMU again

    def close(self, timeout: float = 30.0, scan_leaks: bool = True) -> None:
        """Clean shutdown (exit the shell: testinit powers off), killing QEMU if it does not exit.

        On a debug kernel a kmemleak scan runs first (scan_leaks); a leak becomes a finding."""
        if self._closed or self._st is None:
            self._closed = True
            return
        self._closed = True
        st = self._st
        if scan_leaks and st.console.alive() and st.shell.ready and is_debug_target(self.target):
            try:
                self._check_kmemleak()
            except GuestError as e:
                line = f"kmemleak scan failed: {e}"
                self.extra_findings.append(Finding("kmemleak", line, 0, line, ("kmemleak",)))
        if st.console.alive():
            exited = False
            if st.shell.ready:
                st.shell.send_raw("exit")
                exited = st.console.wait_exit(timeout)
            if not exited:
                st.qmp.quit()
                exited = st.console.wait_exit(5)
            if not exited:
                st.console.kill()
        st.qmp.close()
        st.console.close()

    def finish(self, test_failed: bool, artifact_dir: Path | None) -> Path | None:
        """Teardown used by the context manager and the pytest fixture.

        Captures state when the test failed, closes the guest, writes artifacts (test failed or kernel
        findings), removes the run dir, and raises KernelWarningError for unexpected findings when the
        test itself passed. Returns the artifact dir when one was written.
        """
        if test_failed:
            self.capture_failure_state()
        try:
            self.close(scan_leaks=not test_failed)
        finally:
            findings = self.unexpected_findings()
            saved = None
            if artifact_dir is not None and self._st is not None and (test_failed or findings):
                saved = self.save_artifacts(artifact_dir)
                print(f"\nguest artifacts: {saved}", file=sys.stderr)
            self.cleanup()
        if findings and not test_failed:
            raise KernelWarningError(findings, where=f"{self.name}; artifacts: {saved}")
        return saved

    def cleanup(self) -> None:
        """Delete the run dir (overlay, disks, exchange dir) unless keep=True."""
        if self._st is not None and not self.keep:
            self._st.rundir.remove()

    # -- commands ----------------------------------------------------------------------------------
    def run(self, cmd: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        """Run a bash command (any length, newlines allowed) in a subshell; output is exact."""
        st = self._require_shell()
        since = self.watcher.line_count
        died = lambda: bool(self.watcher.fatal(since))  # noqa: E731 - an oops ends the wait at once
        try:
            raw = st.shell.run(cmd, timeout * self.time_scale, crash_check=died)
        except GuestCrashError as e:
            if self.watcher.fatal(since) and not isinstance(e, KernelCrashError):
                # every report since the command began: a "BUG: ..." line says more than its "Oops"
                seen = [f for f in self.watcher.findings(since) if not f.expected or f.kind == "panic"]
                raise KernelCrashError(cmd, seen, e.console_tail) from None
            raise
        return CommandResult(
            stdout=raw.stdout.decode(errors="replace"),
            stderr=raw.stderr.decode(errors="replace"),
            rc=raw.rc,
            stdout_bytes=raw.stdout,
            stderr_bytes=raw.stderr,
            cmd=cmd,
            duration=raw.duration,
        )

    def check(self, cmd: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        r = self.run(cmd, timeout)
        if r.rc != 0:
            raise GuestCommandError(cmd, r.rc, r.stdout, r.stderr)
        return r

    def py(self, code: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run python3 (PYTHONPATH=/src) on `code`, which assigns `result`; returns it (JSON round trip).

        An exception in the snippet raises GuestPythonError with its type, errno and message.
        """
        st = self._require_shell()
        token = f"py{st.shell.counter + 1}"
        files = pyexec.write_job(st.rundir.xchg / ".py", token, code)
        guest_dir = f"{XCHG_MOUNT}/.py"
        r = self.run(f"PYTHONPATH=/src python3 {files.guest_args(guest_dir)}", timeout)
        return pyexec.read_result(files, r.rc, r.stdout, r.stderr)

    def install_pydbd_tools(self) -> None:
        """Put `dbdctl` and `update-img` on the guest's PATH, as `pip install pydbd` would: wrappers
        that run the checkout's pydbd (shared read-only at /src)."""
        for name, module in (("dbdctl", "pydbd.dbdctl"), ("update-img", "pydbd.updateimg")):
            script = f'#!/bin/sh\nPYTHONPATH=/src exec python3 -m {module} "$@"\n'
            self.check(f"printf %s {_q(script)} > /usr/local/bin/{name} && chmod +x /usr/local/bin/{name}")

    def put_file(self, name: str, data: bytes | str) -> str:
        """Write a file into the exchange dir; returns its guest path."""
        st = self._require()
        path = st.rundir.xchg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return f"{XCHG_MOUNT}/{name}"

    def dmesg(self) -> str:
        return self.run("dmesg", timeout=60).stdout

    # -- module ------------------------------------------------------------------------------------
    def load_module(self, **params: object) -> str:
        """insmod the target's build of kernel/ (default debug=1); returns the guest path of the .ko."""
        st = self._require_shell()
        from vmimages.chroot import module_name

        ko = module_path(self.target, self.module_src)
        name = module_name(ko)  # a prebuilt one may be called <target>.ko
        shutil.copyfile(ko, st.rundir.xchg / f"{name}.ko")
        params.setdefault("debug", 1)
        args = " ".join(f"{k}={_param(v)}" for k, v in params.items())
        self.check(f"insmod {XCHG_MOUNT}/{name}.ko {args}".rstrip(), timeout=60)
        self._module_name = name
        return f"{XCHG_MOUNT}/{name}.ko"

    def unload_module(self) -> None:
        self.check(f"rmmod {getattr(self, '_module_name', 'dattobd')}", timeout=60)

    # -- power -------------------------------------------------------------------------------------
    def power_cut(self, wait: bool = True, timeout: float = BOOT_TIMEOUT) -> None:
        """QMP system_reset: the guest loses what it had not written to its disks and boots into
        testinit again. With wait (default) this returns when the new shell is ready; otherwise call
        wait_ready(). The module is not reloaded."""
        st = self._require()
        self._reset(st.qmp.system_reset, wait, timeout)

    def reboot(self, wait: bool = True, timeout: float = BOOT_TIMEOUT) -> None:
        """Clean reboot: sync, unmount, remount / read-only, reboot(2); see power_cut() for `wait`."""
        st = self._require_shell()
        self._reset(lambda: st.shell.send_raw(_REBOOT_LINE), wait, timeout)

    def _reset(self, trigger: Callable[[], None], wait: bool, timeout: float) -> None:
        st = self._require()
        st.qmp.set_reboot_action("reset")  # until the new shell is up: see wait_ready()
        st.shell.ready = False
        self._reset_pending = (st.console.position, time.monotonic())
        trigger()
        if wait:
            self.wait_ready(timeout)

    # -- findings ----------------------------------------------------------------------------------
    def kernel_findings(self) -> list[Finding]:
        return self.watcher.findings()

    def unexpected_findings(self) -> list[Finding]:
        return self.watcher.unexpected() + self.extra_findings

    def kmemleak_scan(self, clear: bool = False) -> str:
        """Run a kmemleak scan now and return its report (empty: no unreferenced object).

        Objects younger than kmemleak's minimum age (5 s) are never reported, so this waits that
        long first. clear=True then forgets the reported objects (a test that leaks on purpose).
        Needs a kernel with CONFIG_DEBUG_KMEMLEAK (the debug targets)."""
        r = self.check(KMEMLEAK_SCAN + (" && echo clear > $d/kmemleak" if clear else ""), timeout=300)
        return r.stdout

    def _check_kmemleak(self) -> None:
        """At close on a debug kernel: any unreferenced object becomes a `kmemleak` finding."""
        report = self.kmemleak_scan()
        if not report.strip():
            return
        st = self._require()
        (st.rundir.path / "kmemleak.txt").write_text(report)
        self.register_artifact(st.rundir.path / "kmemleak.txt")
        objects = report.count("unreferenced object")
        lines = report.splitlines()
        self.extra_findings.append(
            Finding(
                kind="kmemleak",
                line=f"kmemleak: {objects} unreferenced object(s) at the end of the test",
                line_no=0,
                excerpt="\n".join(lines[:80])
                + ("\n[...] (all of it in kmemleak.txt)" if len(lines) > 80 else ""),
                kinds=("kmemleak",),
            )
        )

    def assert_no_kernel_findings(self) -> None:
        found = self.unexpected_findings()
        if found:
            raise KernelWarningError(found, where=self.name)

    @contextlib.contextmanager
    def expect_kernel_finding(self, *patterns: str, timeout: float = 15.0) -> Iterator[Expectation]:
        """Findings matching any regex in `patterns` during the block are expected (do not fail the test);
        at least one must show up (within `timeout` s after the block) or AssertionError is raised."""
        exp = self.watcher.expect(*(patterns or (".",)))
        body_ok = False
        try:
            yield exp
            body_ok = True
        finally:
            if body_ok and self._st is not None:
                deadline = time.monotonic() + timeout
                while exp.hits == 0 and time.monotonic() < deadline and not self._st.console.eof:
                    self._st.console.wait_output(0.2)
            self.watcher.end_expectation(exp)
        if exp.hits == 0:
            raise AssertionError(f"no kernel finding matching {patterns} appeared on the console")

    # -- artifacts ---------------------------------------------------------------------------------
    def register_artifact(self, host_path: Path | str) -> None:
        """Keep this host file (if small) in the artifacts when the test fails."""
        self._require().host_files.append(Path(host_path))

    def register_guest_artifact(self, guest_path: str) -> None:
        """Fetch this guest file (if small) into the artifacts when the test fails."""
        self._require().guest_files.append(guest_path)

    def capture_failure_state(self) -> None:
        """While the guest still runs: dmesg and registered guest files into the run dir."""
        st = self._st
        if st is None or not st.shell.ready or not st.console.alive():
            return
        try:
            st.dmesg = self.run("dmesg", timeout=30).stdout
            limit = artifacts.max_artifact_bytes()
            for i, gp in enumerate(st.guest_files):
                out = f"{XCHG_MOUNT}/.artifacts/{i}"
                self.run(
                    f"f={_q(gp)}; mkdir -p {out}; "
                    f'[ "$(stat -c %s "$f")" -le {limit} ] && cp --sparse=always "$f" {out}/',
                    timeout=60,
                )
        except GuestError:
            pass

    def save_artifacts(self, dest: Path) -> Path:
        st = self._require()
        dest.mkdir(parents=True, exist_ok=True)
        index = [f"guest {self.name} target {self.target} rootfs {self.rootfs}"]
        for src in (st.rundir.console_log, st.rundir.commands_log, st.rundir.path / "qemu-cmdline.txt"):
            if src.exists():
                shutil.copyfile(src, dest / src.name)
        if st.dmesg is not None:
            (dest / "dmesg.txt").write_text(st.dmesg)
        found = self.kernel_findings()
        if found:
            (dest / "findings.txt").write_text(
                "\n\n".join(
                    f"=== {f.kind}{' (expected)' if f.expected else ''}: {f.line}\n{f.excerpt}" for f in found
                )
            )
        for p in st.host_files:
            index.append(artifacts.copy_small(p, dest / "files"))
        fetched = st.rundir.xchg / ".artifacts"
        for i, gp in enumerate(st.guest_files):
            got = list((fetched / str(i)).glob("*")) if (fetched / str(i)).is_dir() else []
            index.extend(artifacts.copy_small(g, dest / "guest-files") for g in got)
            if not got:
                index.append(f"missing  guest:{gp} (not fetched: too large, absent, or guest down)")
        (dest / "index.txt").write_text("\n".join(index) + "\n")
        return dest

    # -- accessors ---------------------------------------------------------------------------------
    @property
    def disks(self) -> list[GuestDisk]:
        return list(self._require().disks)

    @property
    def run_dir(self) -> Path:
        return self._require().rundir.path

    @property
    def console_log(self) -> Path:
        return self._require().rundir.console_log

    @property
    def xchg(self) -> Path:
        """Host side of the guest's /xchg."""
        return self._require().rundir.xchg

    @property
    def qmp(self) -> QMP:
        return self._require().qmp

    @property
    def console(self) -> Console:
        return self._require().console

    @property
    def command_line(self) -> list[str]:
        return list(self._require().argv)

    @property
    def qemu_exit_status(self) -> int | None:
        return self._require().console.exit_status

    @property
    def alive(self) -> bool:
        return self._st is not None and self._st.console.alive()

    def _require(self) -> _State:
        if self._st is None:
            raise GuestError("guest not booted")
        return self._st

    def _require_shell(self) -> _State:
        st = self._require()
        if not st.console.alive():
            st.console.reap()
            msg = f"guest {self.name} is not running (QEMU exit status {st.console.exit_status})"
            raise GuestCrashError(msg, st.console.tail())
        if not st.shell.ready:
            raise GuestError(f"guest {self.name}: shell not ready (after a failed command or reset?)")
        return st


def _param(v: object) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
