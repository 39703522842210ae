"""Console watcher on sample console text (host only)."""

from __future__ import annotations

from harness.watch import AFTER, BEFORE, ConsoleWatcher, classify, scan

BOOT = """\
[    0.000000] Linux version 6.1.0-54-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14)
[    0.000000] Command line: root=/dev/vda rw console=ttyS0 init=/usr/sbin/testinit panic=-1
[    0.101234] Spectre V2 : Mitigation: Retpolines
[    0.201234] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks
[    0.412345] random: crng init done
[    1.234567] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.
TESTINIT-START
bash-5.2#
"""

WARN = """\
[   12.000001] dattobd: loading out-of-tree module taints kernel.
[   12.000002] ------------[ cut here ]------------
[   12.000003] WARNING: CPU: 1 PID: 321 at /build/warn.c:5 warn_init+0x5/0x1000 [warn]
[   12.000004] Modules linked in: warn(OE+) 9p netfs
[   12.000005] CPU: 1 PID: 321 Comm: insmod Tainted: G           OE      6.1.0-54-amd64 #1  Debian 6.1.158-1
[   12.000006] RIP: 0010:warn_init+0x5/0x1000 [warn]
[   12.000007] Call Trace:
[   12.000008]  <TASK>
[   12.000009]  do_one_initcall+0x41/0x200
[   12.000010]  do_init_module+0x4c/0x1f0
[   12.000011]  </TASK>
[   12.000012] ---[ end trace 0000000000000000 ]---
[   12.000013] after the trace
"""

PANIC = """\
[   20.100000] sysrq: Trigger a crash
[   20.100001] Kernel panic - not syncing: sysrq triggered crash
[   20.100002] CPU: 0 PID: 400 Comm: bash Tainted: G           OE      6.1.0-54-amd64 #1  Debian 6.1.158-1
[   20.100003] Call Trace:
[   20.100004]  <TASK>
[   20.100005]  dump_stack_lvl+0x44/0x5c
[   20.100006]  panic+0x118/0x2ed
[   20.100007]  </TASK>
[   20.100008] Kernel Offset: 0x2a000000 from 0xffffffff81000000
[   20.100009] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---
"""


def test_clean_boot_has_no_findings() -> None:
    assert scan(BOOT) == []


