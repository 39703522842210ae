"""The device extents every COW file of a backup chain occupied, kept in a guest file.

The driver writes its COW files beneath the filesystem (their extents stay unwritten to it) and does
not report those writes as changes, and a snapshot reads its own COW file as zeros. So a backup
image brought up to date with update-img equals the snapshot everywhere *outside* the extents of
the COW files used since the full copy (doc/compat.md, "What a backup image holds"); inside them it
holds what an earlier snapshot showed there. Tests record each COW file when it is created or
expanded (:func:`add`, while it exists: an old file's blocks are gone once it is handed over to
update-img) and the oracles leave those extents out.

The chain is a JSON object mapping the filesystem's device ("major:minor") to merged
[device byte offset, length] pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from guestlib import agent

CHAIN = "/var/tmp/dbd-cow-chain.json"

Extents = list[tuple[int, int]]


def device_key(st_dev: int) -> str:
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


def _load_all(chain: str) -> dict[str, Extents]:
    try:
        raw = json.loads(Path(chain).read_text())
    except FileNotFoundError:
        return {}
    return {k: [(int(a), int(b)) for a, b in v] for k, v in raw.items()}


def merge(extents: Extents) -> Extents:
    """Sorted, with overlapping and touching extents joined."""
    out: Extents = []
    for start, length in sorted(extents):
        if out and start <= out[-1][0] + out[-1][1]:
            last_start, last_len = out[-1]
            out[-1] = (last_start, max(last_len, start + length - last_start))
        else:
            out.append((start, length))
    return out


def add(cow: str, chain: str = CHAIN) -> Extents:
    """Record the extents ``cow`` has now (unwritten ones included); returns them."""
    found = agent.fiemap_extents(cow, allow_unwritten=True)
    key = device_key(os.stat(cow).st_dev)
    everything = _load_all(chain)
    everything[key] = merge(everything.get(key, []) + found)
    _replace(chain, json.dumps(everything))
    return found


def _replace(chain: str, text: str) -> None:
    """Write ``chain`` anew so that a power cut leaves the old or the new version, never an empty
    file (the power-cut scenarios cut the guest right after a recording)."""
    tmp = f"{chain}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, chain)
    dfd = os.open(os.path.dirname(chain) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def extents_for(st_dev: int, chain: str = CHAIN) -> Extents:
    """The recorded extents on the filesystem device ``st_dev`` (none when nothing was recorded)."""
    return _load_all(chain).get(device_key(st_dev), [])


def reset(chain: str = CHAIN) -> None:
    Path(chain).unlink(missing_ok=True)


def _mount_points(device: str) -> list[str]:
    """Where ``device`` is mounted (by device number, so /dev/vdb and its aliases match)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        try:
            if source.startswith("/") and os.stat(source).st_rdev == rdev:
                points.append(target.replace("\\040", " "))
        except OSError:
            continue
    return points


def live_cow_files() -> list[str]:
    """The paths of the COW files the driver uses now, found through /proc/datto-info and the
    mounts of their block devices (dormant tracers' volumes are not mounted: none for them)."""
    from pydbd import procinfo

    try:
        info = procinfo.read_proc_info()
    except OSError:
        return []
    found = []
    for dev in info.devices:
        for mnt in _mount_points(dev.block_device):
            path = os.path.join(mnt, dev.cow_file.lstrip("/"))
            if os.path.isfile(path):
                found.append(path)
                break
    return found


def live_extents(st_dev: int) -> Extents:
    """The extents of every COW file in use now on the filesystem device ``st_dev`` (a snapshot
    reads its own COW file as zeros)."""
    found: Extents = []
    for path in live_cow_files():
        try:
            if os.stat(path).st_dev == st_dev:
                found += agent.fiemap_extents(path, allow_unwritten=True)
        except (OSError, agent.AgentError):
            continue
    return found


def record_live(chain: str = CHAIN) -> list[str]:
    """Record every COW file in use now (call it after each setup, transition to snapshot and
    expansion, before the file's blocks go); returns their paths."""
    paths = live_cow_files()
    for path in paths:
        add(path, chain)
    return paths


def exempt_for(path_on_origin: str, chain: str = CHAIN) -> Extents:
    """Everything a backup image need not match on the filesystem holding ``path_on_origin``: the
    recorded chain and the COW files in use now."""
    st_dev = os.stat(path_on_origin).st_dev
    return merge(extents_for(st_dev, chain) + live_extents(st_dev))
