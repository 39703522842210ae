"""The ioctl ABI of /dev/datto-ctl: request numbers, argument structs and state bits.

Layouts follow the x86_64 (LP64) ABI of dattobd 0.12.  Every "unsigned long" and pointer of the
kernel structs is declared here as a fixed 64-bit field, so the layout does not depend on the
interpreter build; natural alignment then produces the trailing padding the kernel expects.
The request numbers embed the struct sizes, which is why the sizes must match exactly.
"""

from __future__ import annotations

import ctypes
from typing import Final

PATH_MAX: Final = 4096
DEFAULT_CACHE_SIZE: Final = 300 * 1024 * 1024  # cow_max_memory_default: what cache_size 0 means
MIB: Final = 1024 * 1024

IOCTL_MAGIC: Final = 0x91
IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2


def ioc(direction: int, nr: int, size: int) -> int:
    """Encode a request number the way the kernel's _IOC macro does."""
    return (direction << 30) | (size << 16) | (IOCTL_MAGIC << 8) | nr


class SetupParams(ctypes.Structure):
    _fields_ = (
        ("bdev", ctypes.c_uint64),  # char * (address of a NUL-terminated string)
        ("cow", ctypes.c_uint64),  # char *
        ("fallocated_space", ctypes.c_uint64),  # MiB, 0 = module default percentage
        ("cache_size", ctypes.c_uint64),  # bytes, 0 = module default
        ("minor", ctypes.c_uint32),
    )


class ReloadParams(ctypes.Structure):
    _fields_ = (
        ("bdev", ctypes.c_uint64),
        ("cow", ctypes.c_uint64),
        ("cache_size", ctypes.c_uint64),
        ("minor", ctypes.c_uint32),
    )


class TransitionSnapParams(ctypes.Structure):
    _fields_ = (
        ("cow", ctypes.c_uint64),
        ("fallocated_space", ctypes.c_uint64),
        ("minor", ctypes.c_uint32),
    )


class ReconfigureParams(ctypes.Structure):
    _fields_ = (
        ("cache_size", ctypes.c_uint64),
        ("minor", ctypes.c_uint32),
    )


class ExpandCowFileParams(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint64),  # MiB
        ("minor", ctypes.c_uint32),
    )


class ReconfigureAutoExpandParams(ctypes.Structure):
    _fields_ = (
        ("step_size", ctypes.c_uint64),  # MiB
        ("reserved_space", ctypes.c_uint64),  # MiB
        ("minor", ctypes.c_uint32),
    )


class DattobdInfo(ctypes.Structure):
    _fields_ = (
        ("minor", ctypes.c_uint32),
        ("state", ctypes.c_uint64),
        ("error", ctypes.c_int32),
        ("cache_size", ctypes.c_uint64),
        ("falloc_size", ctypes.c_uint64),
        ("seqid", ctypes.c_uint64),
        ("uuid", ctypes.c_uint8 * 16),
        ("cow", ctypes.c_char * PATH_MAX),
        ("bdev", ctypes.c_char * PATH_MAX),
        ("version", ctypes.c_uint64),
        ("nr_changed_blocks", ctypes.c_uint64),
    )


# A bare u32 (destroy, transition-to-incremental) and int (get-free) argument.
MinorArg = ctypes.c_uint32
FreeMinorArg = ctypes.c_int32

IOCTL_SETUP_SNAP: Final = ioc(IOC_WRITE, 1, ctypes.sizeof(SetupParams))
IOCTL_RELOAD_SNAP: Final = ioc(IOC_WRITE, 2, ctypes.sizeof(ReloadParams))
IOCTL_RELOAD_INC: Final = ioc(IOC_WRITE, 3, ctypes.sizeof(ReloadParams))
IOCTL_DESTROY: Final = ioc(IOC_WRITE, 4, ctypes.sizeof(MinorArg))
IOCTL_TRANSITION_INC: Final = ioc(IOC_WRITE, 5, ctypes.sizeof(MinorArg))
IOCTL_TRANSITION_SNAP: Final = ioc(IOC_WRITE, 6, ctypes.sizeof(TransitionSnapParams))
IOCTL_RECONFIGURE: Final = ioc(IOC_WRITE, 7, ctypes.sizeof(ReconfigureParams))
IOCTL_DATTOBD_INFO: Final = ioc(IOC_READ, 8, ctypes.sizeof(DattobdInfo))
IOCTL_GET_FREE: Final = ioc(IOC_READ, 9, ctypes.sizeof(FreeMinorArg))
IOCTL_EXPAND_COW_FILE: Final = ioc(IOC_WRITE, 10, ctypes.sizeof(ExpandCowFileParams))
IOCTL_RECONFIGURE_AUTO_EXPAND: Final = ioc(IOC_WRITE, 11, ctypes.sizeof(ReconfigureAutoExpandParams))

# Tracer state bits (spec §3); ACTIVE and UNVERIFIED are never set together.
SNAPSHOT: Final = 1
ACTIVE: Final = 2
UNVERIFIED: Final = 4

STATE_NAMES: Final[dict[int, str]] = {
    0: "dormant incremental",
    1: "dormant snapshot",
    2: "active incremental",
    3: "active snapshot",
    4: "unverified incremental",
    5: "unverified snapshot",
}


def state_name(state: int) -> str:
    """Human name of a state value; unknown values are shown numerically rather than rejected."""
    return STATE_NAMES.get(state, f"unknown state {state}")
