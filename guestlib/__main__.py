"""``python3 -m guestlib <command> ...``: the guest side of the oracles, printing one JSON object.

Exit status: 0 when the command succeeded and its check (if any) passed, 1 when a check failed,
2 for a usage error or an unusable input (missing file, ...), with ``{"ok": false, "error": ...}``.

Commands:
  hash DEV OUT [--start B] [--count N] [--direct]   per-block digests of DEV into OUT
  sha256 DEV [--direct]                             whole-device sha256
  diff A B                                          compare two digest files (first difference)
  stability A B                                     oracle (a) on two digest files
  signed-write DEV --seed S --ops N --blocks N --state OUT [--first B] [--max-run R] [--direct]
               [--sync] [--continue]                signed raw-device writes; state saved to OUT
  signed-check PATH --state STATE                   classify every block the state expects
  signed-files DIR --seed S --ops N --state OUT [--files F] [--max-file-blocks B] [--direct]
  signed-check-files DIR --state STATE
  churn DIR --seed S --ops N --manifest OUT [--max-bytes B] [--unsynced-ops K]
  check-manifest DIR MANIFEST [--ignore-deleted] [--fsck DEV --fstype T]
  point-in-time SNAPROOT MANIFEST [--fsck DEV --fstype T]   oracle (b)
  change-list HASH_N HASH_N1 COW [--chain F] [--max-spurious N] [--discards]   oracle (c)
  update-img SNAPSHOT COW IMAGE [--chain F]         oracle (c), update-img part: the image must equal the
                                                    snapshot outside the chain's COW file extents
  change-list-traced COW [--chain F] [--max-spurious N]
                                                    oracle (c) from the block trace alone: every traced
                                                    write of the period is marked, few marked blocks are
                                                    not traced (any volume size)
  marked-blocks-match IMAGE SNAPSHOT COW             the blocks COW marks are equal in both
  image-matches IMAGE SNAPSHOT ORIGIN_FILE [--chain F]
                                                    the same comparison alone (ORIGIN_FILE: any file
                                                    on the origin filesystem)
  chain-add COW [--chain F]                         record a COW file's extents (guestlib.cowchain)
  chain-record [--chain F]                          record the COW files in use now
  trace-start                                       trace writes, discards and write-zeroes below the
                                                    filesystems (guestlib.discards) for change-list
  trace-mark MINOR [--device DEV] [--taken]         a marker in that trace: the minor's next COW file
                                                    is made from here (--taken: its snapshot exists)
  cow-structure COW SNAPSHOT [--sectors N] [--written FILE] [--exact] [--seqid N] [--uuid HEX]
  fsck DEV --fstype T
  replay-check LOG TARGET --image IMG --cow PATH --sectors N [--points N] [--after-mark M]
               [--manifest M --manifest-dir D] [--fstype ext4|xfs]
                                                 write-point replay (guestlib.logwrites): journal
                                                 replayed, fsck, COW file clean-and-valid or dirty,
                                                 fsynced files kept
  cow-corrupt CLEAN OUTDIR --seed S --blocks N  corrupt copies of a clean COW file (guestlib.cowcorrupt)
  ioctl-fuzz --seed S --calls N --bdev DEV --cow-dir DIR [--other PATH]... [--unprivileged]
             [--max-minor M]                    bad-input fuzzing of /dev/datto-ctl (guestlib.ioctlfuzz);
                                                destroys the tracers it created unless --unprivileged
  agent DIR                                     serve the consistency fuzzer's steps through the FIFOs
                                                DIR/in and DIR/out until a quit request (guestlib.agent)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guestlib import (
    agent,
    blockhash,
    churn,
    cowchain,
    cowcorrupt,
    discards,
    ioctlfuzz,
    logwrites,
    oracles,
    period,
    signed,
)
from pydbd import cow as cowfmt

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2


def _emit(data: dict[str, Any]) -> int:
    print(json.dumps(data, sort_keys=True))
    return EXIT_OK if data.get("ok", True) else EXIT_CHECK_FAILED


def _cmd_hash(a: argparse.Namespace) -> int:
    digests = blockhash.hash_blocks(a.dev, a.start, a.count, direct=a.direct)
    blockhash.save_digests(digests, a.out)
    return _emit({"ok": True, "blocks": blockhash.block_count(digests), "out": a.out})


def _cmd_sha256(a: argparse.Namespace) -> int:
    return _emit({"ok": True, "sha256": blockhash.sha256_device(a.dev, direct=a.direct)})


def _cmd_diff(a: argparse.Namespace) -> int:
    x, y = blockhash.load_digests(a.a), blockhash.load_digests(a.b)
    diffs = blockhash.differing_blocks(x, y)
    return _emit(
        {
            "ok": True,
            "equal": not diffs,
            "first_difference": diffs[0] if diffs else None,
            "differing": len(diffs),
            "blocks": diffs[:1000],
        }
    )


def _cmd_stability(a: argparse.Namespace) -> int:
    result = oracles.snapshot_stability(blockhash.load_digests(a.a), blockhash.load_digests(a.b))
    return _emit(result.to_json())


def _cmd_signed_write(a: argparse.Namespace) -> int:
    state = signed.SignedState.load(a.state) if a.cont else None
    state = signed.random_writes(
        a.dev,
        a.seed,
        a.ops,
        first_block=a.first,
        nblocks=a.blocks,
        max_run=a.max_run,
        direct=a.direct,
        sync=a.sync,
        state=state,
    )
    state.save(a.state)
    return _emit(
        {"ok": True, "run_id": state.run_id, "blocks": len(state.expected), "next_seq": state.next_seq}
    )


def _cmd_signed_check(a: argparse.Namespace) -> int:
    return _emit(signed.check(a.path, signed.SignedState.load(a.state)).to_json())


def _cmd_signed_files(a: argparse.Namespace) -> int:
    state = signed.random_file_writes(
        a.dir, a.seed, a.ops, files=a.files, max_file_blocks=a.max_file_blocks, direct=a.direct
    )
    state.save(a.state)
    return _emit({"ok": True, "run_id": state.run_id, "files": sorted(state.files)})


def _cmd_signed_check_files(a: argparse.Namespace) -> int:
    return _emit(signed.check_files(a.dir, signed.SignedFilesState.load(a.state)).to_json())


def _cmd_churn(a: argparse.Namespace) -> int:
    result = churn.churn(a.dir, a.seed, a.ops, max_bytes=a.max_bytes, unsynced_ops=a.unsynced_ops)
    result.save(a.manifest)
    live = sum(1 for v in result.manifest.values() if v is not None)
    return _emit(
        {
            "ok": True,
            "files": live,
            "deleted": len(result.manifest) - live,
            "ops": len(result.log),
            "bytes_written": result.bytes_written,
            "volatile": result.volatile,
        }
    )


def _cmd_check_manifest(a: argparse.Namespace) -> int:
    manifest, volatile = churn.load_manifest(a.manifest)
    result = oracles.nothing_lost(a.dir, manifest, volatile=volatile, check_deleted=not a.ignore_deleted)
    if result.ok and a.fsck:
        result = oracles.fsck(a.fsck, a.fstype)
    return _emit(result.to_json())


def _cmd_point_in_time(a: argparse.Namespace) -> int:
    manifest, _volatile = churn.load_manifest(a.manifest)
    return _emit(oracles.point_in_time(a.dir, manifest, fsck_device=a.fsck, fstype=a.fstype).to_json())


def _cmd_change_list(a: argparse.Namespace) -> int:
    exempt = cowchain.exempt_for(a.cow, a.chain)
    result = oracles.change_list_complete(
        blockhash.load_digests(a.hash_n),
        blockhash.load_digests(a.hash_n1),
        a.cow,
        exempt=exempt,
        discarded=[run for part in period.written_below(a.cow) for run in part] if a.discards else (),
        max_spurious=a.max_spurious,
    )
    return _emit(result.to_json())


def _cmd_change_list_traced(a: argparse.Namespace) -> int:
    result = oracles.change_list_traced(
        a.cow,
        *period.written_below(a.cow),
        exempt=cowchain.exempt_for(a.cow, a.chain),
        max_spurious=a.max_spurious,
    )
    return _emit(result.to_json())


def _cmd_update_img(a: argparse.Namespace) -> int:
    exempt = cowchain.exempt_for(a.cow, a.chain)
    return _emit(oracles.update_img_matches(a.snapshot, a.cow, a.image, exempt=exempt).to_json())


def _cmd_image_matches(a: argparse.Namespace) -> int:
    exempt = cowchain.exempt_for(a.origin_file, a.chain)
    return _emit(oracles.image_matches(a.image, a.snapshot, exempt).to_json())


def _cmd_marked_blocks_match(a: argparse.Namespace) -> int:
    return _emit(oracles.marked_blocks_match(a.image, a.snapshot, a.cow).to_json())


def _cmd_chain_add(a: argparse.Namespace) -> int:
    return _emit({"ok": True, "extents": [list(e) for e in cowchain.add(a.cow, a.chain)]})


def _cmd_trace_start(a: argparse.Namespace) -> int:
    discards.start()
    return _emit({"ok": True})


def _cmd_trace_mark(a: argparse.Namespace) -> int:
    """Mark where a COW file's creation for minor N's device begins (before setup or a transition),
    or with --taken where the ioctl returned."""
    from pydbd import control

    device = a.device
    if device is None:
        with control.Control() as c:
            device = c.info(int(a.minor)).bdev
    discards.mark(discards.mark_for(os.stat(device).st_rdev, taken=a.taken))
    return _emit({"ok": True, "device": device})


def _cmd_chain_record(a: argparse.Namespace) -> int:
    """Record the COW files in use, and trace discards on their devices from now on."""
    paths = cowchain.record_live(a.chain)
    discards.start()
    return _emit({"ok": True, "recorded": paths})


def _cmd_cow_structure(a: argparse.Namespace) -> int:
    written = None
    if a.written:
        with open(a.written, encoding="utf-8") as handle:
            loaded = json.load(handle)
        # Either a list of blocks or a signed-write state file.
        written = [int(b) for b in (loaded["expected"] if isinstance(loaded, dict) else loaded)]
    result = oracles.cow_structure(
        a.cow,
        a.snapshot,
        device_sectors=a.sectors,
        written=written,
        exact_written=a.exact,
        expected_seqid=a.seqid,
        expected_uuid=bytes.fromhex(a.uuid) if a.uuid else None,
        own_extents=_own_extents(a.cow, a.snapshot),
    )
    return _emit(result.to_json())


def _own_extents(cow: str, snapshot: str) -> list[tuple[int, int]]:
    """The COW file's extents on its block device when that device is the snapshot's origin (the
    same size), as the oracle must then leave the file's own sectors out; none for a copy elsewhere."""
    dev = os.stat(cow).st_dev
    try:
        dev_sectors = int(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/size").read_text())
    except (OSError, ValueError):
        return []
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        snap_sectors = blockhash.device_size(fd) // oracles.SECTOR
    finally:
        os.close(fd)
    if dev_sectors != snap_sectors:
        return []
    try:
        return agent.fiemap_extents(cow, allow_unwritten=True)
    except (OSError, agent.AgentError):  # no plain extents to name: every sector is compared
        return []


def _cmd_fsck(a: argparse.Namespace) -> int:
    return _emit(oracles.fsck(a.dev, a.fstype).to_json())


def _replay_journal(image: str, fstype: str, mountpoint: str) -> str | None:
    """Bring a crashed image's journal up to date as the next mount would; None, or what failed.
    ext4: e2fsck replays it (exit 1 = fixed). XFS has no offline log replay: a read-write mount
    recovers the log, the unmount leaves it clean for xfs_repair -n (nouuid: a copy's UUID)."""
    if fstype == "ext4":
        r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", image], capture_output=True, text=True)
        return f"e2fsck exit {r.returncode}" if r.returncode > 1 else None
    r = subprocess.run(["mount", "-o", "loop,nouuid", image, mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        return f"mount exit {r.returncode}: {r.stderr.strip()}"
    subprocess.run(["umount", mountpoint], check=True)
    return None


def _check_point(a: argparse.Namespace, index: int, report: logwrites.PointReport) -> None:
    """One crash point: replay the journal on a copy, fsck it, check the COW file and the manifest."""
    findings = report.findings if report.findings is not None else []
    report.findings = findings
    where = f"crash point after log entry {index}"
    subprocess.run(["cp", "--sparse=always", a.target, a.image], check=True)
    os.makedirs(a.mountpoint, exist_ok=True)
    subprocess.run(["modprobe", "loop"], check=True)
    failed = _replay_journal(a.image, a.fstype, a.mountpoint)
    if failed:
        findings.append(f"{where}: journal replay failed ({failed})")
        return
    check = oracles.fsck(a.image, a.fstype)
    if not check.ok:
        findings.append(f"{where}: origin inconsistent: {check.message}")
        return
    ro = "ro,loop,noload" if a.fstype == "ext4" else "ro,loop,nouuid"
    subprocess.run(["mount", "-o", ro, a.image, a.mountpoint], check=True)
    try:
        cow = os.path.join(a.mountpoint, a.cow.lstrip("/"))
        if not os.path.exists(cow):
            report.cow_absent += 1
        else:
            verdict = cowfmt.verify(cow, a.sectors)
            if verdict.header is not None and verdict.header.clean:
                if verdict.ok:
                    report.cow_clean += 1
                else:
                    findings.append(f"{where}: CLEAN COW file does not verify: {verdict.violations[0]}")
            else:
                report.cow_dirty += 1
        if a.manifest:
            manifest, _volatile = churn.load_manifest(a.manifest)
            lost = churn.compare_tree(os.path.join(a.mountpoint, a.manifest_dir.lstrip("/")), manifest)
            if lost:
                findings.append(f"{where}: fsynced data lost: {lost[0]}")
    finally:
        subprocess.run(["umount", a.mountpoint], check=True)
    report.checked += 1


def _cmd_replay_check(a: argparse.Namespace) -> int:
    log_fd = os.open(a.log, os.O_RDONLY)
    try:
        points = logwrites.sample(logwrites.crash_points(log_fd, a.after_mark), a.points)
    finally:
        os.close(log_fd)
    if not points:
        return _emit({"ok": False, "message": f"no crash point in {a.log} after mark {a.after_mark!r}"})
    report = logwrites.PointReport(findings=[])
    for index in logwrites.replay_points(a.log, a.target, points):
        _check_point(a, index, report)
    return _emit(report.to_json())


def _cmd_cow_corrupt(a: argparse.Namespace) -> int:
    with open(a.clean, "rb") as f:
        clean = f.read()
    os.makedirs(a.out, exist_ok=True)
    listed = []
    for i, v in enumerate(cowcorrupt.variants(clean, a.seed, a.blocks)):
        path = os.path.join(a.out, f"{i:02d}.cow")
        with open(path, "wb") as f:
            f.write(v.data)
        listed.append({"file": path, "name": v.name, "must_refuse": v.must_refuse})
    return _emit({"ok": True, "variants": listed})


def _cmd_ioctl_fuzz(a: argparse.Namespace) -> int:
    paths = ioctlfuzz.Paths(a.bdev, a.cow_dir, tuple(a.other))
    ctl_fd = None
    if a.unprivileged:
        # The control node may be root-only: open it first, then drop to nobody without capabilities,
        # so every ioctl meets the driver's own CAP_SYS_ADMIN check.
        ctl_fd = os.open(ioctlfuzz.CTL, os.O_RDWR)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    else:
        ioctlfuzz.make_fixtures(paths)
    report = ioctlfuzz.fuzz(
        a.seed, a.calls, paths, max_minor=a.max_minor, privileged=not a.unprivileged, ctl_fd=ctl_fd
    )
    if not a.unprivileged:
        report.findings += ioctlfuzz.destroy_all(sorted(report.created))
    return _emit(report.to_json())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m guestlib", description="guest-side oracle helpers")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], *positionals: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        for pos in positionals:
            p.add_argument(pos)
        p.set_defaults(fn=fn)
        return p

    p = add("hash", _cmd_hash, "dev", "out")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--direct", action="store_true")
    add("sha256", _cmd_sha256, "dev").add_argument("--direct", action="store_true")
    add("diff", _cmd_diff, "a", "b")
    add("stability", _cmd_stability, "a", "b")

    p = add("signed-write", _cmd_signed_write, "dev")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, required=True)
    p.add_argument("--blocks", type=int, required=True, help="size of the written area in blocks")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--max-run", type=int, default=16)
    p.add_argument("--state", required=True)
    p.add_argument("--direct", action="store_true")
    p.add_argument("--sync", action="store_true")
    p.add_argument("--continue", dest="cont", action="store_true", help="extend the saved state")
    add("signed-check", _cmd_signed_check, "path").add_argument("--state", required=True)

    p = add("signed-files", _cmd_signed_files, "dir")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, required=True)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--max-file-blocks", type=int, default=64)
    p.add_argument("--state", required=True)
    p.add_argument("--direct", action="store_true")
    add("signed-check-files", _cmd_signed_check_files, "dir").add_argument("--state", required=True)

    p = add("churn", _cmd_churn, "dir")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--unsynced-ops", type=int, default=0)

    p = add("check-manifest", _cmd_check_manifest, "dir", "manifest")
    p.add_argument("--ignore-deleted", action="store_true")
    p.add_argument("--fsck", metavar="DEV")
    p.add_argument("--fstype", default="ext4")

    p = add("point-in-time", _cmd_point_in_time, "dir", "manifest")
    p.add_argument("--fsck", metavar="DEV")
    p.add_argument("--fstype", default="ext4")

    for p in (
        p_change_list := add("change-list", _cmd_change_list, "hash_n", "hash_n1", "cow"),
        p_traced := add("change-list-traced", _cmd_change_list_traced, "cow"),
        add("update-img", _cmd_update_img, "snapshot", "cow", "image"),
        add("image-matches", _cmd_image_matches, "image", "snapshot", "origin_file"),
        add("chain-add", _cmd_chain_add, "cow"),
        add("chain-record", _cmd_chain_record),
    ):
        p.add_argument("--chain", default=cowchain.CHAIN)
    p_change_list.add_argument("--max-spurious", type=int, default=None)
    p_traced.add_argument("--max-spurious", type=int, default=None)
    add("trace-start", _cmd_trace_start)
    add("marked-blocks-match", _cmd_marked_blocks_match, "image", "snapshot", "cow")
    p = add("trace-mark", _cmd_trace_mark, "minor")
    p.add_argument("--device", help="the block device (before setup, when minor N has none yet)")
    p.add_argument("--taken", action="store_true", help="the snapshot was taken: its period begins")
    p_change_list.add_argument("--discards", action="store_true", help="discards traced since discards-start")

    p = add("cow-structure", _cmd_cow_structure, "cow", "snapshot")
    p.add_argument("--sectors", type=int)
    p.add_argument("--written", help="JSON list of written blocks, or a signed-write state file")
    p.add_argument("--exact", action="store_true")
    p.add_argument("--seqid", type=int)
    p.add_argument("--uuid")
    add("fsck", _cmd_fsck, "dev").add_argument("--fstype", required=True)

    p = add("replay-check", _cmd_replay_check, "log", "target")
    p.add_argument("--image", required=True, help="scratch copy of the target per point (e.g. on tmpfs)")
    p.add_argument("--mountpoint", default="/mnt/replay")
    p.add_argument("--fstype", choices=("ext4", "xfs"), default="ext4")
    p.add_argument("--cow", required=True, help="the COW file's path inside the filesystem")
    p.add_argument("--sectors", type=int, required=True, help="the origin's size in 512-byte sectors")
    p.add_argument("--points", type=int, default=12, help="at most this many crash points, spread evenly")
    p.add_argument("--after-mark", help="only crash points after this dm-log-writes mark")
    p.add_argument("--manifest", help="churn manifest whose files every point must hold")
    p.add_argument("--manifest-dir", default="/", help="where that churn ran, inside the filesystem")

    p = add("cow-corrupt", _cmd_cow_corrupt, "clean", "out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--blocks", type=int, required=True, help="the origin's size in 4 KiB blocks")

    p = add("ioctl-fuzz", _cmd_ioctl_fuzz)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--bdev", required=True)
    p.add_argument("--cow-dir", required=True)
    p.add_argument("--other", action="append", default=[])
    p.add_argument("--max-minor", type=int, default=24)
    p.add_argument("--unprivileged", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["agent"]:  # a server, not a one-JSON-object command
        from guestlib import agent

        return agent.main(args_list[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_ERROR
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except (OSError, ValueError, KeyError, churn.ChurnError) as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
