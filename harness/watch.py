"""Console watcher: finds kernel warnings, oopses, panics, lockdep reports, stalls... in serial output.

Feed it console text as it arrives (`feed`), in any chunking; it splits lines, strips `\\r`, and records a
`Finding` for each line that starts a kernel report. Lines such as `Call Trace:` or `---[ end trace` that
follow a report within a few dozen lines belong to that report rather than starting a new one.

Excerpts are computed when findings are read, so they include the lines that arrived after the head line
(up to the `---[ end ...` marker or `AFTER` lines).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

# (kind, regex). Order matters: the first match names the finding, so specific patterns come first.
PRIMARY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("lockdep", r"possible (?:circular|recursive) locking|inconsistent lock state|lock inversion"),
    ("kasan", r"\bKASAN\b"),
    ("ubsan", r"\bUBSAN\b"),
    ("kmemleak", r"kmemleak: \d+ new suspected memory leak|unreferenced object 0x"),
    ("stack-protector", r"stack-protector"),
    ("soft-lockup", r"soft lockup"),
    ("hard-lockup", r"hard LOCKUP"),
    ("rcu-stall", r"RCU stall|rcu_\w+ detected stalls|rcu: INFO: \w+ detected"),
    ("hung-task", r"INFO: task .* blocked for more than|hung_task"),
    ("panic", r"Kernel panic"),
    ("gpf", r"general protection fault"),
    ("oops", r"\bOops\b"),
    ("bug", r"\bBUG:"),
    ("warning", r"\bWARNING:"),
)
# Reports after which the kernel cannot be trusted to finish the command: a test ends at once.
FATAL_KINDS = frozenset({"panic", "oops", "gpf", "hung-task"})
# Lines that belong to the report before them (or start one when there is none).
SECONDARY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("call-trace", r"Call Trace"),
    ("deadlock", r"(?i)\bdeadlock\b"),
)
END_RE = re.compile(r"---\[ end ")
# Known-benign lines that match a pattern (boot noise of the stock kernels under TCG).
BENIGN_PATTERNS: tuple[str, ...] = (
    r"RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable",
    r"hung_task_timeout_secs\" disables this message",  # part of a hung-task report, never a report itself
)

BEFORE = 5  # lines of context before the head line
AFTER = 40  # at most this many lines after it (fewer when an `---[ end ...` line comes first)
MERGE_WINDOW = 60  # a secondary line within this many lines of a report's last line joins that report

_PRIMARY = [(k, re.compile(p)) for k, p in PRIMARY_PATTERNS]
_SECONDARY = [(k, re.compile(p)) for k, p in SECONDARY_PATTERNS]
_BENIGN = [re.compile(p) for p in BENIGN_PATTERNS]


@dataclass(frozen=True)
class Finding:
    """One kernel report seen on the console."""

    kind: str  # e.g. "warning", "panic", "lockdep" (see PRIMARY_PATTERNS)
    line: str  # the head line
    line_no: int  # 1-based console line number of the head line
    excerpt: str  # BEFORE lines before, the head line, and the lines after it
    kinds: tuple[str, ...] = ()  # every pattern kind seen in this report (head first)
    expected: bool = False  # matched by an expect_kernel_finding() block


@dataclass
class _Report:
    kind: str
    index: int  # 0-based line index of the head line
    last: int  # 0-based line index of the last line that joined the report
    kinds: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # head line and merged secondary lines
    expected: bool = False


@dataclass
class Expectation:
    """Patterns that mark matching findings as expected while active; `hits` counts them."""

    patterns: tuple[re.Pattern[str], ...]
    active: bool = True
    hits: int = 0

    def matches(self, lines: list[str]) -> bool:
        return any(p.search(line) for p in self.patterns for line in lines)


def classify(line: str) -> tuple[str, bool] | None:
    """(kind, is_primary) for a console line that matches a pattern, else None."""
    if END_RE.search(line) or any(b.search(line) for b in _BENIGN):
        return None
    for kind, rx in _PRIMARY:
        if rx.search(line):
            return kind, True
    for kind, rx in _SECONDARY:
        if rx.search(line):
            return kind, False
    return None


class ConsoleWatcher:
    """Thread-safe incremental scanner of console output."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._partial = ""
        self._reports: list[_Report] = []
        self._expectations: list[Expectation] = []

    # -- input -----------------------------------------------------------------------------------
    def feed(self, text: str) -> None:
        with self._lock:
            data = self._partial + text
            parts = data.split("\n")
            self._partial = parts.pop()
            for raw in parts:
                self._add_line(raw.rstrip("\r"))

    def flush(self) -> None:
        """Treat a pending partial line as complete (call when the console reached EOF)."""
        with self._lock:
            if self._partial:
                self._add_line(self._partial.rstrip("\r"))
                self._partial = ""

    def _add_line(self, line: str) -> None:
        self._lines.append(line)
        hit = classify(line)
        if hit is None:
            return
        kind, primary = hit
        idx = len(self._lines) - 1
        last = self._reports[-1] if self._reports else None
        if not primary and last is not None and idx - last.last <= MERGE_WINDOW:
            last.last = idx
            last.kinds.append(kind)
            last.lines.append(line)
            self._apply_expectations(last)
            return
        report = _Report(kind=kind, index=idx, last=idx, kinds=[kind], lines=[line])
        self._reports.append(report)
        self._apply_expectations(report)

    def _apply_expectations(self, report: _Report) -> None:
        if report.expected:
            return
        for exp in self._expectations:
            if exp.active and exp.matches(report.lines):
                report.expected = True
                exp.hits += 1
                return

    # -- expectations ----------------------------------------------------------------------------
    def expect(self, *patterns: str) -> Expectation:
        """Start marking findings that match any of the regex `patterns` as expected."""
        exp = Expectation(tuple(re.compile(p) for p in patterns))
        with self._lock:
            self._expectations.append(exp)
        return exp

    def end_expectation(self, exp: Expectation) -> None:
        with self._lock:
            exp.active = False

    # -- output ----------------------------------------------------------------------------------
    @property
    def line_count(self) -> int:
        with self._lock:
            return len(self._lines)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def findings(self, since_line: int = 0, include_expected: bool = True) -> list[Finding]:
        """Findings whose head is at or after 0-based line index `since_line`."""
        with self._lock:
            return [
                self._snapshot(r)
                for r in self._reports
                if r.index >= since_line and (include_expected or not r.expected)
            ]

    def unexpected(self) -> list[Finding]:
        return self.findings(include_expected=False)

    def fatal(self, since_line: int = 0) -> list[Finding]:
        """Unexpected reports since `since_line` of a FATAL_KINDS kind, and every panic."""
        return [
            f
            for f in self.findings(since_line)
            if f.kind == "panic" or (not f.expected and FATAL_KINDS.intersection(f.kinds or (f.kind,)))
        ]

    def _snapshot(self, r: _Report) -> Finding:
        start = max(0, r.index - BEFORE)
        end = min(len(self._lines), r.index + 1 + AFTER)
        for i in range(r.index + 1, end):
            if END_RE.search(self._lines[i]):
                end = i + 1
                break
        excerpt = "\n".join(self._lines[start:end])
        return Finding(
            kind=r.kind,
            line=self._lines[r.index],
            line_no=r.index + 1,
            excerpt=excerpt,
            kinds=tuple(r.kinds),
            expected=r.expected,
        )


def scan(text: str) -> list[Finding]:
    """All findings in a complete console text (convenience for logs and tests)."""
    w = ConsoleWatcher()
    w.feed(text)
    w.flush()
    return w.findings()
