"""Developer CLI.

    python -m harness shell [--target T] [--rootfs R] [--keep] [--no-module] [GUEST OPTIONS]
    python -m harness run [--target T] [--module] [GUEST OPTIONS] -- CMD...
    python -m harness pytest [--target T] FILE [PYTEST ARGS...]

Every command takes the module under test: --ko PATH, --module-src DIR, --module-build CMD (see
harness.module_under_test). GUEST OPTIONS: --append ARG (kernel command line, repeatable), --disk MIB
(a data disk, repeatable; default one of 512 MiB), --memory MIB.
    python -m harness walkthrough [--target T]
    python -m harness accel

`run` exits with the command's status; kernel findings on the console make it exit 3 when the
command itself succeeded. In `shell`, Ctrl-] detaches (QEMU is then shut down); `exit` powers off.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from harness import artifacts, module_under_test
from harness.errors import GuestError, KernelWarningError
from harness.guest import DEFAULT_DISKS, Guest
from harness.qemu import DiskSpec

FINDINGS_EXIT = 3


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="kernel target (default: vmimages.matrix.DEFAULT_TARGET)")
    p.add_argument("--rootfs", default="bookworm")
    module_under_test.add_arguments(p)


def _add_guest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--append", action="append", default=[], help="kernel command-line argument (repeatable)")
    p.add_argument("--disk", action="append", type=int, default=[], help="data disk of MIB MiB (repeatable)")
    p.add_argument("--memory", type=int, default=1024, help="guest memory in MiB (default 1024)")


def _guest(args: argparse.Namespace, module: bool, name: str, keep: bool = False) -> Guest:
    disks = [DiskSpec(mib) for mib in args.disk] if args.disk else list(DEFAULT_DISKS)
    return Guest(
        target=args.target,
        rootfs=args.rootfs,
        disks=disks,
        memory_mib=args.memory,
        module=module,
        name=name,
        keep=keep,
        append_extra=tuple(args.append),
    )


def cmd_shell(args: argparse.Namespace) -> int:
    g = _guest(args, module=False, name="shell", keep=args.keep)
    print(f"booting {g.target} ({args.rootfs}) ...", flush=True)
    g.boot()
    print(f"ready in {g.boot_seconds:.1f}s; run dir {g.run_dir}", flush=True)
    if not args.no_module:
        try:
            print(f"module loaded: {g.load_module()}", flush=True)
        except GuestError as e:
            print(f"module NOT loaded: {e.message.splitlines()[0]}", flush=True)
    g.console.send("stty echo; export PS1='dbd-guest# '\n")
    print("console attached: Ctrl-] detaches (and shuts the guest down), `exit` powers off", flush=True)
    g.console.interact()
    return _finish(g, keep_msg=args.keep)


def cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if not argv:
        print("run: no command given", file=sys.stderr)
        return 2
    cmd = argv[0] if len(argv) == 1 else shlex.join(argv)
    with_module = bool(args.module)
    g = _guest(args, module=with_module, name="run")
    try:
        g.boot()
        r = g.run(cmd, timeout=args.timeout)
    except BaseException:
        g.finish(test_failed=True, artifact_dir=artifacts.test_dir("cli-run"))
        raise
    sys.stdout.buffer.write(r.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr_bytes)
    print(f"[harness] rc={r.rc} ({r.duration:.2f}s)", file=sys.stderr)
    code = _finish(g)
    return r.rc if r.rc != 0 else code


def _finish(g: Guest, keep_msg: bool = False) -> int:
    try:
        g.finish(test_failed=False, artifact_dir=artifacts.test_dir(f"cli-{g.name}"))
    except KernelWarningError as e:
        print(str(e), file=sys.stderr)
        return FINDINGS_EXIT
    finally:
        if keep_msg:
            print(f"kept run dir (overlay root.qcow2, disks, console.log): {g.run_dir}")
    return 0


def cmd_pytest(args: argparse.Namespace, extra: Sequence[str]) -> int:
    argv = [sys.executable, "-m", "pytest", *args.files, *extra, "--rootfs", args.rootfs]
    argv += module_under_test.choose(args.ko, args.module_src, args.module_build).args()
    if args.target:
        argv += ["--kernel", args.target]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_walkthrough(args: argparse.Namespace) -> int:
    from harness.walkthrough import walkthrough

    return walkthrough(args.target)


def cmd_accel(args: argparse.Namespace) -> int:
    from harness.accel import select_accel
    from harness.images import default_target, guest_image

    image = guest_image(args.target or default_target(), args.rootfs)
    print(select_accel(image.vmlinux))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shell", help="boot a guest and attach its console")
    _add_target(p)
    p.add_argument("--keep", action="store_true", help="keep the overlay/run dir and print its path")
    p.add_argument("--no-module", action="store_true", help="do not load the module")
    _add_guest(p)
    p = sub.add_parser("run", help="run one command in a fresh guest")
    _add_target(p)
    p.add_argument("--module", action="store_true", help="load the module first")
    _add_guest(p)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("pytest", help="run test file(s) on one kernel")
    _add_target(p)
    p.add_argument("files", nargs="+")
    p = sub.add_parser("walkthrough", help="the backup walkthrough in a guest")
    _add_target(p)
    p = sub.add_parser("accel", help="print the accelerator guests will use (kvm/tcg)")
    _add_target(p)
    args, extra = parser.parse_known_args(argv)
    if args.command != "pytest" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        module_under_test.choose(args.ko, args.module_src, args.module_build).export()
    except ValueError as e:
        parser.error(str(e))
    try:
        if args.command == "shell":
            return cmd_shell(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "pytest":
            return cmd_pytest(args, extra)
        if args.command == "walkthrough":
            return cmd_walkthrough(args)
        return cmd_accel(args)
    except GuestError as e:
        print(f"[harness] {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
