"""Bad-input fuzzing of /dev/datto-ctl: every ioctl with random and boundary arguments.

:func:`fuzz` issues ``calls`` seeded ioctls whose arguments come from pools of boundary values:
minors (free, used, max, negative as u32, huge), sizes (0, 1, MiB-to-bytes overflows, 2**64-1),
string pointers (NULL, unmapped, kernel addresses, unterminated strings that run into a guard
page, over-long paths) and paths to every kind of file (block devices, directories, char devices,
fifos, sockets, symlink loops, missing parents, deleted files, other filesystems), plus the argument
struct pointer itself (NULL, unmapped) and unknown request numbers. Valid paths are in the pools
too, so some calls succeed and later calls meet tracers in several states.

Checked after every call:
- the errno is one the interface documents for this kind of failure (spec section 2);
- a failed call changed nothing: /proc/datto-info reads the same before and after;
- without CAP_SYS_ADMIN every call fails with EPERM.
The caller (a guest test) also fails on any kernel warning, and checks that the module unloads.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydbd import abi

CTL = "/dev/datto-ctl"
PROC = "/proc/datto-info"
U32, U64 = (1 << 32) - 1, (1 << 64) - 1

# errnos a failed call may give (spec 2 and 2.1: minor checks, path lookups passed through, COW
# file creation and sizing, copy faults). Anything else is a finding.
DOCUMENTED_ERRNOS = frozenset(
    {
        errno.EINVAL, errno.EFAULT, errno.EBUSY, errno.ENOENT, errno.ENOTBLK, errno.ENXIO, errno.ENODEV,
        errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
        errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.ENOMEM, errno.EEXIST, errno.ETXTBSY, errno.EXDEV,
        errno.EOVERFLOW,
    }
)  # fmt: skip

# (name, request, struct class or None for a bare integer argument)
REQUESTS: tuple[tuple[str, int, Any], ...] = (
    ("setup-snapshot", abi.IOCTL_SETUP_SNAP, abi.SetupParams),
    ("reload-snapshot", abi.IOCTL_RELOAD_SNAP, abi.ReloadParams),
    ("reload-incremental", abi.IOCTL_RELOAD_INC, abi.ReloadParams),
    ("destroy", abi.IOCTL_DESTROY, abi.MinorArg),
    ("transition-to-incremental", abi.IOCTL_TRANSITION_INC, abi.MinorArg),
    ("transition-to-snapshot", abi.IOCTL_TRANSITION_SNAP, abi.TransitionSnapParams),
    ("reconfigure", abi.IOCTL_RECONFIGURE, abi.ReconfigureParams),
    ("info", abi.IOCTL_DATTOBD_INFO, abi.DattobdInfo),
    ("get-free-minor", abi.IOCTL_GET_FREE, abi.FreeMinorArg),
    ("expand-cow-file", abi.IOCTL_EXPAND_COW_FILE, abi.ExpandCowFileParams),
    ("reconfigure-auto-expand", abi.IOCTL_RECONFIGURE_AUTO_EXPAND, abi.ReconfigureAutoExpandParams),
)
# Request numbers the driver does not know: other numbers, wrong directions, wrong sizes.
UNKNOWN_REQUESTS = (
    abi.ioc(abi.IOC_WRITE, 0, 8),
    abi.ioc(abi.IOC_WRITE, 12, 8),
    abi.ioc(abi.IOC_READ | abi.IOC_WRITE, 1, ctypes.sizeof(abi.SetupParams)),
    abi.ioc(abi.IOC_WRITE, 1, ctypes.sizeof(abi.SetupParams) + 8),
    abi.ioc(abi.IOC_NONE, 8, 0),
    0x5401,  # TCGETS
)
PROT_NONE = 0  # not exported by the mmap module
UNMAPPED = (1, 0x1000, 0xDEAD0000, 0x7FFF_FFFF_F000, 0xFFFF_8880_0000_0000, U64)


@dataclass
class Call:
    """One ioctl as issued: what, with which arguments (described), and the errno (0 = success)."""

    op: str
    args: dict[str, Any]
    result: int = 0


@dataclass
class FuzzReport:
    calls: list[Call] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    created: set[int] = field(default_factory=set)  # minors a successful setup/reload took

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        by_errno: dict[str, int] = {}
        for c in self.calls:
            key = "ok" if c.result == 0 else errno.errorcode.get(c.result, str(c.result))
            by_errno[key] = by_errno.get(key, 0) + 1
        return {
            "ok": self.ok,
            "message": (
                f"{len(self.calls)} calls, results {by_errno}, no finding"
                if self.ok
                else f"{len(self.findings)} findings; first: {self.findings[0]}"
            ),
            "calls": len(self.calls),
            "results": by_errno,
            "findings": self.findings[:20],
            "created": sorted(self.created),
        }


class Memory:
    """Strings the kernel reads from user memory, including ones that end in an inaccessible page."""

    def __init__(self) -> None:
        self._keep: list[Any] = []
        libc = ctypes.CDLL(None, use_errno=True)
        self._mprotect = libc.mprotect
        self._mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def cstring(self, data: bytes) -> int:
        buf = ctypes.create_string_buffer(data)
        self._keep.append(buf)
        return ctypes.addressof(buf)

    def unterminated(self, length: int) -> int:
        """`length` bytes of 'a' with no NUL, followed directly by a PROT_NONE page."""
        page = mmap.PAGESIZE
        span = -(-length // page) * page
        region = mmap.mmap(-1, span + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        if self._mprotect(base + span, page, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
        start = base + span - length
        region[span - length : span] = b"a" * length
        self._keep.append(region)
        return start

    def struct(self, value: ctypes.Structure | ctypes._SimpleCData) -> int:  # type: ignore[type-arg]
        self._keep.append(value)
        return ctypes.addressof(value)


@dataclass(frozen=True)
class Paths:
    """Paths the pools draw from; `bdev`/`cow` are a valid pair on a mounted filesystem."""

    bdev: str
    cow_dir: str
    other: tuple[str, ...] = ()


def _path_pool(p: Paths) -> list[tuple[str, bytes]]:
    long_name = p.cow_dir + "/" + "n" * 250
    return [
        ("bdev", p.bdev.encode()),
        ("cow", f"{p.cow_dir}/.fuzz-cow".encode()),
        ("cow2", f"{p.cow_dir}/.fuzz-cow2".encode()),
        ("relative", b"fuzz-relative"),
        ("empty", b""),
        ("dir", p.cow_dir.encode()),
        ("root", b"/"),
        ("devnull", b"/dev/null"),
        ("ctl", CTL.encode()),
        ("proc", PROC.encode()),
        ("missing-parent", f"{p.cow_dir}/no/such/dir/cow".encode()),
        ("missing", b"/dev/no-such-device"),
        ("fifo", f"{p.cow_dir}/fuzz-fifo".encode()),
        ("socket", f"{p.cow_dir}/fuzz-sock".encode()),
        ("loop", f"{p.cow_dir}/fuzz-loop".encode()),
        ("symlink-to-bdev", f"{p.cow_dir}/fuzz-bdev-link".encode()),
        ("tmpfs", b"/tmp/fuzz-cow"),
        ("name-too-long", long_name.encode()),
        ("path-4095", b"/" + b"x" * 4094),
        ("path-5000", b"/" + b"y" * 4999),
        *[(f"other{i}", o.encode()) for i, o in enumerate(p.other)],
    ]


def make_fixtures(p: Paths) -> None:
    """The special files the path pool names (in the COW directory, which is on the tracked fs)."""

    def there(name: str) -> str | None:
        path = os.path.join(p.cow_dir, name)
        return None if os.path.lexists(path) else path

    if fifo := there("fuzz-fifo"):
        os.mkfifo(fifo)
    if loop := there("fuzz-loop"):
        os.symlink(loop, loop)
    if link := there("fuzz-bdev-link"):
        os.symlink(p.bdev, link)
    if sock := there("fuzz-sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(sock)
        s.close()


class Generator:
    """Seeded arguments for one call."""

    def __init__(self, seed: int, paths: Paths, max_minor: int, mem: Memory) -> None:
        self.rng = random.Random(seed)
        self.paths = _path_pool(paths)
        self.max_minor = max_minor
        self.mem = mem

    def minor(self, used: Sequence[int]) -> tuple[str, int]:
        r = self.rng
        options: list[tuple[str, int]] = [
            ("0", 0), ("1", 1), ("max-1", self.max_minor - 1), ("max", self.max_minor),
            ("max+1", self.max_minor + 1), ("-1", U32), ("2^31", 1 << 31), ("255", 255), ("256", 256),
        ]  # fmt: skip
        if used and r.random() < 0.5:
            m = r.choice(list(used))
            return (f"used {m}", m)
        return r.choice(options)

    def size(self) -> tuple[str, int]:
        return self.rng.choice(
            [("0", 0), ("1", 1), ("4", 4), ("64", 64), ("2^44", 1 << 44), ("2^63", 1 << 63), ("2^64-1", U64),
             ("2^32", 1 << 32)]
        )  # fmt: skip

    def string(self) -> tuple[str, int]:
        r = self.rng.random()
        if r < 0.08:
            return ("NULL", 0)
        if r < 0.16:
            addr = self.rng.choice(UNMAPPED)
            return (f"unmapped {addr:#x}", addr)
        if r < 0.22:
            n = self.rng.choice([1, 100, 4095, 4096, 5000])
            return (f"unterminated {n}", self.mem.unterminated(n))
        name, data = self.rng.choice(self.paths)
        return (name, self.mem.cstring(data))

    def argument(self, cls: Any, used: Sequence[int]) -> tuple[dict[str, Any], int]:
        """(description, pointer) of an argument struct of `cls` with fuzzed fields."""
        r = self.rng.random()
        if r < 0.05:
            return ({"arg": "NULL"}, 0)
        if r < 0.10:
            addr = self.rng.choice(UNMAPPED)
            return ({"arg": f"unmapped {addr:#x}"}, addr)
        desc: dict[str, Any] = {}
        if cls in (abi.MinorArg, abi.FreeMinorArg):
            name, value = self.minor(used)
            desc["minor"] = name
            return desc, self.mem.struct(
                cls(value & U32 if cls is abi.MinorArg else ctypes.c_int32(value).value)
            )
        obj = cls()
        for fname, _ftype in cls._fields_:
            if fname in ("bdev", "cow") and cls is not abi.DattobdInfo:
                desc[fname], value = self.string()
            elif fname == "minor":
                desc[fname], value = self.minor(used)
            elif fname in ("fallocated_space", "cache_size", "size", "step_size", "reserved_space"):
                desc[fname], value = self.size()
            else:
                continue
            setattr(obj, fname, value & (U32 if fname == "minor" else U64))
        return desc, self.mem.struct(obj)


IoctlFn = Callable[[int, int, int], int]


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_LIBC.ioctl.restype = ctypes.c_int


def _raw_ioctl(fd: int, request: int, arg: int) -> int:
    """ioctl(2) with `arg` as a raw pointer value (fcntl.ioctl would narrow an int to a C int)."""
    rc = int(_LIBC.ioctl(fd, request, arg or None))
    if rc < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return rc


def _read_state() -> str:
    with open(PROC, encoding="utf-8", errors="replace") as f:
        return f.read()


def comparable_state(text: str) -> Any:
    """/proc/datto-info without the counters that move on their own (the filesystem's own journal
    commits keep changing nr_changed_blocks); the raw text if it does not parse."""
    try:
        data = json.loads(text)
    except ValueError:
        return text
    for dev in data.get("devices", []):
        if isinstance(dev, dict):
            dev.pop("nr_changed_blocks", None)
    return data


def minors_in(text: str) -> list[int]:
    """Minors listed in /proc/datto-info text (none if it does not parse)."""
    try:
        return sorted(int(d["minor"]) for d in json.loads(text).get("devices", []))
    except (ValueError, KeyError, TypeError):
        return []


def fuzz(
    seed: int,
    calls: int,
    paths: Paths,
    *,
    max_minor: int = 24,
    privileged: bool = True,
    ioctl: IoctlFn = _raw_ioctl,
    read_state: Callable[[], str] = _read_state,
    ctl_fd: int | None = None,
) -> FuzzReport:
    """Issue `calls` fuzzed ioctls; see the module docstring for what is checked."""
    mem = Memory()
    gen = Generator(seed, paths, max_minor, mem)
    report = FuzzReport()
    used = set(minors_in(read_state()))  # tracers the caller set up: fuzzed in their states too
    fd = ctl_fd if ctl_fd is not None else os.open(CTL, os.O_RDWR)
    try:
        for i in range(calls):
            if gen.rng.random() < 0.04:
                request = gen.rng.choice(UNKNOWN_REQUESTS)
                op, arg = f"unknown {request:#x}", mem.struct(abi.SetupParams())
                desc: dict[str, Any] = {}
            else:
                op, request, cls = gen.rng.choice(REQUESTS)
                desc, arg = gen.argument(cls, sorted(used | report.created))
            before = comparable_state(read_state())
            call = Call(op, desc)
            try:
                ioctl(fd, request, arg)
            except OSError as exc:
                call.result = exc.errno or -1
            report.calls.append(call)
            where = f"call {i}: {op} {desc}"
            if not privileged:
                if call.result != errno.EPERM:
                    report.findings.append(
                        f"{where}: without CAP_SYS_ADMIN gave {_name(call.result)}, not EPERM"
                    )
                continue
            if call.result:
                if call.result not in DOCUMENTED_ERRNOS:
                    report.findings.append(f"{where}: undocumented errno {_name(call.result)}")
                after = comparable_state(read_state())
                if after != before:
                    report.findings.append(f"{where}: failed with {_name(call.result)} but changed {PROC}")
            elif op.startswith(("setup", "reload")) and "minor" in desc:
                report.created.add(_minor_value(desc["minor"], max_minor))
            elif op == "destroy":
                report.created.discard(_minor_value(desc.get("minor", ""), max_minor))
    finally:
        if ctl_fd is None:
            os.close(fd)
    return report


def _name(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "success"


def _minor_value(desc: str, max_minor: int) -> int:
    if desc.startswith("used "):
        return int(desc.split()[1])
    return {"max-1": max_minor - 1, "max": max_minor, "max+1": max_minor + 1}.get(
        desc, int(desc) if desc.isdigit() else -1
    )


def destroy_all(minors: Sequence[int], ioctl: IoctlFn = _raw_ioctl) -> list[str]:
    """Destroy what the campaign created; returns problems (a destroy that failed)."""
    problems = []
    fd = os.open(CTL, os.O_RDWR)
    try:
        for m in minors:
            arg = abi.MinorArg(m)
            try:
                ioctl(fd, abi.IOCTL_DESTROY, ctypes.addressof(arg))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    problems.append(f"destroy {m}: {_name(exc.errno or 0)}")
    finally:
        os.close(fd)
    return problems
