"""Typed failures of the control device, with advice on what to do about each one.

The driver reports every failure as a bare errno, and the same errno means different things for
different requests (EINVAL alone has half a dozen causes).  DattoError keeps the request name and
minor next to the errno so the message can name the likely causes for that request and the fix.
"""

from __future__ import annotations

import errno as E
import os
from typing import Any

from pydbd.abi import state_name

# Requests that create a tracer: the minor must be free.
_CREATE_OPS = frozenset({"setup-snapshot", "reload-snapshot", "reload-incremental"})
# Requests that refuse to run while /dev/dattoN is open (spec §2, "must not be busy").
_BUSY_CHECKED_OPS = frozenset(
    {"destroy", "transition-to-incremental", "transition-to-snapshot", "reconfigure"}
)
# Requests that need an existing tracer on the minor.
PER_MINOR_OPS = _BUSY_CHECKED_OPS | {"info", "expand-cow-file", "reconfigure-auto-expand"}

_NOT_LOADED = (
    "{path} is missing or is not the datto control device: the dattobd module is not loaded; "
    "load it with `modprobe dattobd`"
)
_NEEDS_ROOT = "this needs root (CAP_SYS_ADMIN); run it as root or with sudo"
_OUT_OF_RANGE = "minor {minor} is out of range (valid minors are 0 to max_snap_devices-1)"
_NOT_ACTIVE_SNAPSHOT = (
    "minor {minor} is not an active snapshot (state 3), or its tracer has failed "
    "(see `dbdctl status`), or the minor is out of range"
)
_COW_TOO_BIG = "the requested COW size exceeds the filesystem's maximum file size; pass a smaller -f"

# Advice keyed by (request or group, errno).  Lookup goes from the most to the least specific key,
# see _hint_template().  Placeholders: {minor}, {path}, {dev} (= /dev/datto<minor>).
_HINTS: dict[tuple[str, int], str] = {
    ("open", E.ENOENT): _NOT_LOADED,
    ("open", E.ENODEV): _NOT_LOADED,
    ("open", E.ENXIO): _NOT_LOADED,
    ("open", E.ENOTTY): _NOT_LOADED,
    ("open", E.EACCES): "{path} is accessible to root only; " + _NEEDS_ROOT,
    ("create", E.EBUSY): (
        "minor {minor} is already in use; pick a free one with `dbdctl get-free` or destroy it first"
    ),
    ("create", E.ENOTBLK): "{path} is not a block device",
    ("setup-snapshot", E.EINVAL): (
        "possible causes: {path} is not mounted read-write, it is already tracked under another minor, "
        "the COW file is not on that filesystem (or is not a regular file), "
        "or minor {minor} is out of range (see max_snap_devices)"
    ),
    ("setup-snapshot", E.ENOENT): "the block device {path} or the directory for the COW file does not exist",
    ("setup-snapshot", E.EFBIG): _COW_TOO_BIG,
    ("reload-snapshot", E.EINVAL): (
        "possible causes: {path} is mounted read-write (use setup-snapshot for a mounted volume), "
        "or minor {minor} is out of range (see max_snap_devices), or a path is too long"
    ),
    ("reload-snapshot", E.ENOENT): "the block device {path} does not exist",
    ("per-minor", E.ENOENT): "no tracer on minor {minor}; `dbdctl status` lists the tracked minors",
    ("busy", E.EBUSY): "{dev} is open (mounted?) — unmount it first",
    ("destroy", E.EINVAL): _OUT_OF_RANGE,
    ("info", E.EINVAL): _OUT_OF_RANGE,
    ("transition-to-incremental", E.EINVAL): _NOT_ACTIVE_SNAPSHOT,
    ("expand-cow-file", E.EINVAL): _NOT_ACTIVE_SNAPSHOT,
    ("reconfigure-auto-expand", E.EINVAL): _NOT_ACTIVE_SNAPSHOT,
    ("transition-to-snapshot", E.EINVAL): (
        "possible causes: minor {minor} is not in active incremental mode (state 2), its tracer has failed, "
        "the new COW file is not on the tracked filesystem (or is not a regular file), "
        "or the minor is out of range"
    ),
    ("transition-to-snapshot", E.EPERM): (
        "the new COW file may not be the one in use (it is immutable while tracked); "
        "choose another path, or " + _NEEDS_ROOT
    ),
    ("transition-to-snapshot", E.EFBIG): _COW_TOO_BIG,
    ("transition-to-snapshot", E.ENOENT): (
        "no tracer on minor {minor}, or the directory for {path} does not exist"
    ),
    ("reconfigure", E.EINVAL): (
        "the tracer on minor {minor} has failed (only info and destroy work on it; destroy it), "
        "or the minor is out of range"
    ),
    ("expand-cow-file", E.ENOSPC): (
        "not enough free space to expand the COW file; the tracer on minor {minor} has now failed, "
        "so destroy it and set it up again"
    ),
    ("get-free", E.ENOENT): (
        "every minor is in use; destroy a tracer or reload the module with a larger max_snap_devices"
    ),
    ("*", E.EFBIG): (
        "the COW file is full and the tracer has failed; destroy it and set it up again with a larger -f, "
        "and grow it in time with `dbdctl expand-cow-file` or `dbdctl reconfigure-auto-expand`"
    ),
    ("*", E.ENOTTY): (
        "the control device did not understand the request: it is not the datto control device "
        "or the module is incompatible; load dattobd with `modprobe dattobd`"
    ),
    ("*", E.EACCES): _NEEDS_ROOT,
    ("*", E.EPERM): _NEEDS_ROOT,
    ("*", E.ENOSPC): "not enough free space for the COW file; free some space or request a smaller size (-f)",
    ("*", E.EISDIR): "the COW path is a directory; give a file name",
    ("*", E.EROFS): "the filesystem for the COW file is read-only",
    ("*", E.ENOMEM): "the kernel ran out of memory; try a smaller cache size (-c)",
    ("*", E.EFAULT): "the driver could not read the request (a bug in the caller)",
    ("*", E.EIO): "an I/O error occurred; check the kernel log",
}
_DEFAULT_HINT = "check `dmesg | grep datto` for details"


