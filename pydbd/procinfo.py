"""Parser for /proc/datto-info (spec §5).

The file looks like JSON but is printed field by field by the module, so it is parsed line by line
here rather than with json.loads:
- upstream does not escape paths, so a path may contain a bare `"` or `\\`; our module escapes them
  the JSON way.  A string value is everything between the first and the last quote of its line, and
  it is JSON-unescaped only when that succeeds;
- the last field (`state`) has no trailing comma;
- with max_snap_devices=1 and no tracer upstream never prints the closing `]` and `}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pydbd import abi

DEFAULT_PROC_PATH = "/proc/datto-info"

_FIELD_RE = re.compile(r'"(?P<key>[A-Za-z_]+)": (?P<value>.*?)(?P<comma>,?)$')
_INT_RE = re.compile(r"-?[0-9]+")


class ProcFormatError(ValueError):
    """The text is not in the /proc/datto-info format; lineno is 1-based."""

    def __init__(self, lineno: int, message: str, line: str | None = None) -> None:
        shown = "" if line is None else f": {line!r}"
        super().__init__(f"line {lineno}: {message}{shown}")
        self.lineno = lineno


@dataclass(frozen=True)
class AutoExpand:
    step_size_mib: int
    reserved_space_mib: int


@dataclass(frozen=True)
class ProcDevice:
    """One tracer.  Optional fields are None when the module does not print them (spec §5 table)."""

    minor: int
    cow_file: str
    block_device: str
    max_cache: int
    state: int
    fallocate: int | None = None
    cow_size_current: int | None = None
    seq_id: int | None = None
    uuid: str | None = None
    version: int | None = None
    nr_changed_blocks: int | None = None
    auto_expand: AutoExpand | None = None
    error: int | None = None

    @property
    def state_name(self) -> str:
        return abi.state_name(self.state)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with only the fields the module printed, in the module's order."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ProcInfo:
    version: str
    devices: list[ProcDevice] = field(default_factory=list)

    def device(self, minor: int) -> ProcDevice | None:
        return next((dev for dev in self.devices if dev.minor == minor), None)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "devices": [dev.to_dict() for dev in self.devices]}


_STRING_KEYS = frozenset({"cow_file", "block_device", "uuid"})
_INT_KEYS = frozenset(
    {"minor", "max_cache", "fallocate", "cow_size_current", "seq_id", "version", "nr_changed_blocks"}
    | {"error", "state"}
)
_REQUIRED_KEYS = ("minor", "cow_file", "block_device", "max_cache", "state")


def unquote(raw_value: str) -> str | None:
    """Return the text between the first and the last quote, JSON-unescaped when that is valid."""
    if len(raw_value) < 2 or not raw_value.startswith('"') or not raw_value.endswith('"'):
        return None
    inner = raw_value[1:-1]
    if "\\" not in inner and '"' not in inner:
        return inner
    try:
        decoded = json.loads(raw_value)
    except ValueError:
        return inner  # upstream's unescaped form: take the bytes as printed
    return decoded if isinstance(decoded, str) else inner


class _Lines:
    """Cursor over the lines of the file that reports errors with 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()  # the text ends with a newline
        self.index = 0

    @property
    def lineno(self) -> int:
        return self.index + 1

    def at_end(self) -> bool:
        return self.index >= len(self.lines)

    def peek(self) -> str | None:
        return None if self.at_end() else self.lines[self.index].strip()

    def take(self, what: str) -> str:
        if self.at_end():
            raise ProcFormatError(self.lineno, f"unexpected end of file, expected {what}")
        line = self.lines[self.index].strip()
        self.index += 1
        return line

    def expect(self, *accepted: str) -> str:
        line = self.take(" or ".join(repr(a) for a in accepted))
        if line not in accepted:
            raise self.error(f"expected {' or '.join(repr(a) for a in accepted)}", line, back=1)
        return line

    def error(self, message: str, line: str | None = None, back: int = 0) -> ProcFormatError:
        return ProcFormatError(self.lineno - back, message, line)


def _parse_field(cursor: _Lines) -> tuple[str, str, bool]:
    """Split a `"key": value,` line; returns key, raw value, and whether a comma followed."""
    line = cursor.take("a field")
    match = _FIELD_RE.match(line)
    if match is None:
        raise cursor.error('expected a field of the form "key": value', line, back=1)
    return match["key"], match["value"], match["comma"] == ","


def _convert(cursor: _Lines, key: str, raw: str) -> int | str:
    if key in _STRING_KEYS:
        text = unquote(raw)
        if text is None:
            raise cursor.error(f"{key} must be a quoted string", raw, back=1)
        return text
    if not _INT_RE.fullmatch(raw):
        raise cursor.error(f"{key} must be an integer", raw, back=1)
    return int(raw)


def _parse_auto_expand(cursor: _Lines) -> AutoExpand:
    values: dict[str, int] = {}
    for name, want_comma in (("step_size_mib", True), ("reserved_space_mib", False)):
        key, raw, comma = _parse_field(cursor)
        if key != name or comma != want_comma or not _INT_RE.fullmatch(raw):
            raise cursor.error(f"expected {name} inside auto_expand", raw, back=1)
        values[name] = int(raw)
    cursor.expect("},")
    return AutoExpand(**values)


def _parse_device(cursor: _Lines) -> ProcDevice:
    start = cursor.lineno - 1  # the line of the opening brace
    fields: dict[str, Any] = {}
    while True:
        key, raw, comma = _parse_field(cursor)
        if key in fields:
            raise cursor.error(f"duplicate field {key}", back=1)
        if key == "auto_expand" and raw == "{":
            fields[key] = _parse_auto_expand(cursor)
            continue
        if key not in _STRING_KEYS | _INT_KEYS:
            raise cursor.error(f"unknown field {key}", back=1)
        fields[key] = _convert(cursor, key, raw)
        if not comma:  # only the last field (state) lacks the comma
            break
    missing = [key for key in _REQUIRED_KEYS if key not in fields]
    if missing:
        raise ProcFormatError(start, f"device is missing {', '.join(missing)}")
    return ProcDevice(**fields)


def _parse_devices(cursor: _Lines) -> list[ProcDevice]:
    devices: list[ProcDevice] = []
    if cursor.peek() == "":
        cursor.take("an empty line")  # the empty-list form
        return devices
    while True:
        cursor.expect("{")
        devices.append(_parse_device(cursor))
        if cursor.expect("},", "}") == "}":
            return devices


def _parse_header(cursor: _Lines) -> str:
    cursor.expect("{")
    key, raw, comma = _parse_field(cursor)
    version = unquote(raw)
    if key != "version" or version is None or not comma:
        raise cursor.error('expected "version": "<module version>",', raw, back=1)
    cursor.expect('"devices": [')
    return version


def parse_proc_info(text: str) -> ProcInfo:
    """Parse the text of /proc/datto-info; raises ProcFormatError on anything else."""
    cursor = _Lines(text)
    version = _parse_header(cursor)
    if cursor.at_end() or (cursor.peek() == "" and cursor.index == len(cursor.lines) - 1):
        # Upstream with max_snap_devices=1 and no tracer stops right after the list opens.
        return ProcInfo(version, [])
    devices = _parse_devices(cursor)
    cursor.expect("]")
    cursor.expect("}")
    if not cursor.at_end():
        raise cursor.error("trailing text after the closing brace", cursor.peek())
    return ProcInfo(version, devices)


def read_proc_info(path: str = DEFAULT_PROC_PATH) -> ProcInfo:
    """Read and parse the status file.  It is read in one go because holding it open blocks ioctls."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        text = handle.read()
    return parse_proc_info(text)
