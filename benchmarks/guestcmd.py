"""Guest commands for the benchmarks: a failed command ends the benchmark with everything the
guest printed, instead of a bare exit status."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from harness.errors import GuestError
from harness.guest import CommandResult, Guest


class BenchError(Exception):
    """A guest command failed; the message carries its stderr."""


def run(g: Guest, cmd: str, timeout: float = 120.0) -> CommandResult:
    """Run a guest command; on failure raise BenchError with its rc, stdout tail and stderr."""
    r = g.run(cmd, timeout=timeout)
    if r.rc != 0:
        raise BenchError(
            f"guest command failed (rc {r.rc}): {cmd}\n--- stdout (tail) ---\n{r.stdout[-2000:]}"
            f"\n--- stderr ---\n{r.stderr}"
        )
    return r


def finish_run(results: dict[str, Any], json_path: Path | None, failed: bool) -> int:
    """Record the host's load after the run, write the results (--json) and return the exit status."""
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {json_path}")
    return 1 if failed else 0


def boot_and_describe(g: Guest, results: dict[str, Any]) -> None:
    """Boot the guest and record what the numbers were measured on: accelerator, kernel, vCPUs."""
    g.boot()
    argv = g.command_line
    results["accel"] = argv[argv.index("-accel") + 1] if "-accel" in argv else "?"
    # under TCG a second, offline vCPU (harness.qemu.smp_option): recorded with the numbers
    results["qemu_smp"] = argv[argv.index("-smp") + 1] if "-smp" in argv else "?"
    results["guest_kernel"] = run(g, "uname -r").stdout.strip()
    results["guest_nproc"] = run(g, "nproc").stdout.strip()


def finish_guest(g: Guest, failed: bool, results: dict[str, Any]) -> bool:
    """Power the guest off; kernel findings on its console (a WARNING, KASAN, ...) are recorded in
    results and make the run failed. Returns whether it failed."""
    try:
        g.finish(test_failed=failed, artifact_dir=None)
    except GuestError as e:  # KernelWarningError: kernel findings on the console
        print(f"\nkernel findings: {e}", file=sys.stderr)
        results["kernel_findings"] = str(e)
        return True
    return failed


# A command that stops making I/O progress: exit status of watched() after it printed the state.
STALL_RC = 99

STALL_DUMP = r"""
echo "=== no I/O completed on any virtio disk for $stall s: block layer state"
cat /proc/diskstats | awk '$3 ~ /^vd/'
for q in /sys/block/vd*; do
  echo "$q inflight: $(cat $q/inflight) wbt_lat_usec: $(cat $q/queue/wbt_lat_usec 2>/dev/null)"
done
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
for d in /sys/kernel/debug/block/vd*; do
  for f in $d/rqos/wbt/inflight $d/rqos/wbt/wb_normal $d/rqos/wbt/wb_background $d/state \
           $d/hctx*/state $d/hctx*/busy $d/hctx*/dispatch $d/hctx*/sched_tags $d/hctx*/tags; do
    [ -e $f ] && echo "$f: $(head -c 600 $f | tr '\n' ' ')"
  done
done
grep -E 'virtio|CPU' /proc/interrupts
cat /proc/datto-info 2>/dev/null
[ "$sysrq" = 1 ] && { echo w > /proc/sysrq-trigger; sleep 1; }; dmesg 2>&1 | tail -n 200
"""


# Run after a stall, in a new guest command: a lost doorbell is healed by any new request on the
# same queue (its notification covers the old request too); a request the device lost is not, nor
# is an interrupt lost in the event-index race (QEMU's signalled index is then past the guest's
# used_event, so the new completion does not interrupt either: ring_verdict names that case). The
# read runs in the background: if the queue is dead it never completes, and a task in
# uninterruptible sleep cannot be killed.
NUDGE = r"""
for q in /sys/block/vd*; do
  set -- $(cat $q/inflight)
  [ $(($1 + $2)) -gt 0 ] || continue
  d=${q##*/}
  # one read from each CPU: each CPU submits to its own hardware queue
  for c in $(seq 0 $(($(nproc) - 1))); do
    taskset -c $c dd if=/dev/$d of=/dev/null bs=4096 count=1 skip=$((RANDOM * 8)) iflag=direct status=none &
  done
  sleep 10
  echo "nudge: a direct read of /dev/$d from each CPU; in flight before: $1 $2, 10 s on: $(cat $q/inflight)"
done
"""


def guest_u16(g: Guest, addr: int) -> int:
    """A 16-bit word of guest-physical memory, read through the monitor's xp command."""
    out = g.qmp.execute("human-monitor-command", {"command-line": f"xp /1hx {addr:#x}"})
    return int(str(out).split(":")[-1].strip(), 16)


def read_ring(g: Guest, st: dict[str, Any]) -> dict[str, int]:
    """The split ring's words as the guest wrote them (virtio 1.x layout): the avail ring's flags and
    idx with the used_event after its entries, the used ring's flags and idx with the avail_event
    after its entries. Beside QEMU's last_avail_idx, shadow_avail_idx, used_idx and signalled_used
    they tell a doorbell the device never saw from an interrupt the guest never saw."""
    num, avail, used = int(st["vring-num"]), int(st["vring-avail"]), int(st["vring-used"])
    return {
        "avail.flags": guest_u16(g, avail),
        "avail.idx": guest_u16(g, avail + 2),
        "used_event": guest_u16(g, avail + 4 + 2 * num),
        "used.flags": guest_u16(g, used),
        "used.idx": guest_u16(g, used + 2),
        "avail_event": guest_u16(g, used + 4 + 8 * num),
    }


