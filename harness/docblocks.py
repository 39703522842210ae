"""The runnable shell blocks of the documentation: markers, extraction, and the guest set-ups they run in.

A document (README.md, INSTALL.md, doc/*.md) marks a fenced shell block as runnable with an HTML
comment on the line directly before its opening fence; man pages built by doc/mkman.py and rendered
markdown do not show the comments:

    <!-- runnable-env: sdb1-mnt-data -->     once, anywhere in the doc: it has runnable blocks, and
                                             the guest set-up (ENVIRONMENTS below) they run in
    <!-- runnable -->                        the next block runs in a guest (tests/guest/test_docs.py)
    ```sh
    dbdctl setup-snapshot /dev/sdb1 /mnt/data/.datto 0
    ```
    <!-- runnable: dkms -->                  the DKMS install of INSTALL.md (tests/guest/test_dkms.py)

The blocks of one document run in one guest, in document order, each with `bash -e` (the first
failing command fails the block), after the document's environment was set up. The set-ups make the
guest look like the machine the document talks about (its device names and mount points), so the
blocks are the commands a reader types, unchanged.

Errors (DocBlockError, naming the document and line): a marker not directly followed by an opening
``sh``/``bash`` fence, an unclosed fence, an empty runnable block, a malformed marker, an unknown
kind or environment, marked blocks without a `runnable-env` line, or a `runnable-env` line in a
document that marks no block (a claim without blocks: markers were lost).

Pure functions only; tests/unit/test_doc_blocks.py covers them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_PATTERNS = ("README.md", "INSTALL.md", "doc/*.md")
KINDS = ("guest", "dkms")
SHELL_LANGS = ("sh", "bash", "shell")

_MARKER_START = re.compile(r"\s*<!--\s*runnable\b")
_MARKER = re.compile(r"\s*<!--\s*runnable(?::\s*(?P<kind>[A-Za-z][\w-]*))?\s*-->\s*$")
_ENV = re.compile(r"\s*<!--\s*runnable-env:\s*(?P<env>[A-Za-z][\w.-]*)\s*-->\s*$")
_FENCE_OPEN = re.compile(r"(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


class DocBlockError(ValueError):
    """A marking error; the message starts with ``doc:line:``."""

    def __init__(self, doc: str, line: int, message: str) -> None:
        super().__init__(f"{doc}:{line}: {message}")
        self.doc = doc
        self.line = line


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the checkout, e.g. "INSTALL.md"
    line: int  # 1-based line of the opening fence
    kind: str  # one of KINDS
    text: str  # the commands, newline-terminated

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> list[str]:
        """The non-blank, non-comment lines."""
        return [ln for ln in self.text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass(frozen=True)
class DocBlocks:
    doc: str
    env: str | None  # the runnable-env of the document (guest blocks)
    env_line: int
    blocks: tuple[Block, ...]

    def of_kind(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]


@dataclass(frozen=True)
class DocEnv:
    summary: str
    setup: str  # bash, run with -e in the guest before the document's first block


# --------------------------------------------------------------------------------------------------
# Guest environments
#
# Every guest of tests/guest/test_docs.py first gets what INSTALL.md sections 1 and 2 install: the
# dattobd module of this checkout loaded (insmod of the target's build instead of `modprobe`) and
# `dbdctl`/`update-img` on PATH (wrappers of the checkout's pydbd instead of `pip install`), and one
# blank data disk, /dev/vdb. Each environment then prepares what its document assumes. The blocks
# run as root with the checkout (read-only, at /src) as current directory.

_SDB1 = """\
# /dev/sdb1: a partition of the data disk under the name the documents use
[ -b /dev/vdb1 ] || {{ echo ',,L' | sfdisk -q /dev/vdb; }}
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vdb1
IFS=: read -r maj min < /sys/class/block/vdb1/dev
rm -f /dev/sdb1 && mknod /dev/sdb1 b "$maj" "$min"
mkdir -p {mnt} && mount /dev/sdb1 {mnt}
# /backup: where the backup images go (tmpfs: room for a copy of /dev/sdb1)
mkdir -p /backup && mount -t tmpfs -o size=160m tmpfs /backup
"""

_SECOND_SNAPSHOT = """\
# minor 0 was set up with /data/.datto0 and copied to /backup/sdb1.img, then went incremental; files
# changed; the second snapshot was taken with /data/.datto1
dbdctl setup-snapshot /dev/sdb1 /data/.datto0 0
dd if=/dev/datto0 of=/backup/sdb1.img bs=1M status=none
dbdctl transition-to-incremental 0
dd if=/dev/urandom of=/data/changed bs=64k count=40 status=none && sync
dbdctl transition-to-snapshot /data/.datto1 0
"""

ENVIRONMENTS: dict[str, DocEnv] = {
    "sdb1-mnt-data": DocEnv(
        "ext4 on /dev/sdb1 mounted at /mnt/data; an empty /backup",
        _SDB1.format(mnt="/mnt/data"),
    ),
    "sdb1-data": DocEnv(
        "ext4 on /dev/sdb1 mounted at /data; an empty /backup",
        _SDB1.format(mnt="/data"),
    ),
    "sdb1-data-second-snapshot": DocEnv(
        "sdb1-data, then minor 0 in snapshot mode with /data/.datto1, its previous COW file "
        "/data/.datto0 and the image of the first snapshot in /backup/sdb1.img",
        _SDB1.format(mnt="/data") + _SECOND_SNAPSHOT,
    ),
}

# After each document: every tracer destroyed, the environment's mounts and names gone.
TEARDOWN = """\
for m in $(sed -n 's/.*"minor": *\\([0-9]*\\).*/\\1/p' /proc/datto-info); do dbdctl destroy "$m"; done
for d in /mnt/data /data /backup; do if mountpoint -q "$d"; then umount "$d"; fi; done
rm -rf /dev/sdb1 /etc/datto
"""


# --------------------------------------------------------------------------------------------------
# Extraction


def parse(text: str, doc: str, envs: dict[str, DocEnv] | None = None) -> DocBlocks:
    """The runnable blocks of one document (``doc`` names it in errors); ``envs``: the known
    environments (default ENVIRONMENTS)."""
    known = ENVIRONMENTS if envs is None else envs
    lines = text.splitlines()
    blocks: list[Block] = []
    env: str | None = None
    env_line = 0
    pending: tuple[int, str] | None = None  # (line, kind) of a marker waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        lineno = i + 1
        fence = _FENCE_OPEN.match(line)
        if pending is not None and fence is None:
            raise DocBlockError(doc, pending[0], "runnable marker not directly followed by a ``` fence")
        if fence is not None:
            end = _fence_end(lines, i, fence.group("fence"))
            if end is None:
                raise DocBlockError(doc, lineno, "code fence is never closed")
            if pending is not None:
                lang = fence.group("info").split()[0] if fence.group("info") else ""
                if lang not in SHELL_LANGS:
                    raise DocBlockError(
                        doc, lineno, f"a runnable block must be a ```sh block, not {lang or 'plain'!r}"
                    )
                body = "".join(ln + "\n" for ln in _dedent(lines[i + 1 : end], len(fence.group("indent"))))
                if not body.strip():
                    raise DocBlockError(doc, lineno, "empty runnable block")
                blocks.append(Block(doc, lineno, pending[1], body))
                pending = None
            i = end + 1
            continue
        m_env = _ENV.match(line)
        if m_env:
            if env is not None:
                raise DocBlockError(doc, lineno, f"second runnable-env (the first is on line {env_line})")
            env, env_line = m_env.group("env"), lineno
            if env not in known:
                raise DocBlockError(doc, lineno, f"unknown runnable-env {env!r}; known: {', '.join(known)}")
        elif _MARKER_START.match(line):
            m = _MARKER.match(line)
            if m is None:
                raise DocBlockError(doc, lineno, f"malformed runnable marker {line.strip()!r}")
            kind = m.group("kind") or "guest"
            if kind not in KINDS:
                raise DocBlockError(doc, lineno, f"unknown runnable kind {kind!r}; known: {', '.join(KINDS)}")
            pending = (lineno, kind)
        i += 1
    if pending is not None:
        raise DocBlockError(doc, pending[0], "runnable marker at the end of the document")
    guest = [b for b in blocks if b.kind == "guest"]
    if guest and env is None:
        raise DocBlockError(doc, guest[0].line, "runnable blocks but no <!-- runnable-env: NAME --> line")
    if env is not None and not guest:
        raise DocBlockError(doc, env_line, "claims runnable blocks (runnable-env) but marks none")
    return DocBlocks(doc, env, env_line, tuple(blocks))


def _fence_end(lines: list[str], start: int, fence: str) -> int | None:
    close = re.compile(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    for j in range(start + 1, len(lines)):
        if close.match(lines[j]):
            return j
    return None


def _dedent(body: list[str], indent: int) -> list[str]:
    """Drop up to the opening fence's indentation from each line (CommonMark)."""
    out = []
    for ln in body:
        strip = min(indent, len(ln) - len(ln.lstrip(" ")))
        out.append(ln[strip:])
    return out


def doc_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for pattern in DOC_PATTERNS:
        files.extend(sorted(root.glob(pattern)))
    return files


def collect(root: Path = ROOT) -> list[DocBlocks]:
    """Every document of DOC_PATTERNS under root, parsed (DocBlockError on the first marking error)."""
    return [parse(p.read_text(), p.relative_to(root).as_posix()) for p in doc_files(root)]


def guest_script(block: Block) -> str:
    """What the guest runs for a block: its text under ``bash -e``, with a trace of each command."""
    return "set -e -x\n" + block.text


def failure_report(block: Block, rc: int, stdout: str, stderr: str) -> str:
    """The message of a failed block: where it is, what it ran, what it printed."""
    return (
        f"{block.where}: runnable block exited {rc}\n"
        f"--- block ({block.doc}, line {block.line})\n{block.text}"
        f"--- stdout\n{stdout}"
        f"--- stderr (bash -x trace and errors)\n{stderr}"
    )
