"""Convert the man-page markdown files of doc/ (dbdctl.8.md, update-img.8.md) to roff man pages.

    python doc/mkman.py OUTDIR [FILE.md ...]

Without files, every ``doc/*.8.md`` is converted; ``FILE.md`` becomes ``OUTDIR/FILE`` (the ``.md``
dropped). View a result with ``man -l OUTDIR/dbdctl.8``. Standard library only.

The markdown is the small subset those files use:

* ``# name(8)`` on the first line: the title (``.TH``); ``## SECTION`` -> ``.SH``, ``### Sub`` -> ``.SS``;
* paragraphs (consecutive lines, joined), ``- item`` bullets and ``1. item`` numbered items;
* definition items, pandoc style: a term line followed by ``:   description`` (continuation lines
  indented by four spaces, a blank line and ``:   `` for a further paragraph) -> ``.TP``;
* fenced code blocks (```` ``` ````) -> no-fill, indented;
* inline ``**bold**``, ``*italic*``, ```code``` (set in bold, as man pages show literal text) and
  ``[text](target)`` (the text is kept, the target dropped);
* HTML comments (``<!-- ... -->`` on their own lines) are skipped.

The date in ``.TH`` comes from ``$SOURCE_DATE_EPOCH`` when set (reproducible builds), else today.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCE = "pydbd 0.12.1"
MANUALS = {"1": "User Commands", "8": "System Administration Commands"}
DOC_DIR = Path(__file__).resolve().parent

_TITLE = re.compile(r"#\s+([A-Za-z0-9_.+-]+)\((\d[a-z]*)\)\s*$")
_HEADING = re.compile(r"(#{2,3})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"[-*]\s+(.*)$")
_NUMBERED = re.compile(r"(\d+)\.\s+(.*)$")
_DEFINITION = re.compile(r":\s{1,4}(.*)$")
_FENCE = re.compile(r"\s*(```|~~~)")
# One inline element: code first (its content is literal), then bold, italic and links.
_INLINE = re.compile(
    r"(?P<code>`+)(?P<code_text>.+?)(?P=code)"
    r"|\*\*(?P<bold>.+?)\*\*"
    r"|(?<![\w*])\*(?P<italic>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*])"
    r"|(?<!\w)_(?P<uitalic>[^_\s](?:[^_]*[^_\s])?)_(?!\w)"
    r"|\[(?P<link>[^\]]+)\]\((?P<target>[^)]*)\)"
)


class MarkdownError(ValueError):
    """The input is outside the supported subset; the message names the line."""


@dataclass(frozen=True)
class Page:
    name: str
    section: str
    roff: str
    sections: tuple[str, ...]  # the ``.SH`` titles, in order


# --------------------------------------------------------------------------------------------------
# Escaping


def escape_text(text: str) -> str:
    """Plain text for roff: backslashes escaped, and a line may not start with a control character."""
    return text.replace("\\", "\\e")


def _literal(text: str) -> str:
    """Literal text (code): also every hyphen is a real minus, so options copy and paste correctly."""
    return escape_text(text).replace("-", "\\-")


def inline(text: str) -> str:
    """Convert the inline markup of one paragraph to roff font escapes."""
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(escape_text(text[pos : m.start()]))
        if m.group("code") is not None:
            # \% keeps groff from hyphenating a path or an option name across lines
            out.append(f"\\fB\\%{_literal(m.group('code_text').strip())}\\fR")
        elif m.group("bold") is not None:
            out.append(f"\\fB{inline_nested(m.group('bold'))}\\fR")
        elif m.group("italic") is not None:
            out.append(f"\\fI{inline_nested(m.group('italic'))}\\fR")
        elif m.group("uitalic") is not None:
            out.append(f"\\fI{inline_nested(m.group('uitalic'))}\\fR")
        else:
            out.append(inline(m.group("link")))
        pos = m.end()
    out.append(escape_text(text[pos:]))
    return "".join(out)


def inline_nested(text: str) -> str:
    """Inside bold or italic: code spans keep the surrounding font instead of resetting to roman."""
    converted = inline(text)
    return converted.replace("\\fR", "\\fP")


def _protect_line_start(line: str) -> str:
    # A text line starting with '.' or "'" would be read as a request.
    return "\\&" + line if line.startswith((".", "'")) else line


def text_lines(text: str) -> list[str]:
    """A paragraph's text as roff input lines (one sentence per line is not required by man)."""
    converted = inline(" ".join(text.split()))
    return [_protect_line_start(converted)] if converted else []


def code_line(line: str) -> str:
    return _protect_line_start(escape_text(line).replace("-", "\\-"))


# --------------------------------------------------------------------------------------------------
# Block structure


@dataclass
class _Lines:
    """The input lines with a cursor; comments are removed up front."""

    items: list[str]
    pos: int = 0

    def peek(self) -> str | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def take(self) -> str:
        line = self.items[self.pos]
        self.pos += 1
        return line


def _strip_comments(lines: Sequence[str]) -> list[str]:
    kept: list[str] = []
    in_comment = False
    for line in lines:
        stripped = line.strip()
        if in_comment:
            in_comment = "-->" not in stripped
            continue
        if stripped.startswith("<!--"):
            in_comment = "-->" not in stripped
            continue
        kept.append(line.rstrip())
    return kept


def _is_block_start(line: str) -> bool:
    return bool(
        _HEADING.match(line)
        or _BULLET.match(line)
        or _NUMBERED.match(line)
        or _DEFINITION.match(line)
        or _FENCE.match(line)
    )


