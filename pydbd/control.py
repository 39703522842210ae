"""The /dev/datto-ctl control device: one method per ioctl of spec §2.

Each request is packed into a ctypes struct, copied into a bytearray and handed to the ioctl
function.  The ioctl function is injectable so tests can check the exact bytes without a kernel.
String arguments are passed as addresses of ctypes buffers that stay referenced until the ioctl
returns.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pydbd import abi
from pydbd.errors import DattoError

DEFAULT_CTL_PATH = "/dev/datto-ctl"

# (fd, request, mutable buffer) -> ioctl result; raises OSError on failure like fcntl.ioctl.
IoctlFn = Callable[[int, int, bytearray], int]

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class DattoInfo:
    """Result of the DATTOBD_INFO ioctl (spec §2.1)."""

    minor: int
    state: int
    error: int  # 0, or a negative errno
    cache_size: int  # bytes
    falloc_size: int  # current COW size limit in bytes (0 while unverified)
    seqid: int
    uuid: bytes  # 16 bytes
    cow: str
    bdev: str
    version: int
    nr_changed_blocks: int

    @property
    def uuid_hex(self) -> str:
        return self.uuid.hex()

    @property
    def state_name(self) -> str:
        return abi.state_name(self.state)

    @property
    def is_snapshot(self) -> bool:
        return bool(self.state & abi.SNAPSHOT)

    @property
    def is_active(self) -> bool:
        return bool(self.state & abi.ACTIVE)

    @property
    def is_unverified(self) -> bool:
        return bool(self.state & abi.UNVERIFIED)

    @classmethod
    def from_struct(cls, raw: abi.DattobdInfo) -> DattoInfo:
        return cls(
            minor=raw.minor,
            state=raw.state,
            error=raw.error,
            cache_size=raw.cache_size,
            falloc_size=raw.falloc_size,
            seqid=raw.seqid,
            uuid=bytes(raw.uuid),
            cow=os.fsdecode(raw.cow),  # c_char arrays read back up to the first NUL
            bdev=os.fsdecode(raw.bdev),
            version=raw.version,
            nr_changed_blocks=raw.nr_changed_blocks,
        )


def _check_range(name: str, value: int, maximum: int) -> int:
    # ctypes would silently wrap out-of-range values; a wrapped minor or size is a different request.
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be between 0 and {maximum}, got {value}")
    return value


def _u32(name: str, value: int) -> int:
    return _check_range(name, value, _U32_MAX)


def _u64(name: str, value: int) -> int:
    return _check_range(name, value, _U64_MAX)


def _cstring(name: str, path: str | bytes) -> ctypes.Array[ctypes.c_char]:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError(f"{name} must not contain a NUL byte: {path!r}")
    return ctypes.create_string_buffer(raw)


class Control:
    """Handle on the datto control device.  Opens lazily; usable as a context manager."""

    def __init__(self, path: str = DEFAULT_CTL_PATH, ioctl: IoctlFn | None = None) -> None:
        self.path = path
        self._ioctl: IoctlFn = ioctl if ioctl is not None else fcntl.ioctl
        self._fd: int | None = None

    @classmethod
    def open(cls, path: str = DEFAULT_CTL_PATH, ioctl: IoctlFn | None = None) -> Self:
        """Create a Control and open the device now, so a missing module is reported early."""
        ctl = cls(path, ioctl)
        ctl.fileno()
        return ctl

    def fileno(self) -> int:
        if self._fd is None:
            try:
                # Read-only is enough for every request, as in libdattobd.
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise DattoError("open", None, exc.errno or 0, self.path) from exc
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Self:
        self.fileno()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(
        self, op: str, minor: int | None, request: int, arg: ctypes._CData, path: str | None = None
    ) -> bytes:
        """Issue one ioctl; return the buffer as the kernel left it."""
        fd = self.fileno()
        buf = bytearray(bytes(arg))
        try:
            self._ioctl(fd, request, buf)
        except OSError as exc:
            raise DattoError(op, minor, exc.errno or 0, path) from exc
        return bytes(buf)

    def setup_snapshot(
        self, bdev: str, cow: str, minor: int, fallocated_mib: int = 0, cache_size: int = 0
    ) -> None:
        """Start tracking a read-write mounted bdev in active snapshot mode (state 3)."""
        bdev_buf, cow_buf = _cstring("bdev", bdev), _cstring("cow", cow)
        params = abi.SetupParams(
            bdev=ctypes.addressof(bdev_buf),
            cow=ctypes.addressof(cow_buf),
            fallocated_space=_u64("fallocated_mib", fallocated_mib),
            cache_size=_u64("cache_size", cache_size),
            minor=_u32("minor", minor),
        )
        self._call("setup-snapshot", minor, abi.IOCTL_SETUP_SNAP, params, bdev)

    def reload_snapshot(self, bdev: str, cow: str, minor: int, cache_size: int = 0) -> None:
        """Register an unverified snapshot tracer, activated at the next read-write mount."""
        self._reload("reload-snapshot", abi.IOCTL_RELOAD_SNAP, bdev, cow, minor, cache_size)

    def reload_incremental(self, bdev: str, cow: str, minor: int, cache_size: int = 0) -> None:
        """Register an unverified incremental tracer, activated at the next read-write mount."""
        self._reload("reload-incremental", abi.IOCTL_RELOAD_INC, bdev, cow, minor, cache_size)

    def _reload(self, op: str, request: int, bdev: str, cow: str, minor: int, cache_size: int) -> None:
        bdev_buf, cow_buf = _cstring("bdev", bdev), _cstring("cow", cow)
        params = abi.ReloadParams(
            bdev=ctypes.addressof(bdev_buf),
            cow=ctypes.addressof(cow_buf),
            cache_size=_u64("cache_size", cache_size),
            minor=_u32("minor", minor),
        )
        self._call(op, minor, request, params, bdev)

    def destroy(self, minor: int) -> None:
        self._call("destroy", minor, abi.IOCTL_DESTROY, abi.MinorArg(_u32("minor", minor)))

    def transition_to_incremental(self, minor: int) -> None:
        arg = abi.MinorArg(_u32("minor", minor))
        self._call("transition-to-incremental", minor, abi.IOCTL_TRANSITION_INC, arg)

    def transition_to_snapshot(self, cow: str, minor: int, fallocated_mib: int = 0) -> None:
        cow_buf = _cstring("cow", cow)
        params = abi.TransitionSnapParams(
            cow=ctypes.addressof(cow_buf),
            fallocated_space=_u64("fallocated_mib", fallocated_mib),
            minor=_u32("minor", minor),
        )
        self._call("transition-to-snapshot", minor, abi.IOCTL_TRANSITION_SNAP, params, cow)

    def reconfigure(self, minor: int, cache_size: int = 0) -> None:
        params = abi.ReconfigureParams(cache_size=_u64("cache_size", cache_size), minor=_u32("minor", minor))
        self._call("reconfigure", minor, abi.IOCTL_RECONFIGURE, params)

    def info(self, minor: int) -> DattoInfo:
        request = abi.DattobdInfo(minor=_u32("minor", minor))
        out = self._call("info", minor, abi.IOCTL_DATTOBD_INFO, request)
        return DattoInfo.from_struct(abi.DattobdInfo.from_buffer_copy(out))

    def get_free_minor(self) -> int:
        out = self._call("get-free", None, abi.IOCTL_GET_FREE, abi.FreeMinorArg(-1))
        return abi.FreeMinorArg.from_buffer_copy(out).value

    def expand_cow_file(self, minor: int, size_mib: int) -> None:
        params = abi.ExpandCowFileParams(size=_u64("size_mib", size_mib), minor=_u32("minor", minor))
        self._call("expand-cow-file", minor, abi.IOCTL_EXPAND_COW_FILE, params)

    def reconfigure_auto_expand(self, minor: int, step_mib: int, reserved_mib: int = 0) -> None:
        params = abi.ReconfigureAutoExpandParams(
            step_size=_u64("step_mib", step_mib),
            reserved_space=_u64("reserved_mib", reserved_mib),
            minor=_u32("minor", minor),
        )
        self._call("reconfigure-auto-expand", minor, abi.IOCTL_RECONFIGURE_AUTO_EXPAND, params)