def _groups(op: str) -> list[str]:
    """Keys to try for op, most specific first."""
    keys = [op]
    if op == "reload-incremental":
        keys.append("reload-snapshot")  # the two reloads fail for the same reasons
    if op in _CREATE_OPS:
        keys.append("create")
    if op in _BUSY_CHECKED_OPS:
        keys.append("busy")
    if op in PER_MINOR_OPS:
        keys.append("per-minor")
    keys.append("*")
    return keys


def _hint_template(op: str, errnum: int) -> str:
    for key in _groups(op):
        template = _HINTS.get((key, errnum))
        if template is not None:
            return template
    return _DEFAULT_HINT


def errno_name(errnum: int) -> str:
    """Symbolic name of an errno value, e.g. "EBUSY"."""
    return E.errorcode.get(errnum, f"errno {errnum}")


# The state each request needs (spec §3); EINVAL from these is most often a tracer in another state.
_NEEDED_STATE: dict[str, int] = {
    "transition-to-incremental": 3,
    "expand-cow-file": 3,
    "reconfigure-auto-expand": 3,
    "transition-to-snapshot": 2,
}


def diagnose_einval(op: str, minor: int, state: int, error: int) -> str | None:
    """The cause of an EINVAL from a request on an existing tracer, given that tracer's INFO
    (state and error): the hints above can only list the possible causes, this names the one that
    applies.  None when neither the tracer's error nor its state explains the refusal."""
    if error:
        why = f"the tracer on minor {minor} has failed with {errno_name(-error)} ({os.strerror(-error)})"
        if -error == E.EFBIG:
            return why + "; " + _HINTS[("*", E.EFBIG)]
        return (
            why + "; only info and destroy work on a failed tracer: destroy it and set it up again "
            "(`dmesg | grep datto` says what failed)"
        )
    needed = _NEEDED_STATE.get(op)
    if needed is not None and state != needed:
        return (
            f"{op} needs minor {minor} in state {needed} ({state_name(needed)}), "
            f"but it is in state {state} ({state_name(state)})"
        )
    return None


class DattoError(OSError):
    """A failed request to the datto control device.

    Attributes: op (request name as used by dbdctl, or "open"), minor (or None), errno, strerror,
    path (the device or file the request was about, or None) and hint (what to do about it).
    """

    def __init__(self, op: str, minor: int | None, errnum: int, path: str | None = None) -> None:
        super().__init__(errnum, os.strerror(errnum))
        self.op = op
        self.minor = minor
        self.path = path
        where = "" if path is None else path
        dev = "/dev/datto?" if minor is None else f"/dev/datto{minor}"
        self.hint = _hint_template(op, errnum).format(minor=minor, path=where, dev=dev)

    def __str__(self) -> str:
        subject = self.op if self.minor is None else f"{self.op} on minor {self.minor}"
        return f"{subject} failed: {self.strerror} ({errno_name(self.errno or 0)}); {self.hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles self.args, which does not match this constructor's signature.
        return (type(self), (self.op, self.minor, self.errno, self.path))
