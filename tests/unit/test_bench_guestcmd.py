"""The benchmarks' guest-command watchdog, run by the host's bash (host only)."""

from __future__ import annotations

import subprocess

from benchmarks.guestcmd import STALL_RC, ring_verdict, ring_words, watched


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_output_and_status_pass_through() -> None:
    r = bash(watched("echo out; echo err >&2; exit 3", stall_s=30))
    assert r.returncode == 3
    assert r.stdout.splitlines() == ["out", "err"]  # the command's stderr joins its stdout


def test_a_command_without_io_progress_is_stopped_with_the_block_state() -> None:
    # no device matches the prefix, so no I/O ever completes on a watched disk
    r = bash(watched("echo started; sleep 50; echo never", stall_s=2, disks="no-such-disk", sysrq=False))
    assert r.returncode == STALL_RC
    assert r.stdout.startswith("started\n=== no I/O completed on any virtio disk for 2 s")
    assert "never" not in r.stdout


class FakeQMP:
    """Answers the monitor's `xp /1hx ADDR` from a dict of guest-physical 16-bit words."""

    def __init__(self, words: dict[int, int]) -> None:
        self.words = words

    def execute(self, cmd: str, args: dict[str, str]) -> str:
        assert cmd == "human-monitor-command"
        addr = int(args["command-line"].split()[-1], 16)
        return f"{addr:016x}: {self.words[addr]:#06x}\r\n"


class FakeGuest:
    def __init__(self, words: dict[int, int]) -> None:
        self.qmp = FakeQMP(words)


def test_ring_words_read_the_split_ring_layout() -> None:
    avail, used, num = 0x1000, 0x2000, 4
    words = {avail: 1, avail + 2: 13, avail + 4 + 2 * num: 12, used: 0, used + 2: 12, used + 4 + 8 * num: 13}
    st = {"vring-num": num, "vring-avail": avail, "vring-used": used}
    text = ring_words(FakeGuest(words), st)  # type: ignore[arg-type]
    assert text == "avail.flags 1, avail.idx 13, used_event 12, used.flags 0, used.idx 12, avail_event 13"


def test_ring_words_never_raise() -> None:
    st = {"vring-num": 4, "vring-avail": 0x1000, "vring-used": 0x2000}
    assert ring_words(FakeGuest({}), st).startswith("(not readable: ")  # type: ignore[arg-type]


def test_ring_verdict_names_a_lost_completion_interrupt() -> None:
    # the state a 5.10 benchmark guest hung in: 96 completions past the guest's used_event, all
    # signalled (as far as QEMU knows), nothing held by QEMU
    st = {"inuse": 0, "signalled-used": 63564}
    words = {"used.idx": 63564, "used_event": 63468}
    verdict = ring_verdict(st, words)
    assert verdict is not None and "lost completion interrupt" in verdict and "96 of them" in verdict
    # the nudge's read completed too, and did not interrupt either
    assert ring_verdict({"inuse": 0, "signalled-used": 63565}, {"used.idx": 63565, "used_event": 63468})
    # across the 16-bit wrap
    assert ring_verdict({"inuse": 0, "signalled-used": 5}, {"used.idx": 5, "used_event": 65530})


def test_ring_verdict_stays_quiet_otherwise() -> None:
    idle = {"used.idx": 700, "used_event": 700}
    assert ring_verdict({"inuse": 0, "signalled-used": 700}, idle) is None  # all consumed
    busy = {"used.idx": 700, "used_event": 690}
    assert ring_verdict({"inuse": 3, "signalled-used": 700}, busy) is None  # QEMU still holds requests
    # QEMU has not reached the event yet: its next completion will interrupt
    assert ring_verdict({"inuse": 0, "signalled-used": 689}, {"used.idx": 689, "used_event": 690}) is None
    assert ring_verdict({}, busy) is None  # an older QEMU without these fields
