"""Guest-side helpers for module tests: run pydbd (dbdctl, update-img, ioctls) inside a guest.

pydbd reaches the guest through the read-only checkout share at /src; these helpers run it with
`PYTHONPATH=/src` so errno values come back intact through Guest.py().
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from harness.guest import CommandResult, Guest

PY = "PYTHONPATH=/src python3"
DBDCTL = f"{PY} -m pydbd.dbdctl"
UPDATE_IMG = f"{PY} -m pydbd.updateimg"
COW_INFO = f"{PY} -m pydbd.dbdctl cow-info"


def install_tools(guest: Guest) -> None:
    """Put `dbdctl` and `update-img` wrappers on the guest's PATH, as an installed pydbd would."""
    guest.install_pydbd_tools()


GUESTLIB = f"{PY} -m guestlib"
# dbdctl commands after which a COW file exists whose extents a backup image need not match
_MAKES_COW_FILE = ("setup-snapshot", "transition-to-snapshot", "expand-cow-file")
_STARTS_SNAPSHOT = ("setup-snapshot", "transition-to-snapshot")


def dbdctl(guest: Guest, args: str, timeout: float = 120) -> CommandResult:
    """Run pydbd's dbdctl in the guest. After a command that made or grew a COW file, its extents
    are recorded (guestlib.cowchain) for the image and change-list checks."""
    words = args.split()
    makes_cow_file = words[0] in _MAKES_COW_FILE
    if words[0] in _STARTS_SNAPSHOT:  # a period of the block trace starts (guestlib.discards)
        device = f" --device {words[-3]}" if words[0] == "setup-snapshot" else ""
        guest.check(f"{GUESTLIB} trace-mark {words[-1]}{device}")
    r = guest.run(f"{DBDCTL} {args}", timeout=timeout)
    if r.rc == 0 and words[0] in _STARTS_SNAPSHOT:
        guest.check(f"{GUESTLIB} trace-mark {words[-1]} --taken")
    if r.rc == 0 and makes_cow_file:
        record_cow_files(guest)
    return r


def record_cow_files(guest: Guest) -> None:
    """Record the extents of the COW files in use now (guestlib chain-record)."""
    guest.check(f"{GUESTLIB} chain-record")


def assert_image_matches(guest: Guest, image: str, snapshot: str, origin_file: str) -> None:
    """The backup image equals the snapshot outside the recorded COW files' extents (doc/compat.md);
    `origin_file` is any file on the tracked filesystem."""
    r = guest.run(f"{GUESTLIB} image-matches {image} {snapshot} {origin_file}", timeout=600)
    lines = r.stdout.strip().splitlines()
    data = json.loads(lines[-1]) if lines else {}
    assert r.rc == 0 and data.get("ok"), f"{image} does not match {snapshot}: {data.get('message', r.stderr)}"


def ctl(guest: Guest, method: str, *args: Any) -> int:
    """Call one pydbd.control.Control method in the guest; returns 0 or the errno it failed with."""
    code = (
        "from pydbd.control import Control\n"
        f"args = {json.dumps(list(args))}\n"
        "try:\n"
        "    with Control() as c:\n"
        f"        getattr(c, {method!r})(*args)\n"
        "    result = 0\n"
        "except OSError as e:\n"
        "    result = e.errno\n"
    )
    rc = guest.py(code)
    assert isinstance(rc, int)
    return rc


@dataclass(frozen=True)
class Info:
    minor: int
    state: int
    error: int
    cache_size: int
    falloc_size: int
    seqid: int
    uuid: str
    cow: str
    bdev: str
    version: int
    nr_changed_blocks: int


def info(guest: Guest, minor: int) -> Info:
    code = (
        "from pydbd.control import Control\n"
        "with Control() as c:\n"
        f"    i = c.info({minor})\n"
        "result = dict(minor=i.minor, state=i.state, error=i.error, cache_size=i.cache_size,\n"
        "    falloc_size=i.falloc_size, seqid=i.seqid, uuid=i.uuid_hex, cow=i.cow, bdev=i.bdev,\n"
        "    version=i.version, nr_changed_blocks=i.nr_changed_blocks)\n"
    )
    return Info(**guest.py(code))


def proc_devices(guest: Guest) -> list[dict[str, Any]]:
    """/proc/datto-info parsed by pydbd in the guest, one dict per device."""
    code = (
        "from pydbd.procinfo import read_proc_info\n"
        "result = [d.to_dict() for d in read_proc_info().devices]\n"
    )
    devices = guest.py(code)
    assert isinstance(devices, list)
    return devices


def sha256(guest: Guest, path: str) -> str:
    return guest.check(f"sha256sum {path}", timeout=300).stdout.split()[0]


def write_file(guest: Guest, path: str, mib: int, seed: str) -> None:
    """Write `mib` MiB of deterministic, seed-dependent data and fsync it."""
    guest.check(
        f"python3 -c \"import hashlib,os,sys; f=open('{path}','wb'); "
        f"[f.write(hashlib.sha256(b'{seed}%d' % i).digest()*128) for i in range({mib}*256)]; "
        'f.flush(); os.fsync(f.fileno())"',
        timeout=300,
    )


# -- lifecycle helpers (tests/guest/test_lifecycle.py) ---------------------------------------------


def device_sectors(guest: Guest, device: str) -> int:
    return int(guest.check(f"blockdev --getsz {device}").stdout)


def cow_report(guest: Guest, path: str, sectors: int | None = None) -> dict[str, Any]:
    """pydbd's verifier (spec 4.5) run on a COW file in the guest: VerifyReport.to_dict()."""
    code = f"from pydbd.cow import verify\nresult = verify({path!r}, {sectors!r}).to_dict()\n"
    report = guest.py(code)
    assert isinstance(report, dict)
    return report


def proc_device(guest: Guest, minor: int) -> dict[str, Any] | None:
    """The /proc/datto-info entry of `minor`, or None."""
    return next((d for d in proc_devices(guest) if d["minor"] == minor), None)


def drop_caches(guest: Guest) -> None:
    guest.check("sync; echo 3 > /proc/sys/vm/drop_caches")


def fiemap(guest: Guest, path: str) -> list[tuple[int, int, int]]:
    """The file's extents as (logical, physical, length) in bytes (FS_IOC_FIEMAP, synced first)."""
    code = (
        "import fcntl, os, struct\n"
        f"fd = os.open({path!r}, os.O_RDONLY)\n"
        "n = 64\n"
        "buf = bytearray(struct.pack('=QQIIII', 0, 2**64 - 1, 1, 0, n, 0) + bytes(56 * n))\n"
        "fcntl.ioctl(fd, 0xC020660B, buf)\n"
        "os.close(fd)\n"
        "count = struct.unpack_from('=I', buf, 20)[0]\n"
        "result = [list(struct.unpack_from('=QQQ', buf, 32 + 56 * i)) for i in range(count)]\n"
    )
    extents = guest.py(code)
    assert isinstance(extents, list)
    return [(int(a), int(b), int(c)) for a, b, c in extents]