def test_warning_with_trace_is_one_finding_with_context() -> None:
    found = scan(BOOT + WARN)
    assert [f.kind for f in found] == ["warning"]
    f = found[0]
    assert f.line.startswith("[   12.000003] WARNING: CPU: 1 PID: 321")
    assert f.kinds == ("warning", "call-trace")
    assert "cut here" in f.excerpt and "Modules linked in" in f.excerpt
    assert f.excerpt.splitlines()[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert "after the trace" not in f.excerpt
    assert f.line_no == BOOT.count("\n") + 3


def test_panic_detected() -> None:
    found = scan(PANIC)
    assert [f.kind for f in found] == ["panic"]
    assert "Call Trace" in found[0].excerpt


def test_feed_in_arbitrary_chunks_with_crlf() -> None:
    text = (BOOT + WARN + PANIC).replace("\n", "\r\n")
    w = ConsoleWatcher()
    for i in range(0, len(text), 7):
        w.feed(text[i : i + 7])
    assert [f.kind for f in w.findings()] == ["warning", "panic"]
    assert all("\r" not in f.excerpt for f in w.findings())


def test_partial_last_line_needs_flush() -> None:
    w = ConsoleWatcher()
    w.feed("[ 1.0] Kernel panic - not syncing: x")
    assert w.findings() == []
    w.flush()
    assert [f.kind for f in w.findings()] == ["panic"]


def test_pattern_catalogue() -> None:
    samples = {
        "bug": "[ 5.1] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "oops": "[ 5.2] Oops: 0002 [#1] PREEMPT SMP NOPTI",
        "gpf": "[ 5.3] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]",
        "kasan": "[ 5.4] BUG: KASAN: slab-out-of-bounds in foo+0x1/0x2",
        "lockdep": "[ 5.5] WARNING: possible circular locking dependency detected",
        "hung-task": "[ 5.6] INFO: task kworker/0:1:42 blocked for more than 120 seconds.",
        "panic": "[ 5.7] Kernel panic - not syncing: Fatal exception",
        "ubsan": "[ 5.8] UBSAN: array-index-out-of-bounds in drivers/x.c:12:3",
        "kmemleak": "[ 5.9] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
        "stack-protector": "[ 6.0] Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in",
        "rcu-stall": "[ 6.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        "soft-lockup": "[ 6.2] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [dd:123]",
        "hard-lockup": "[ 6.3] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1",
        "warning": "[ 6.4] WARNING: CPU: 0 PID: 1 at fs/x.c:1 f+0x1/0x2",
        "call-trace": "[ 6.5] Call Trace:",
        "deadlock": "[ 6.6]  *** DEADLOCK ***",
    }
    for kind, line in samples.items():
        hit = classify(line)
        assert hit is not None and hit[0] == kind, (kind, hit)
    for benign in ("[ 1.0] kmemleak: Kernel memory leak detector initialized", "hello Oopsie", "DEBUG: fine"):
        assert classify(benign) is None, benign


def test_lockdep_report_is_one_finding() -> None:
    report = ["[ 7.0] WARNING: possible circular locking dependency detected"]
    report += [f"[ 7.{i:02d}] chain line {i}" for i in range(1, 50)]
    report += ["[ 7.50]  *** DEADLOCK ***"] + [f"[ 7.{i}] more" for i in range(51, 70)]
    report += ["[ 7.70] Call Trace:"]
    found = scan("\n".join(report) + "\n")
    assert len(found) == 1 and found[0].kind == "lockdep"
    assert found[0].kinds == ("lockdep", "deadlock", "call-trace")


def test_isolated_call_trace_is_a_finding_and_excerpt_is_bounded() -> None:
    lines = [f"line {i}" for i in range(100)] + ["Call Trace:"] + [f"after {i}" for i in range(100)]
    found = scan("\n".join(lines) + "\n")
    assert [f.kind for f in found] == ["call-trace"]
    assert len(found[0].excerpt.splitlines()) == BEFORE + 1 + AFTER


def test_expectations_mark_findings_and_count_hits() -> None:
    w = ConsoleWatcher()
    w.feed(WARN)
    exp = w.expect("Kernel panic")
    w.feed(PANIC)
    w.end_expectation(exp)
    w.feed(WARN)
    assert exp.hits == 1
    assert [(f.kind, f.expected) for f in w.findings()] == [
        ("warning", False),
        ("panic", True),
        ("warning", False),
    ]
    assert [f.kind for f in w.unexpected()] == ["warning", "warning"]
    assert [f.kind for f in w.findings(since_line=WARN.count("\n"))] == ["panic", "warning"]


def test_expectation_matches_merged_lines() -> None:
    w = ConsoleWatcher()
    exp = w.expect("sysrq triggered crash")
    w.feed(PANIC)
    assert exp.hits == 1 and w.unexpected() == []


OOPS = """\
[   30.000001] BUG: kernel NULL pointer dereference, address: 0000000000000000
[   30.000002] #PF: supervisor write access in kernel mode
[   30.000003] Oops: 0002 [#1] PREEMPT SMP NOPTI
[   30.000004] RIP: 0010:oopsmod_thread+0x5/0x20 [oopsmod]
[   30.000005] Call Trace:
[   30.000006] ---[ end trace 0000000000000000 ]---
"""


def test_fatal_reports_end_a_command_but_warnings_and_expected_ones_do_not() -> None:
    w = ConsoleWatcher()
    w.feed(BOOT + WARN)
    assert w.fatal() == []  # a warning fails the test at its end, not the command at once
    mark = w.line_count
    w.feed(OOPS)
    assert {f.kind for f in w.fatal(mark)} >= {"oops"}
    assert w.fatal(w.line_count) == []  # only reports since the command started count

    expected = ConsoleWatcher()
    exp = expected.expect("NULL pointer|Oops")
    expected.feed(OOPS)
    expected.end_expectation(exp)
    assert len(expected.findings()) == 2 and expected.fatal() == []  # a test that provokes an oops

    panicked = ConsoleWatcher()
    exp = panicked.expect("Kernel panic")
    panicked.feed(PANIC)
    assert [f.kind for f in panicked.fatal()] == ["panic"]  # a panic ends the command even when expected
