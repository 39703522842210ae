"""Seeded file-level churn in a directory, with a manifest of the state made durable.

:func:`churn` runs ``ops`` random operations (create, partial/full overwrite, append, truncate, delete,
fallocate, punch hole, rename, fsync, sync) bounded by a byte budget, keeping an in-memory model of
every file. It then fsyncs every file and directory and calls sync(); the manifest
``{relative path: sha256 hex, or None for a name that existed and is now gone}`` describes that state,
and is checked against what is on disk before it is returned. ``unsynced_ops`` more operations may
follow without any sync: their paths are listed in ``volatile`` (a crash may or may not keep them).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

Manifest = dict[str, str | None]

# The interpreter's own symbols include libc's; no find_library (it runs ldconfig or a compiler).
_fallocate = ctypes.CDLL(None, use_errno=True).fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The fallocate(2) system call through libc; raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


class ChurnError(Exception):
    """The files on disk do not match what churn wrote (after a full sync): a filesystem problem."""


@dataclass
class ChurnResult:
    manifest: Manifest
    log: list[dict[str, Any]]
    volatile: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": dict(sorted(self.manifest.items())),
            "volatile": sorted(self.volatile),
            "bytes_written": self.bytes_written,
            "log": self.log,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle)


def load_manifest(path: str | os.PathLike[str]) -> tuple[Manifest, list[str]]:
    """(manifest, volatile paths) from a file written by :meth:`ChurnResult.save` or a bare manifest."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "manifest" in data and isinstance(data["manifest"], dict):
        return dict(data["manifest"]), list(data.get("volatile", []))
    return dict(data), []


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


_OPS: tuple[tuple[str, int], ...] = (
    ("create", 4),
    ("overwrite", 4),
    ("rewrite", 1),
    ("append", 3),
    ("truncate", 2),
    ("delete", 2),
    ("fallocate", 1),
    ("punch", 2),
    ("rename", 2),
    ("fsync", 2),
    ("sync", 1),
)
_WRITING = frozenset({"create", "overwrite", "rewrite", "append"})


