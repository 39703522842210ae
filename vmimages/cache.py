"""Cache location, content keys, per-artifact locks and atomic directory builds."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# Older keys of an artifact are deleted when a new key is built, once unused for this long: a
# process that still holds the old paths (another checkout, a long test session) keeps working.
PRUNE_AFTER = 6 * 3600.0

# Files produced by an in-tree kernel build; they never count as module source.
BUILD_OUTPUT_SUFFIXES = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".a", ".order", ".symvers", ".tmp", ".d")
BUILD_OUTPUT_DIRS = (".tmp_versions", "__pycache__", ".git")


def cache_dir() -> Path:
    """The harness cache: ``$DBD_CACHE_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/dattobd-harness``."""
    env = os.environ.get("DBD_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dattobd-harness"


def key_of(*parts: object) -> str:
    """Stable 16-hex-digit key over JSON-able parts (bytes are hashed first)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            h.update(b"b:" + hashlib.sha256(part).digest())
        else:
            h.update(b"j:" + json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_build_output(name: str) -> bool:
    return name.endswith(BUILD_OUTPUT_SUFFIXES) or name in ("Module.symvers", "modules.order")


def _git_files(root: Path) -> list[Path] | None:
    """Files under root that git tracks or would track (.gitignore respected); None if not in git."""
    try:
        p = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
                ".",
            ],
            capture_output=True,
            check=False,
        )
    except OSError:
        return None
    if p.returncode != 0:
        return None
    names = sorted({n for n in p.stdout.decode(errors="surrogateescape").split("\0") if n})
    files = [root / n for n in names]
    return [f for f in files if f.is_symlink() or f.is_file()]


def source_files(root: Path) -> list[Path]:
    """Source files under root, sorted: git's view if root is in a work tree (so .gitignore'd
    build products and generated files are left out), else everything but known build outputs."""
    git = _git_files(root)
    if git is not None:
        return [f for f in git if not _is_build_output(f.name)]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in BUILD_OUTPUT_DIRS)
        for name in sorted(filenames):
            if not _is_build_output(name):
                out.append(Path(dirpath) / name)
    return out


def tree_key(root: Path) -> str:
    """Key of a source tree: relative paths, exec bits, symlink targets and contents."""
    h = hashlib.sha256()
    for p in source_files(root):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} {os.readlink(p)}\0".encode())
            continue
        mode = "x" if os.access(p, os.X_OK) else "-"
        h.update(f"F {rel} {mode} {file_digest(p)}\0".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive fcntl.flock on lock_path (created if needed) for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path (deepest first), from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == real or mp.startswith(real.rstrip("/") + "/"):
            found.append(Path(mp))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def require_root(what: str) -> None:
    """Building some artifacts (mmdebstrap trees, chroots, ownership-preserving images) needs root."""
    if os.geteuid() != 0:
        raise PermissionError(
            f"vmimages: building {what} needs root (mmdebstrap/chroot/mkfs -d); "
            f"run `sudo python -m vmimages build` once, or as root"
        )


def remove_tree(path: Path) -> None:
    """Remove a file or tree, including read-only parts; missing is fine.

    Anything still mounted below path (e.g. /proc or /dev of a chroot whose builder was killed)
    is unmounted first, so the removal never reaches into the host's filesystems.
    """
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    for mp in mounts_under(path):
        subprocess.run(["umount", "-l", str(mp)], check=False, capture_output=True)
    if mounts_under(path):
        raise OSError(f"refusing to remove {path}: still has mounts below it")

    def onerror(func: Callable[..., object], p: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o755)
        func(p)

    shutil.rmtree(path, onerror=onerror)


class Artifact:
    """One cached artifact: a directory ``<cache>/<kind>/<name>-<key>`` built atomically.

    ``ensure(build)`` returns the final directory, calling ``build(tmpdir)`` only if it is
    missing. The build happens in a temp dir next to the final one and is renamed into place
    under an exclusive lock, so concurrent processes build it once and never see a partial one.
    Older keys of the same artifact that have not been used for PRUNE_AFTER seconds are removed
    after a successful build (``prune``); ``python -m vmimages clean --stale`` removes them all.
    """

    def __init__(self, kind: str, name: str, key: str, root: Path | None = None) -> None:
        self.kind = kind
        self.name = name
        self.key = key
        self.base = (root or cache_dir()) / kind
        self.path = self.base / f"{name}-{key}"
        self.lock_path = self.base / ".locks" / f"{name}.lock"

    def exists(self) -> bool:
        return self.path.is_dir()

    def touch(self) -> None:
        """Record a use (the directory's mtime), so pruning spares artifacts that are in use."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def ensure(self, build: Callable[[Path], None], prune: bool = True) -> Path:
        if self.exists():
            self.touch()
            return self.path
        with locked(self.lock_path):
            if self.exists():
                return self.path
            self.base.mkdir(parents=True, exist_ok=True)
            for leftover in self.base.glob(f".tmp-{self.name}-*"):  # from a killed build
                remove_tree(leftover)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-", dir=self.base))
            try:
                build(tmp)
                os.chmod(tmp, 0o755)
                os.rename(tmp, self.path)
            except BaseException:
                remove_tree(tmp)
                raise
            if prune:
                for old in self.stale(PRUNE_AFTER):
                    remove_tree(old)
        return self.path

    def stale(self, unused_for: float = 0.0) -> Iterable[Path]:
        """Other keys of this artifact (same name, different key) not used for unused_for seconds."""
        prefix = f"{self.name}-"
        now = time.time()
        for p in self.base.iterdir():
            rest = p.name[len(prefix) :]
            if p.name.startswith(prefix) and p != self.path and len(rest) == 16 and "-" not in rest:
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime >= unused_for:
                        yield p


def dir_size(path: Path) -> int:
    """Bytes allocated on disk under path (like du), hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    if not path.exists():
        return 0
    for dirpath, _dirs, files in os.walk(path):
        for name in [*files, "."]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            total += st.st_blocks * 512
    return total