def ring_words(g: Guest, st: dict[str, Any]) -> str:
    """read_ring() as one line, or why it could not be read."""
    try:
        words = read_ring(g, st)
    except Exception as e:  # a diagnosis must not hide the failure it diagnoses
        return f"(not readable: {e})"
    line = ", ".join(f"{k} {v}" for k, v in words.items())
    verdict = ring_verdict(st, words)
    return line + (f"\n  verdict: {verdict}" if verdict else "")


def ring_verdict(st: dict[str, Any], words: dict[str, int]) -> str | None:
    """Name the lost completion interrupt when the state shows one: QEMU holds nothing (every request
    it took is in the used ring), yet the guest has not consumed the used ring's last entries, and
    QEMU's last signalled index is already past the used_event the guest asked for, so no later
    completion will interrupt. doc/harness.md, "Lost interrupts under TCG", explains the cause."""
    try:
        inuse, signalled = int(st["inuse"]), int(st["signalled-used"])
        ring_size = int(st.get("vring-num", 256))
        used_idx, used_event = words["used.idx"], words["used_event"]
    except (KeyError, TypeError, ValueError):
        return None
    unconsumed = (used_idx - used_event) % 0x10000  # more than a ring: the event is ahead, not behind
    past_event = (signalled - used_event) % 0x10000
    if inuse or not 0 < unconsumed <= ring_size or not 0 < past_event <= unconsumed:
        return None
    return (
        f"lost completion interrupt: QEMU completed every request it took, {unconsumed} of them after "
        f"the guest's used_event {used_event}, and signalled up to {signalled} without the guest "
        "running its handler; every later completion is past that event too, so this queue will not "
        "interrupt again (the event-index race of a TCG guest translated without barriers, "
        'doc/harness.md "Lost interrupts under TCG")'
    )


def virtio_queues(g: Guest) -> str:
    """QEMU's view of every virtio-blk queue (x-query-virtio-queue-status: which requests the device
    took from the ring, last_avail_idx and inuse, completed, used_idx, and signalled), and its
    block backend's counters (query-blockstats)."""
    lines = []
    try:
        for dev in g.qmp.execute("x-query-virtio"):
            if dev.get("name") != "virtio-blk":
                continue
            # one request queue per vCPU by default (QEMU >= 5.2): the stuck one may be any of them
            for queue in range(64):
                try:
                    st = g.qmp.execute("x-query-virtio-queue-status", {"path": dev["path"], "queue": queue})
                except Exception:  # past the last queue
                    break
                state = ", ".join(f"{k} {v}" for k, v in st.items() if k != "name")
                lines.append(f"{dev['path']} queue {queue}: {state}")
                lines.append(f"  guest's rings: {ring_words(g, st)}")
        for b in g.qmp.execute("query-blockstats"):
            st = b.get("stats", {})
            keep = ("rd_operations", "wr_operations", "flush_operations", "failed_wr_operations",
                    "invalid_wr_operations", "idle_time_ns")  # fmt: skip
            lines.append(f"{b.get('qdev', b.get('device'))}: " + ", ".join(f"{k} {st.get(k)}" for k in keep))
    except Exception as e:  # a diagnosis must not hide the failure it diagnoses
        lines.append(f"(QEMU's virtio state not available: {e})")
    return "\n".join(lines)


def diagnose_stall(g: Guest) -> str:
    """After watched() reported a stall: QEMU's queue state, then one new request on each stuck
    disk and whether the old one completed with it, then QEMU's state again. Printed as it goes,
    so that a guest that stops answering still leaves what was learnt."""
    out = [f"QEMU virtio-blk queues at the stall:\n{virtio_queues(g)}"]
    print(out[-1], flush=True)
    try:
        nudge = g.run(NUDGE, timeout=120)
        out.append(nudge.stdout + nudge.stderr)
    except Exception as e:  # the guest may not answer any more
        out.append(f"(the nudge did not return: {str(e)[:300]})")
    print(out[-1], flush=True)
    out.append(f"QEMU virtio-blk queues after the nudge:\n{virtio_queues(g)}")
    print(out[-1], flush=True)
    return "\n".join(out)


def watched(cmd: str, stall_s: int = 180, disks: str = "vd", sysrq: bool = True) -> str:
    """cmd in the background of one guest command, with a watchdog: when no virtio disk completes
    an I/O for stall_s seconds while it runs, print the block layer's state (in-flight counts, the
    writeback throttle, the hardware queue, blocked tasks) and exit with STALL_RC instead of
    waiting for the host's timeout. Output and exit status are cmd's otherwise. Polls every 5 s
    (a fork or two; the same in a tracked run and its reference). disks: the prefix of the
    watched devices' names in /proc/diskstats; sysrq: list the blocked tasks (sysrq w) in the dump."""
    return rf"""dump() {{ {STALL_DUMP}
}}
out=$(mktemp); ( {cmd} ) > "$out" 2>&1 & p=$!
stall={stall_s}; quiet=0; last=""; sysrq={int(sysrq)}
while kill -0 $p 2>/dev/null; do
  sleep {min(5, stall_s)}
  now=$(awk '$3 ~ /^{disks}/ {{print $4, $8}}' /proc/diskstats)
  if [ "$now" = "$last" ]; then quiet=$((quiet + {min(5, stall_s)})); else quiet=0; last=$now; fi
  if [ $quiet -ge $stall ]; then cat "$out"; dump; pkill -P $p; kill $p; exit {STALL_RC}; fi
done
wait $p; rc=$?; cat "$out"; rm -f "$out"; exit $rc"""