class _Churner:
    def __init__(self, root: str, rng: random.Random, max_bytes: int, max_file_size: int, dirs: int) -> None:
        self.root = root
        self.rng = rng
        self.budget = max_bytes
        self.max_file_size = max_file_size
        self.dirs = [f"d{i}" for i in range(dirs)]
        self.files: dict[str, bytearray] = {}
        self.ever: set[str] = set()
        self.log: list[dict[str, Any]] = []
        self.touched: set[str] = set()
        self.counter = 0
        self.bytes_written = 0
        self.handlers: dict[str, Callable[[], dict[str, Any] | None]] = {
            "create": self.create,
            "overwrite": self.overwrite,
            "rewrite": self.rewrite,
            "append": self.append,
            "truncate": self.truncate,
            "delete": self.delete,
            "fallocate": self.fallocate,
            "punch": self.punch,
            "rename": self.rename,
            "fsync": self.fsync,
            "sync": self.sync,
        }

    # -- helpers -----------------------------------------------------------------------------------

    def full(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def new_name(self) -> str:
        self.counter += 1
        return f"{self.rng.choice(self.dirs)}/f{self.counter}.bin"

    def pick(self) -> str:
        return self.rng.choice(sorted(self.files))

    def data(self, limit: int) -> bytes:
        size = self.rng.randint(0, max(0, min(limit, self.budget)))
        self.budget -= size
        self.bytes_written += size
        return self.rng.randbytes(size)

    def pwrite(self, rel: str, data: bytes, offset: int, flags: int = os.O_WRONLY) -> None:
        fd = os.open(self.full(rel), flags | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        finally:
            os.close(fd)
        content = self.files.setdefault(rel, bytearray())
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data

    # -- operations: each returns its log entry, or None when it does not apply --------------------

    def create(self) -> dict[str, Any] | None:
        rel = self.new_name()
        data = self.data(self.max_file_size)
        self.files[rel] = bytearray()
        self.pwrite(rel, data, 0, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.ever.add(rel)
        return {"op": "create", "path": rel, "size": len(data)}

    def overwrite(self) -> dict[str, Any] | None:
        rel = self.pick()
        size = len(self.files[rel])
        offset = self.rng.randint(0, size)
        data = self.data(min(self.max_file_size - offset, 256 * 1024))
        self.pwrite(rel, data, offset)
        return {"op": "overwrite", "path": rel, "offset": offset, "length": len(data)}

    def rewrite(self) -> dict[str, Any] | None:
        rel = self.pick()
        data = self.data(self.max_file_size)
        self.files[rel] = bytearray()
        self.pwrite(rel, data, 0, os.O_WRONLY | os.O_TRUNC)
        return {"op": "rewrite", "path": rel, "size": len(data)}

    def append(self) -> dict[str, Any] | None:
        rel = self.pick()
        size = len(self.files[rel])
        data = self.data(min(self.max_file_size - size, 128 * 1024))
        self.pwrite(rel, data, size)
        return {"op": "append", "path": rel, "offset": size, "length": len(data)}

    def truncate(self) -> dict[str, Any] | None:
        rel = self.pick()
        new = self.rng.randint(0, self.max_file_size)
        os.truncate(self.full(rel), new)
        content = self.files[rel]
        if new < len(content):
            del content[new:]
        else:
            content.extend(bytes(new - len(content)))
        return {"op": "truncate", "path": rel, "size": new}

    def delete(self) -> dict[str, Any] | None:
        rel = self.pick()
        os.unlink(self.full(rel))
        del self.files[rel]
        return {"op": "delete", "path": rel}

    def _falloc(self, rel: str, mode: int, offset: int, length: int) -> bool:
        fd = os.open(self.full(rel), os.O_WRONLY | os.O_CLOEXEC)
        try:
            fallocate(fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        finally:
            os.close(fd)
        return True

    def fallocate(self) -> dict[str, Any] | None:
        rel = self.pick()
        offset = self.rng.randint(0, self.max_file_size)
        length = self.rng.randint(1, 256 * 1024)
        if not self._falloc(rel, 0, offset, length):
            return {"op": "fallocate", "path": rel, "unsupported": True}
        content = self.files[rel]
        if len(content) < offset + length:
            content.extend(bytes(offset + length - len(content)))
        return {"op": "fallocate", "path": rel, "offset": offset, "length": length}

    def punch(self) -> dict[str, Any] | None:
        rel = self.pick()
        content = self.files[rel]
        if not content:
            return None
        offset = self.rng.randrange(0, len(content))
        length = self.rng.randint(1, len(content) - offset + 4096)
        if not self._falloc(rel, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return {"op": "punch", "path": rel, "unsupported": True}
        end = min(len(content), offset + length)
        content[offset:end] = bytes(end - offset)
        return {"op": "punch", "path": rel, "offset": offset, "length": length}

    def rename(self) -> dict[str, Any] | None:
        src = self.pick()
        existing = sorted(set(self.files) - {src})
        dst = self.rng.choice(existing) if existing and self.rng.random() < 0.3 else self.new_name()
        os.rename(self.full(src), self.full(dst))
        self.files[dst] = self.files.pop(src)
        self.ever.add(dst)
        return {"op": "rename", "path": src, "to": dst}

    def fsync(self) -> dict[str, Any] | None:
        rel = self.pick()
        fd = os.open(self.full(rel), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"op": "fsync", "path": rel}

    def sync(self) -> dict[str, Any] | None:
        os.sync()
        return {"op": "sync"}

    # -- driver ------------------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        while True:
            names = [name for name, _ in _OPS]
            weights = [w for _, w in _OPS]
            op = self.rng.choices(names, weights)[0]
            if not self.files and op != "create":
                op = "create"
            if op in _WRITING and self.budget <= 0 and self.files:
                continue
            entry = self.handlers[op]()
            if entry is not None:
                self.log.append(entry)
                for key in ("path", "to"):
                    if key in entry:
                        self.touched.add(entry[key])
                return entry

    def sync_all(self) -> None:
        for rel in sorted(self.files):
            fd = os.open(self.full(rel), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for rel in [*self.dirs, ""]:
            fd = os.open(self.full(rel) if rel else self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.sync()

    def adopt_existing(self) -> None:
        """Take the files an earlier churn left (``d<N>/f<M>.bin``) into the model, so this run
        overwrites, truncates and deletes them too; new names continue after the highest M."""
        for sub in self.dirs:
            for name in sorted(os.listdir(self.full(sub))):
                stem = name.removesuffix(".bin")
                if not (name.endswith(".bin") and stem[:1] == "f" and stem[1:].isdigit()):
                    continue
                rel = f"{sub}/{name}"
                with open(self.full(rel), "rb") as handle:
                    self.files[rel] = bytearray(handle.read())
                self.ever.add(rel)
                self.counter = max(self.counter, int(stem[1:]))

    def manifest(self) -> Manifest:
        result: Manifest = dict.fromkeys(self.ever)
        for rel, content in self.files.items():
            result[rel] = hashlib.sha256(content).hexdigest()
        return result


def churn(
    directory: str | os.PathLike[str],
    seed: int,
    ops: int,
    *,
    max_bytes: int = 64 * 1024 * 1024,
    max_file_size: int = 1024 * 1024,
    dirs: int = 4,
    unsynced_ops: int = 0,
) -> ChurnResult:
    """Churn ``directory`` (created if missing). Files an earlier churn left there are part of the
    model from the start (see _Churner.adopt_existing)."""
    root = os.fspath(directory)
    churner = _Churner(root, random.Random(seed), max_bytes, max_file_size, dirs)
    for sub in churner.dirs:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    churner.adopt_existing()
    for _ in range(ops):
        churner.step()
    churner.sync_all()
    manifest = churner.manifest()
    problems = compare_tree(root, manifest)
    if problems:
        raise ChurnError(f"after sync the files differ from what was written: {problems[0]}")
    synced_log = len(churner.log)
    churner.touched.clear()
    for _ in range(unsynced_ops):
        churner.step()
    for entry in churner.log[synced_log:]:
        entry["unsynced"] = True
    return ChurnResult(manifest, churner.log, sorted(churner.touched), churner.bytes_written)


def compare_tree(
    root: str | os.PathLike[str],
    manifest: Mapping[str, str | None],
    *,
    skip: frozenset[str] = frozenset(),
    check_deleted: bool = True,
) -> list[str]:
    """Human-readable differences between the files below ``root`` and ``manifest``, in path order."""
    problems: list[str] = []
    for rel in sorted(manifest):
        if rel in skip:
            continue
        want = manifest[rel]
        full = os.path.join(os.fspath(root), rel)
        present = os.path.isfile(full)
        if want is None:
            if check_deleted and os.path.lexists(full):
                problems.append(f"{rel}: should be absent (deleted before the sync point) but exists")
            continue
        if not present:
            problems.append(f"{rel}: missing (expected sha256 {want[:16]}...)")
            continue
        got = sha256_file(full)
        if got != want:
            problems.append(f"{rel}: content differs (sha256 {got[:16]}..., expected {want[:16]}...)")
    return problems