def _continuation(src: _Lines, indent: int = 0) -> list[str]:
    """Lines that continue a paragraph or list item (stops at a blank line or a new block)."""
    parts: list[str] = []
    while (line := src.peek()) is not None and line.strip():
        if indent and not line.startswith(" " * indent):
            break
        if not indent and _is_block_start(line):
            break
        parts.append(src.take().strip())
    return parts


def _fenced(src: _Lines, opening: str) -> list[str]:
    fence = _FENCE.match(opening)
    assert fence is not None
    out = [".PP", ".RS 4", ".nf"]
    while True:
        line = src.peek()
        if line is None:
            raise MarkdownError(f"line {src.pos}: code block not closed")
        src.take()
        if line.strip().startswith(fence.group(1)):
            break
        out.append(code_line(line))
    return [*out, ".fi", ".RE"]


def _definition_body(src: _Lines, first: str) -> list[str]:
    """The description after a term: ``:   text`` lines, each starting a paragraph."""
    out: list[str] = []
    text = first
    while True:
        out += text_lines(" ".join([text, *_continuation(src, indent=4)]))
        # A blank line followed by another ':' line continues the same item.
        if src.peek() == "" and src.pos + 1 < len(src.items):
            nxt = _DEFINITION.match(src.items[src.pos + 1])
            if nxt:
                src.pos += 2
                out.append(".IP")
                text = nxt.group(1)
                continue
        return out


def _blocks(src: _Lines) -> Iterator[tuple[str, list[str]]]:
    """(kind, roff lines) per block; kind is "sh" for a section heading (its title in the lines)."""
    while (line := src.peek()) is not None:
        if not line.strip():
            src.take()
            continue
        src.take()
        if heading := _HEADING.match(line):
            level, title = heading.groups()
            if level == "##":
                yield "sh", [title.upper()]
            else:
                yield "ss", [f".SS {escape_text(title)}"]
        elif _FENCE.match(line):
            yield "code", _fenced(src, line)
        elif bullet := _BULLET.match(line):
            body = " ".join([bullet.group(1), *_continuation(src, indent=2)])
            yield "item", [".IP \\(bu 2", *text_lines(body)]
        elif numbered := _NUMBERED.match(line):
            body = " ".join([numbered.group(2), *_continuation(src, indent=3)])
            yield "item", [f".IP {numbered.group(1)}. 4", *text_lines(body)]
        elif src.peek() is not None and (definition := _DEFINITION.match(src.peek() or "")):
            src.take()
            yield "item", [".TP", *text_lines(line), *_definition_body(src, definition.group(1))]
        elif _DEFINITION.match(line):
            raise MarkdownError(f"line {src.pos}: definition without a term line before it")
        else:
            yield "para", [".PP", *text_lines(" ".join([line.strip(), *_continuation(src)]))]


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        when = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC).date()
    else:
        when = datetime.date.today()
    return when.isoformat()


def _quote(arg: str) -> str:
    return '"' + arg.replace('"', "\\(dq") + '"'


def convert(markdown: str, date: str | None = None) -> Page:
    """Convert one man-page markdown document; MarkdownError when it is outside the subset."""
    lines = _strip_comments(markdown.splitlines())
    while lines and not lines[0].strip():
        lines.pop(0)
    title = _TITLE.match(lines[0]) if lines else None
    if title is None:
        raise MarkdownError("line 1: the first line must be the title, e.g. '# dbdctl(8)'")
    name, section = title.groups()
    manual = MANUALS.get(section[0], "")
    out = [
        f'.\\" Generated by doc/mkman.py from {name}.{section}.md; edit the markdown, not this file.',
        f".TH {name.upper()} {section} {_quote(date or _date())} {_quote(SOURCE)} {_quote(manual)}",
    ]
    sections: list[str] = []
    previous = "sh"
    for kind, block in _blocks(_Lines(lines[1:])):
        if kind == "sh":
            sections.append(block[0])
            out.append(f".SH {_quote(escape_text(block[0]))}")
        elif kind == "para" and sections == ["NAME"] and previous == "sh":
            # whatis/apropos and mandb expect "name \- description" in NAME
            out += [line.replace(" - ", " \\- ", 1) for line in block[1:]]
        elif kind == "para" and previous in ("sh", "ss"):
            out += block[1:]  # a paragraph right after a heading needs no .PP
        else:
            out += block
        previous = kind
    if not sections:
        raise MarkdownError("no '## SECTION' headings")
    return Page(name, section, "\n".join(out) + "\n", tuple(sections))


def convert_file(source: Path, outdir: Path, date: str | None = None) -> Path:
    """Write ``outdir/<source name without .md>``; returns its path."""
    page = convert(source.read_text(encoding="utf-8"), date)
    target = outdir / source.name.removesuffix(".md")
    target.write_text(page.roff, encoding="utf-8")
    return target


def default_sources() -> list[Path]:
    return sorted(DOC_DIR.glob("*.[1-8].md"))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python doc/mkman.py OUTDIR [FILE.md ...]", file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    outdir = Path(args[0])
    outdir.mkdir(parents=True, exist_ok=True)
    sources = [Path(a) for a in args[1:]] or default_sources()
    for source in sources:
        try:
            print(convert_file(source, outdir))
        except (OSError, MarkdownError) as exc:
            print(f"mkman: {source}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
