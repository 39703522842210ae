"""``dbdctl cow-info FILE [--sectors N] [--json]``: show a COW file's header, geometry and index counts,
and verify it against the format rules (spec 4.5).

Exit status: 0 when the file is valid, 1 when violations were found, 2 when the file cannot be read
or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from pydbd.cow import CowHeader, Geometry, VerifyReport, describe_flags, verify

EXIT_VALID = 0
EXIT_VIOLATIONS = 1
EXIT_UNREADABLE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbdctl cow-info", description="Inspect and verify a COW file.")
    parser.add_argument("file", help="COW file to inspect")
    parser.add_argument(
        "--sectors",
        type=_sectors,
        default=None,
        help="size of the tracked device in 512-byte sectors (without it the geometry is inferred)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def _sectors(text: str) -> int:
    value = int(text, 10)
    if value < 0:
        raise argparse.ArgumentTypeError(f"sector count must not be negative: {text}")
    return value


def main(argv: list[str]) -> int:
    """Run ``cow-info`` with ``argv`` (the arguments after the sub-command name)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse has already printed its message; usage errors share the "cannot proceed" status.
        return EXIT_VALID if exc.code == 0 else EXIT_UNREADABLE
    try:
        report = verify(args.file, args.sectors)
    except OSError as exc:
        print(f"cow-info: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(report, sys.stdout)
    return EXIT_VALID if report.ok else EXIT_VIOLATIONS


def render(report: VerifyReport, out: TextIO) -> None:
    """Human-readable form of ``report``."""
    _line(out, "file", report.path)
    _line(out, "file size", f"{report.file_size} bytes")
    if report.header is not None:
        _render_header(report.header, out)
    if report.geometry is not None:
        _render_geometry(report.geometry, report.geometry_inferred, out)
        c = report.counts
        _line(out, "non-zero entries", f"{c.nonzero} ({c.markers} marker-1, {c.mapped} mapped)")
    _render_result(report, out)


def _line(out: TextIO, label: str, value: object) -> None:
    out.write(f"{label + ':':<20} {value}\n")


def _render_header(h: CowHeader, out: TextIO) -> None:
    _line(out, "magic", f"{h.magic} ({h.magic:#x})")
    _line(out, "flags", describe_flags(h.flags))
    _line(out, "mode", "incremental (index only)" if h.index_only else "snapshot")
    _line(out, "fpos", h.fpos)
    _line(out, "fsize", h.fsize)
    _line(out, "seqid", h.seqid)
    _line(out, "uuid", h.uuid_hex)
    _line(out, "version", h.version)
    _line(out, "nr_changed_blocks", h.nr_changed_blocks)


def _render_geometry(g: Geometry, inferred: bool, out: TextIO) -> None:
    source = "inferred from the file" if inferred else f"{g.sectors} sectors"
    _line(out, "geometry", source)
    _line(out, "nblocks", g.nblocks)
    _line(out, "nsect", g.nsect)
    _line(out, "data_offset", g.data_offset)
    _line(out, "first data block", g.first_data_block)


def _render_result(report: VerifyReport, out: TextIO) -> None:
    if report.ok:
        _line(out, "result", "valid")
    else:
        _line(out, "result", f"INVALID: {report.violations_total} violations")
    for violation in report.violations:
        out.write(f"  {violation}\n")
    if report.violations_omitted:
        out.write(f"  ... {report.violations_omitted} more violations not listed\n")
    for skipped in report.skipped:
        out.write(f"skipped: {skipped}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
