"""Module build chroots (one per suite, with the pinned kernel headers) and out-of-tree module builds."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from .apt import host_env, run
from .cache import Artifact, key_of, require_root, source_files, tree_key
from .matrix import Target, get_target, load
from .progress import Progress
from .rootfs import PATH_EXCLUDES, mmdebstrap_cmd

CHROOT_FORMAT = 1
# Headers on trixie/sid depend on linux-image: keep its package metadata but not its 100+ MB of
# modules, the vmlinuz, or the kernel postinst hooks (no initramfs gets built in the chroot).
CHROOT_EXCLUDES = (
    *PATH_EXCLUDES,
    "/usr/lib/modules/*/kernel/*",
    "/lib/modules/*/kernel/*",
    "/boot/vmlinuz-*",
    "/etc/kernel/postinst.d/*",
)


class ModuleBuildError(RuntimeError):
    """A module build failed; the message holds the compiler output."""


def suite_targets(suite: str) -> list[Target]:
    return [t for t in load().targets.values() if t.suite == suite]


def chroot_packages(suite: str) -> tuple[str, ...]:
    pkgs: list[str] = []
    for t in suite_targets(suite):
        for p in (*t.build_packages, *t.headers_packages, *t.tool_packages):
            if p not in pkgs:
                pkgs.append(p)
    return tuple(pkgs)


def chroot_key(suite: str) -> str:
    sources = load().suites[suite]
    return key_of("chroot", CHROOT_FORMAT, sources, chroot_packages(suite), CHROOT_EXCLUDES)


def ensure_chroot(suite: str, progress: Progress) -> Path:
    """The build chroot of suite (root dir), with every target's headers of that suite installed."""
    sources = load().suites[suite]
    art = Artifact("chroot", suite, chroot_key(suite))

    def build(tmp: Path) -> None:
        require_root(f"the {suite} build chroot")
        root = tmp / "root"
        with progress.step(f"chroot {suite}: mmdebstrap + headers"):
            cmd = mmdebstrap_cmd(sources, suite, chroot_packages(suite), root, CHROOT_EXCLUDES)
            run(cmd, env=host_env())
        for t in suite_targets(suite):
            if t.built_from_source:
                continue  # its build tree is a kernel artifact, mounted at /kbuild when used
            if not (root / t.headers_dir.lstrip("/") / "Makefile").is_file():
                raise ModuleBuildError(f"chroot {suite}: {t.headers_dir} missing after install")
        (root / "build").mkdir(exist_ok=True)

    return art.ensure(build) / "root"


# How a module tree is built in the chroot; {src}, {kdir}, {release} and {jobs} are filled in.
DEFAULT_BUILD = "make -C {src} -j{jobs} KDIR={kdir}"


def build_command(template: str | None, src: str, kdir: str, release: str, jobs: int) -> str:
    """The shell command for a build template, each value quoted; ValueError names a bad field."""
    fields = {
        "src": shlex.quote(src),
        "kdir": shlex.quote(kdir),
        "release": shlex.quote(release),
        "jobs": str(jobs),
    }
    try:
        return (template or DEFAULT_BUILD).format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--module-build {template!r}: {e!r} (fields: {{src}} {{kdir}} {{release}} {{jobs}})"
        ) from None


def build_in_chroot(
    root: Path,
    target: Target,
    src_dir: Path,
    build_id: str,
    module: str,
    kbuild: Path | None = None,
    command: str | None = None,
) -> tuple[bytes, str]:
    """Copy src_dir to /build/<build_id> in the chroot, build it, return (module bytes, build log).

    kbuild: a source-built kernel's artifact, bind-mounted at /kbuild (its headers_dir lives there).
    command: a build template (DEFAULT_BUILD); the module is <module>.ko anywhere in the tree.
    """
    bdir = root / "build" / build_id
    if bdir.exists():
        shutil.rmtree(bdir)
    for f in source_files(src_dir):
        dest = bdir / f.relative_to(src_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest, follow_symlinks=False)
    script = (
        'mount -t proc proc "$1/proc" && '
        'if [ -n "$5" ]; then mkdir -p "$1/kbuild" && mount --bind "$5" "$1/kbuild"; fi && '
        'exec chroot "$1" /usr/bin/env -i '
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin "
        'HOME=/root LC_ALL=C.UTF-8 sh -c "$6"'
    )
    make = build_command(
        command, f"/build/{build_id}", target.headers_dir, target.kernel_release, os.cpu_count() or 2
    )
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "sh",
        str(root),
        f"/build/{build_id}",
        str(os.cpu_count() or 2),
        target.headers_dir,
        str(kbuild or ""),
        make,
    ]
    try:
        p = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", check=False
        )
        ko = bdir / f"{module}.ko"
        if not ko.is_file():
            ko = next(iter(sorted(bdir.rglob(f"{module}.ko"))), ko)  # e.g. upstream's src/dattobd.ko
        # Point diagnostics at the caller's source tree rather than the chroot copy.
        log = p.stdout.replace(f"/build/{build_id}/", f"{src_dir}/")
        if p.returncode != 0 or not ko.is_file():
            why = f"make failed (rc={p.returncode})" if p.returncode else f"{module}.ko was not produced"
            raise ModuleBuildError(f"{target.name}: module build in {root} {why}:\n{log}")
        return ko.read_bytes(), log
    finally:
        shutil.rmtree(bdir, ignore_errors=True)


def vermagic(ko: Path) -> str:
    return run(["modinfo", "-F", "vermagic", str(ko)]).strip()


def module_name(ko: Path) -> str:
    """The name the kernel gives the module (what rmmod takes), whatever the file is called."""
    return run(["modinfo", "-F", "name", str(ko)]).strip() or ko.stem.replace("-", "_")


def ensure_module(
    target: str,
    src_dir: Path,
    progress: bool | None = None,
    module: str = "dattobd",
    command: str | None = None,
) -> Path:
    """Build src_dir for target in its suite's chroot (command: a build template, by default a kbuild
    dir taking KDIR=); cached <module>.ko."""
    t = get_target(target)
    prog = Progress(progress)
    src_dir = Path(src_dir).resolve()
    if command is None and not (src_dir / "Makefile").is_file() and not (src_dir / "Kbuild").is_file():
        raise ModuleBuildError(f"{src_dir}: no Makefile/Kbuild")
    src_key = tree_key(src_dir)
    root = ensure_chroot(t.suite, prog)
    build_id = key_of(src_key, t.name, module)
    kbuild: Path | None = None
    kernel_part: tuple[str, ...] = ()
    if t.built_from_source:
        from .kernel import ensure_kernel, kernel_key

        kbuild = ensure_kernel(t, prog).root
        kernel_part = (kernel_key(t),)
    build_part = (command,) if command is not None else ()
    key = key_of("module", src_key, chroot_key(t.suite), t.name, module, *kernel_part, *build_part)
    art = Artifact("module", f"{t.name}-{module}", key)

    def build(tmp: Path) -> None:
        require_root(f"{module}.ko (chroot build)")
        with prog.step(f"{t.name}: build {module}.ko"):
            data, log = build_in_chroot(root, t, src_dir, build_id, module, kbuild, command)
            ko = tmp / f"{module}.ko"
            ko.write_bytes(data)
            (tmp / "build.log").write_text(log)
            magic = vermagic(ko)
            if magic.split()[0] != t.kernel_release:
                raise ModuleBuildError(
                    f"{t.name}: {module}.ko has vermagic {magic!r}, expected {t.kernel_release}"
                )

    return art.ensure(build, prune=False) / f"{module}.ko"
