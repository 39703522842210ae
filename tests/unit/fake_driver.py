"""Test doubles for the control device: a recording fake ioctl and sample driver output."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from pydbd import abi

# Offsets of the string pointers in each request's struct, so the fake can read them during the call.
POINTER_OFFSETS: dict[int, tuple[int, ...]] = {
    abi.IOCTL_SETUP_SNAP: (0, 8),
    abi.IOCTL_RELOAD_SNAP: (0, 8),
    abi.IOCTL_RELOAD_INC: (0, 8),
    abi.IOCTL_TRANSITION_SNAP: (0,),
}


@dataclass
class Call:
    fd: int
    request: int
    data: bytes  # the buffer as passed in
    strings: tuple[str, ...]  # strings behind the pointers, read while the call was running


class FakeIoctl:
    """Records every request; fails with errors[request] or fills in replies[request]."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.errors: dict[int, int] = {}
        self.replies: dict[int, bytes] = {}

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        data = bytes(buf)
        strings = tuple(_read_string(data, off) for off in POINTER_OFFSETS.get(request, ()))
        self.calls.append(Call(fd, request, data, strings))
        if request in self.errors:
            code = self.errors[request]
            raise OSError(code, os.strerror(code))
        if request in self.replies:
            reply = self.replies[request]
            assert len(reply) == len(buf), "reply must have the size of the request struct"
            buf[:] = reply
        return 0

    @property
    def last(self) -> Call:
        return self.calls[-1]


def _read_string(data: bytes, offset: int) -> str:
    address = int.from_bytes(data[offset : offset + 8], "little")
    return os.fsdecode(ctypes.string_at(address))


def info_bytes(
    minor: int = 0,
    state: int = 3,
    error: int = 0,
    cache_size: int = abi.DEFAULT_CACHE_SIZE,
    falloc_size: int = 26214400,
    seqid: int = 1,
    uuid: bytes = bytes(range(16)),
    cow: bytes = b"/cow.snap",
    bdev: bytes = b"/dev/loop0",
    version: int = 1,
    nr_changed_blocks: int = 0,
) -> bytes:
    """An 8272-byte dattobd_info as the kernel would return it."""
    info = abi.DattobdInfo(
        minor=minor,
        state=state,
        error=error,
        cache_size=cache_size,
        falloc_size=falloc_size,
        seqid=seqid,
        cow=cow,
        bdev=bdev,
        version=version,
        nr_changed_blocks=nr_changed_blocks,
    )
    ctypes.memmove(info.uuid, uuid, 16)
    return bytes(info)


def free_minor_bytes(minor: int) -> bytes:
    return minor.to_bytes(4, "little", signed=True)


# The example of spec §5, verbatim (TAB indentation).
SAMPLE_PROC = """\
{
\t"version": "0.12.1",
\t"devices": [
\t\t{
\t\t\t"minor": 0,
\t\t\t"cow_file": "/cow.snap",
\t\t\t"block_device": "/dev/loop0",
\t\t\t"max_cache": 314572800,
\t\t\t"fallocate": 26214400,
\t\t\t"cow_size_current": 47815065,
\t\t\t"seq_id": 2,
\t\t\t"uuid": "3f0c9a7e1d2b4c5a9e8f00112233aabb",
\t\t\t"version": 1,
\t\t\t"nr_changed_blocks": 517,
\t\t\t"auto_expand": {
\t\t\t\t"step_size_mib": 20,
\t\t\t\t"reserved_space_mib": 64
\t\t\t},
\t\t\t"state": 3
\t\t},
\t\t{
\t\t\t"minor": 3,
\t\t\t"cow_file": "/.datto",
\t\t\t"block_device": "/dev/sdb1",
\t\t\t"max_cache": 314572800,
\t\t\t"error": -22,
\t\t\t"state": 5
\t\t}
\t]
}
"""

EMPTY_PROC = '{\n\t"version": "0.12.1",\n\t"devices": [\n\n\t]\n}\n'
