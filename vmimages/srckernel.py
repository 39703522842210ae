"""Kernels built here from Debian's linux-source package: the debug target (KASAN, lockdep, kmemleak).

The build runs in the target suite's build chroot (its compiler is the one Debian builds that
suite's kernels with) with the artifact directory bind-mounted at /kbuild, so the build tree's
absolute paths are the same when dattobd.ko is later built against it:

    <artifact>/src        the unpacked linux-source tarball
    <artifact>/out        the O= build tree: .config, Module.symvers, scripts, generated headers
                          (object files removed: an external module build needs none of them)
    <artifact>/bzImage    what the guest boots. Not the PVH ELF of the binary targets: with KASAN,
                          the PVH entry calls the instrumented memcmp before the shadow memory
                          exists and triple-faults (6.12); the bzImage path sets KASAN up first
    <artifact>/config     the final .config
    <artifact>/modules    lib/modules/<release>, depmod'ed, like a binary target's kernel artifact
    <artifact>/build.log  make's output, and build-time.txt the seconds each step took

The config is allnoconfig + kvm_guest.config + the target's fragment of vmimages/kconfig/ (the
fragment names everything the guest needs, a 64-bit SMP kernel included);
every option of the fragment must survive `olddefconfig` as written, else the build fails and
names the options (a fragment that silently lost KASAN would make a debug target that is not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .apt import PrivateApt, extract_debs
from .cache import key_of
from .matrix import Target
from .progress import Progress

# Bump when the build steps or the artifact layout change.
SRCKERNEL_FORMAT = 3
KCONFIG_DIR = Path(__file__).with_name("kconfig")
MOUNT_POINT = "/kbuild"
# Kept in <artifact>/out after the build: everything but these (object files and their command
# records), which are a few GB with KASAN and unused by external module builds.
_PRUNE_SUFFIXES = (".o", ".a", ".cmd", ".ko", ".mod.c")


class SourceKernelError(RuntimeError):
    pass


def fragment_path(target: Target) -> Path:
    assert target.config_fragment is not None
    return KCONFIG_DIR / target.config_fragment


def source_key(target: Target) -> str:
    return key_of(
        "srckernel",
        SRCKERNEL_FORMAT,
        target.source_package,
        fragment_path(target).read_bytes(),
        target.build_packages,
        target.kernel_release,
    )


def parse_fragment(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('n' for '# CONFIG_X is not set') of a Kconfig fragment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            out[m.group(1)] = "n"
        elif m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m.group(1)] = m.group(2)
    return out


def config_mismatches(wanted: dict[str, str], final: dict[str, str]) -> list[str]:
    """Options of the fragment whose final value differs ('n' also matches an absent option)."""
    bad = []
    for opt, val in wanted.items():
        got = final.get(opt, "n")
        if got != val:
            bad.append(f"{opt}={val} (got {got})")
    return bad


def in_chroot(root: Path, artifact: Path, script: str, log: Path) -> None:
    """Run `sh -c script` as root in the chroot with artifact bind-mounted at /kbuild."""
    wrapper = (
        'mount -t proc proc "$1/proc" && mkdir -p "$1/kbuild" && mount --bind "$2" "$1/kbuild" && '
        'exec chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root '
        'LC_ALL=C.UTF-8 KBUILD_BUILD_TIMESTAMP=@0 KBUILD_BUILD_USER=dbd KBUILD_BUILD_HOST=dbd sh -ec "$3"'
    )
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", wrapper]
    cmd += ["sh", str(root), str(artifact), script]
    with log.open("a") as f:
        f.write(f"\n$ {script}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SourceKernelError(f"kernel build step failed (rc={rc}), see {log}:\n{tail}")


def _prune_objects(out: Path) -> None:
    for dirpath, _dirs, files in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        if rel.split(os.sep)[0] in ("scripts", "tools"):
            continue  # host tools' objects are tiny and some are relinked by modpost runs
        for name in files:
            if name.endswith(_PRUNE_SUFFIXES):
                os.unlink(os.path.join(dirpath, name))


def build_source_kernel(target: Target, chroot: Path, tmp: Path, progress: Progress) -> Path:
    """Build target's kernel into tmp (the artifact dir). Returns the installed lib/modules/<rel>."""
    assert target.source_package is not None
    log = tmp / "build.log"
    log.write_text("")
    times: list[str] = []
    jobs = os.cpu_count() or 2
    mk = f"make -C {MOUNT_POINT}/src O={MOUNT_POINT}/out -j{jobs}"

    def step(title: str, script: str) -> None:
        start = time.monotonic()
        with progress.step(f"{target.name}: {title}"):
            in_chroot(chroot, tmp, script, log)
        times.append(f"{title}\t{time.monotonic() - start:.0f}\n")

    with progress.step(f"{target.name}: download {target.source_package}"):
        work = tmp / ".work"
        debs = PrivateApt(target.sources).download([target.source_package], work / "debs")
        extract_debs(debs, work / "x")
        tarballs = sorted((work / "x" / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise SourceKernelError(f"{target.source_package}: expected one source tarball, got {tarballs}")
    (tmp / "src").mkdir()
    (tmp / "out").mkdir()
    shutil.copy2(fragment_path(target), tmp / "out" / "fragment.config")
    tarball = f"{MOUNT_POINT}/{tarballs[0].relative_to(tmp)}"
    step("unpack source", f"tar -xf {tarball} -C {MOUNT_POINT}/src --strip-components=1")
    shutil.rmtree(work)
    step(
        "configure",
        f"{mk} allnoconfig && {mk} kvm_guest.config && "
        f"cd {MOUNT_POINT}/out && {MOUNT_POINT}/src/scripts/kconfig/merge_config.sh -m -O . "
        f".config fragment.config && {mk} olddefconfig",
    )
    final = parse_fragment((tmp / "out" / ".config").read_text())
    bad = config_mismatches(parse_fragment(fragment_path(target).read_text()), final)
    if bad:
        raise SourceKernelError(
            f"{target.name}: options of {fragment_path(target)} did not survive olddefconfig "
            f"(a dependency is missing; add it to the fragment): {', '.join(bad)}"
        )
    step("make bzImage modules", f"{mk} bzImage modules")
    step(
        "modules_install",
        f"{mk} INSTALL_MOD_PATH={MOUNT_POINT}/modroot INSTALL_MOD_STRIP=1 DEPMOD=/bin/true modules_install",
    )
    release = (tmp / "out" / "include" / "config" / "kernel.release").read_text().strip()
    if release != target.kernel_release:
        raise SourceKernelError(
            f"{target.name}: the build's release is {release!r}, matrix.toml says "
            f"{target.kernel_release!r}; fix kernel_release there"
        )
    os.rename(tmp / "out" / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
    for big in ("vmlinux", "vmlinux.o", "vmlinux.a"):  # ~200 MB, unused by module builds
        (tmp / "out" / big).unlink(missing_ok=True)
    shutil.copy2(tmp / "out" / ".config", tmp / "config")
    _prune_objects(tmp / "out")
    (tmp / "build-time.txt").write_text("".join(times))
    return tmp / "modroot" / "lib" / "modules" / release
