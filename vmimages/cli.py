"""Command line: python -m vmimages {build,list,clean,pin}."""

from __future__ import annotations

import argparse
import contextlib
import heapq
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import matrix
from .cache import cache_dir, dir_size, remove_tree
from .chroot import chroot_key, ensure_chroot, ensure_module
from .image import ensure_image, image_key
from .initramfs import ensure_initramfs, initramfs_key
from .kernel import KernelFiles, ensure_kernel, kernel_key
from .progress import Progress
from .rootfs import ensure_rootfs, rootfs_key

# At most this many heavy steps (mmdebstrap, deb extraction, mkfs) at once.
HEAVY_JOBS = 3
# Lower runs first when several steps wait for a slot: guest images before build chroots.
PRIO_KERNEL, PRIO_ROOTFS, PRIO_IMAGE, PRIO_CHROOT, PRIO_MODULE = 0, 0, 1, 2, 3


class PrioritySlots:
    """A counting semaphore that hands free slots to the waiter with the lowest priority value."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []
        self._seq = 0

    @contextlib.contextmanager
    def slot(self, prio: int) -> Iterator[None]:
        with self._cond:
            me = (prio, self._seq)
            self._seq += 1
            heapq.heappush(self._waiting, me)
            self._cond.wait_for(lambda: self._free > 0 and self._waiting[0] == me)
            heapq.heappop(self._waiting)
            self._free -= 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


def _names(value: str, known: list[str], what: str) -> list[str]:
    if value == "all":
        return known
    for v in value.split(","):
        if v not in known:
            raise SystemExit(f"unknown {what} {v!r}; known: {', '.join(known)}, all")
    return value.split(",")


def build(
    target_names: list[str],
    rootfs_names: list[str],
    chroots: bool,
    module_src: Path | None,
    progress: Progress,
) -> None:
    """Everything for the given targets x rootfs, with independent steps in parallel threads."""
    targets = [matrix.get_target(n) for n in target_names]
    rootfses = [matrix.get_rootfs(n) for n in rootfs_names]
    heavy = PrioritySlots(HEAVY_JOBS)
    n_tasks = len(targets) * (3 + len(rootfses)) + len(rootfses) + len(targets)
    with ThreadPoolExecutor(max_workers=max(n_tasks, 1)) as pool:

        def submit(
            prio: int | None, fn: Callable[..., Any], *args: Any, deps: tuple[Future[Any], ...] = ()
        ) -> Future[Any]:
            """Run fn(*args) once deps are done (Future args become their results) in a heavy slot
            of priority prio, or right away if prio is None."""

            def run() -> Any:
                for d in deps:
                    d.result()
                real = [a.result() if isinstance(a, Future) else a for a in args]
                if prio is None:
                    return fn(*real)
                with heavy.slot(prio):
                    return fn(*real)

            return pool.submit(run)

        roots = {r.name: submit(PRIO_ROOTFS, ensure_rootfs, r, progress) for r in rootfses}
        kernels = {t.name: submit(PRIO_KERNEL, ensure_kernel, t, progress) for t in targets}
        jobs: list[Future[Any]] = [*roots.values(), *kernels.values()]
        for t in targets:
            kf = kernels[t.name]
            jobs.append(submit(None, ensure_initramfs, t, kf, kernel_key(t), progress, deps=(kf,)))
            for r in rootfses:
                rf = roots[r.name]
                jobs.append(
                    submit(
                        PRIO_IMAGE,
                        ensure_image,
                        r.name,
                        rf,
                        rootfs_key(r),
                        t,
                        kf,
                        kernel_key(t),
                        progress,
                        deps=(rf, kf),
                    )
                )
        if chroots:
            for suite in dict.fromkeys(t.suite for t in targets):
                chroot = submit(PRIO_CHROOT, ensure_chroot, suite, progress)
                jobs.append(chroot)
                for t in (t for t in targets if t.suite == suite and module_src is not None):
                    jobs.append(
                        submit(
                            PRIO_MODULE, ensure_module, t.name, module_src, progress.enabled, deps=(chroot,)
                        )
                    )
        errors: list[Exception] = []
        for j in jobs:
            try:
                j.result()
            except Exception as exc:  # report all failures, not just the first
                errors.append(exc)
        for other in errors[1:]:
            print(f"vmimages: also failed: {other}", file=sys.stderr)
        if errors:
            raise errors[0]


def current_keys() -> dict[str, set[str]]:
    """Artifact directory names that the current matrix and sources would use."""
    cur: dict[str, set[str]] = {k: set() for k in ("kernel", "initrd", "rootfs", "image", "chroot")}
    m = matrix.load()
    for t in m.targets.values():
        cur["kernel"].add(f"{t.name}-{kernel_key(t)}")
        kfiles = KernelFiles(Path(), t.kernel_release)  # the key needs only the release
        cur["initrd"].add(f"{t.name}-{initramfs_key(kfiles, kernel_key(t))}")
        cur["chroot"].add(f"{t.suite}-{chroot_key(t.suite)}")
        for r in m.rootfs.values():
            cur["image"].add(f"{r.name}-{t.name}-{image_key(rootfs_key(r), kernel_key(t))}")
    for r in m.rootfs.values():
        cur["rootfs"].add(f"{r.name}-{rootfs_key(r)}")
    return cur


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def cmd_list() -> None:
    m = matrix.load()
    print("targets:")
    for t in m.targets.values():
        mark = " (default)" if t.name == m.default_target else ""
        print(f"  {t.name:<14} {t.suite:<9} {t.kernel_release}{mark}")
    print(f"rootfs: {', '.join(m.rootfs)}")
    root = cache_dir()
    print(f"cache: {root}")
    cur = current_keys()
    total = 0
    for kind in ("kernel", "initrd", "rootfs", "image", "chroot", "module", "apt"):
        base = root / kind
        if not base.is_dir():
            continue
        for p in sorted(base.iterdir()):
            if p.name.startswith("."):
                continue
            size = dir_size(p)
            total += size
            known = kind in ("module", "apt") or p.name in cur.get(kind, set())
            state = "" if known else "  (stale)"
            print(f"  {kind:<7} {p.name:<48} {human(size):>8}{state}")
    print(f"  total {human(total)}")


def cmd_clean(target: str | None, stale: bool) -> None:
    root = cache_dir()
    if stale:
        cur = current_keys()
        for kind, names in cur.items():
            base = root / kind
            if base.is_dir():
                for p in base.iterdir():
                    if not p.name.startswith(".") and p.name not in names:
                        print(f"removing {p}")
                        remove_tree(p)
        return
    if target is None:
        print(f"removing {root}")
        remove_tree(root)
        return
    t = re.escape(matrix.get_target(target).name)
    patterns = {
        "kernel": rf"{t}-[0-9a-f]{{16}}",
        "initrd": rf"{t}-[0-9a-f]{{16}}",
        "image": rf"[^-]+-{t}-[0-9a-f]{{16}}",
        "module": rf"{t}-[A-Za-z0-9_]+-[0-9a-f]{{16}}",
    }
    for kind, pat in patterns.items():
        base = root / kind
        for p in sorted(base.iterdir()) if base.is_dir() else []:
            if re.fullmatch(pat, p.name):
                print(f"removing {p}")
                remove_tree(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmimages", description=__doc__)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and cache guest images (and module build chroots)")
    b.add_argument("--target", default=matrix.DEFAULT_TARGET, help="target name, comma list, or 'all'")
    b.add_argument("--rootfs", default="bookworm", help="bookworm, trixie, comma list or 'all'")
    b.add_argument("--no-chroot", action="store_true", help="skip the module build chroots")
    b.add_argument("--module-src", type=Path, help="also build this kbuild dir (e.g. kernel/) per target")
    sub.add_parser("list", help="targets and cached artifacts with sizes")
    c = sub.add_parser("clean", help="remove cached artifacts (all of them by default)")
    c.add_argument("--target", help="only this target's kernel, initrd, images and modules")
    c.add_argument("--stale", action="store_true", help="only artifacts the current matrix no longer uses")
    p = sub.add_parser("pin", help="refresh the package pins in matrix.toml from the archive")
    p.add_argument("--target", action="append", help="only these targets (repeatable)")
    p.add_argument("--latest", action="store_true", help="also move to the newest ABI of each kernel series")
    p.add_argument("--dry-run", action="store_true", help="show what would change, leave matrix.toml alone")
    args = ap.parse_args(argv)

    if args.cmd == "build":
        m = matrix.load()
        targets = _names(args.target, list(m.targets), "target")
        rootfs = _names(args.rootfs, list(m.rootfs), "rootfs")
        t0 = time.monotonic()
        build(targets, rootfs, not args.no_chroot, args.module_src, Progress(not args.quiet))
        if not args.quiet:
            print(f"[vmimages] build done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    elif args.cmd == "list":
        cmd_list()
    elif args.cmd == "clean":
        cmd_clean(args.target, args.stale)
    elif args.cmd == "pin":
        from .pin import pin

        changes = pin(args.target, args.latest, write=not args.dry_run)
        verb = "would change" if args.dry_run else "changed"
        print("\n".join(f"{verb} {c}" for c in changes) if changes else "pins are up to date")
    return 0
