"""dbdctl: command-line control of the datto snapshot driver, compatible with dattobd 0.12 (spec §6.1).

The upstream sub-commands keep upstream's syntax, number parsing, messages and exit codes, so
scripts written for the original tool keep working.

Differences from upstream
-------------------------
- ``help``, ``--help`` and ``-h`` print the usage and exit 0 even when the module is not loaded
  (upstream checks for /dev/datto-ctl first and fails with 255).
- A bad ``<step size>`` of ``reconfigure-auto-expand`` is reported like any other bad number
  (upstream silently sends 0).
- After the upstream line for a failed request, one more stderr line explains the likely cause
  for that request and errno and what to do about it.
- The usage text is our own and lists every sub-command.
- Additions (upstream has none of them):
  ``status [<minor>] [--json]``: table of /proc/datto-info, or its records as JSON (the whole file,
  or the one device object when a minor is given); needs only that file, and exits 255 with
  "no tracer on minor N" for an absent minor.
  ``get-free``: prints the lowest free minor (GET_FREE ioctl).
  ``info <minor> [--json]``: the INFO ioctl, pretty-printed or as JSON.
  ``cow-info <cow file> ...``: delegates to pydbd.cowinfo; needs no module.
  ``persist-reload <minor> [--dir <dir>]``: writes the executable boot-time script
  ``<dir>/reload_<minor>`` of spec §7 (default /etc/datto/dla); refuses a failed tracer.
  Their errors use the same forms as upstream's (``error interpreting <what> parameters`` and
  exit 255); their long options follow getopt_long.
- For tests, DBD_CTL_PATH and DBD_PROC_PATH override /dev/datto-ctl and /proc/datto-info.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shlex
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydbd import abi, cow
from pydbd.control import DEFAULT_CTL_PATH, Control, DattoInfo
from pydbd.errors import PER_MINOR_OPS, DattoError, diagnose_einval, errno_name
from pydbd.procinfo import DEFAULT_PROC_PATH, ProcDevice, ProcFormatError, ProcInfo, read_proc_info

EXIT_FAILURE = 255  # upstream returns -1 from main / exit(-1)
LLONG_MAX = 2**63 - 1
LONG_MAX = LLONG_MAX  # LP64
MIB = 1 << 20
DEFAULT_PERSIST_DIR = "/etc/datto/dla"

# Tests replace this to run every sub-command against a fake driver.
CONTROL_FACTORY: Callable[[str], Control] = Control

USAGE = """\
Usage: dbdctl <command> [<options>] <arguments>

Control the datto snapshot driver (dattobd 0.12 compatible).

Tracking commands:
  setup-snapshot [-c <cache bytes>] [-f <cow MiB>] <block device> <cow file> <minor>
      Start tracking a read-write mounted device and present a snapshot as /dev/datto<minor>.
      The COW file must live on that device's filesystem.
  reload-snapshot [-c <cache bytes>] <block device> <cow path> <minor>
  reload-incremental [-c <cache bytes>] <block device> <cow path> <minor>
      Re-register a device that is not mounted read-write yet (at boot); tracking resumes at its
      next read-write mount.  <cow path> is relative to that device's mount point.
  transition-to-incremental <minor>
      Drop the snapshot but keep recording which blocks change.
  transition-to-snapshot [-f <cow MiB>] <new cow file> <minor>
      Take the next snapshot; the old COW file then lists the changed blocks for update-img.
  destroy <minor>
      Stop tracking; an open COW file is deleted.

Tuning commands:
  reconfigure [-c <cache bytes>] <minor>
  expand-cow-file <MiB> <minor>
  reconfigure-auto-expand [-r <reserved MiB>] <step MiB> <minor>

Inspection commands:
  status [<minor>] [--json]      tracers listed in /proc/datto-info
  info <minor> [--json]          what the driver reports for one minor
  get-free                       print the lowest unused minor
  cow-info <cow file> [--sectors <n>] [--json]
                                 describe a COW file
  persist-reload <minor> [--dir <directory>]
                                 write the boot-time reload_<minor> script (default /etc/datto/dla)
  help                           show this text

Numbers are plain digits; a leading 0 means octal.  A cache size of 0 (the default) means
the module default.  Cache sizes are in bytes; COW, expand and auto-expand sizes are in MiB.
"""


class _BadArguments(Exception):
    """The command line of a sub-command is unusable; reported as `error interpreting <what> ...`,
    with <what> as the exception's message."""


class _Failure(Exception):
    """A failure of an added sub-command, reported as its message on stderr with exit 255."""


def _strtoll_base0(digits: str) -> int:
    """strtoll(s, NULL, 0) for a string of decimal digits: a leading 0 selects octal and the
    conversion stops at the first 8 or 9 (so "08" is 0); results saturate at LLONG_MAX."""
    if digits.startswith("0"):
        octal = re.match(r"[0-7]*", digits)
        value = int(octal.group(), 8) if octal is not None and octal.group() else 0
    else:
        value = int(digits)
    return min(value, LLONG_MAX)


def parse_number(text: str, limit: int = LLONG_MAX) -> int:
    """Parse a size the way upstream does; raises ValueError if upstream would reject it."""
    # isdigit() would accept non-ASCII digits, which the C isdigit() does not.
    if not text or any(ch not in "0123456789" for ch in text):
        raise ValueError(f"not a plain number: {text!r}")
    value = _strtoll_base0(text)
    if value >= limit:
        raise ValueError(f"number too large: {text!r}")
    return value


def parse_minor(text: str) -> int:
    """Parse a minor: below LONG_MAX, then truncated to the 32 bits of an unsigned int."""
    return parse_number(text, LONG_MAX) & 0xFFFFFFFF


@dataclass
class GetoptResult:
    options: list[tuple[str, str | None]] = field(default_factory=list)
    positionals: list[str] = field(default_factory=list)
    # glibc's complaint about a bad option; scanning stopped there, as getopt returned '?'.
    diagnostic: str | None = None


def _take_long(
    prog: str, args: Sequence[str], i: int, longopts: Mapping[str, bool], res: GetoptResult
) -> int:
    """Handle the long option args[i-1]; returns the next index."""
    name, has_value, value = args[i - 1][2:].partition("=")
    if name not in longopts:
        res.diagnostic = f"{prog}: unrecognized option '--{name}'"
    elif not longopts[name]:
        if has_value:
            res.diagnostic = f"{prog}: option '--{name}' doesn't allow an argument"
        else:
            res.options.append((name, None))
    elif has_value:
        res.options.append((name, value))
    elif i < len(args):
        res.options.append((name, args[i]))
        i += 1
    else:
        res.diagnostic = f"{prog}: option '--{name}' requires an argument"
    return i


def _take_short(prog: str, args: Sequence[str], i: int, shortopts: str, res: GetoptResult) -> int:
    """Handle the cluster of short options args[i-1]; returns the next index."""
    cluster = args[i - 1]
    for j in range(1, len(cluster)):
        letter = cluster[j]
        pos = shortopts.find(letter)
        if letter == ":" or pos < 0:
            res.diagnostic = f"{prog}: invalid option -- '{letter}'"
            return i
        if shortopts[pos + 1 : pos + 2] != ":":
            res.options.append((letter, None))
            continue
        if j + 1 < len(cluster):  # -c123
            res.options.append((letter, cluster[j + 1 :]))
        elif i < len(args):  # -c 123, even if 123 starts with '-'
            res.options.append((letter, args[i]))
            i += 1
        else:
            res.diagnostic = f"{prog}: option requires an argument -- '{letter}'"
        return i
    return i


def gnu_getopt(
    prog: str, args: Sequence[str], shortopts: str, longopts: Mapping[str, bool] | None = None
) -> GetoptResult:
    """GNU getopt(_long) semantics: options may follow positionals, `--` ends the options,
    `-` is a positional, POSIXLY_CORRECT disables the permutation.  Without long options a
    `--name` argument is read as short options, so it fails on '-' like glibc's getopt()."""
    res = GetoptResult()
    permute = "POSIXLY_CORRECT" not in os.environ
    i = 0
    while i < len(args) and res.diagnostic is None:
        arg = args[i]
        i += 1
        if arg == "--":
            res.positionals.extend(args[i:])
            break
        if arg.startswith("--") and longopts:
            i = _take_long(prog, args, i, longopts, res)
        elif arg.startswith("-") and arg != "-":
            i = _take_short(prog, args, i, shortopts, res)
        elif permute:
            res.positionals.append(arg)
        else:
            res.positionals.extend(args[i - 1 :])
            break
    return res


@dataclass
class _Args:
    """Parsed command line of an upstream sub-command."""

    strings: list[str]
    numbers: list[int]
    minor: int
    options: dict[str, int]

    def opt(self, letter: str) -> int:
        return self.options.get(letter, 0)


@dataclass(frozen=True)
class _Command:
    what: str  # as in "error interpreting <what> parameters"
    optstring: str | None  # None: no getopt at all, upstream just counts argv
    positionals: str  # kinds before the trailing minor: "s" string, "n" number
    action: Callable[[Control, _Args], object]


def _parse_positionals(kinds: str, words: list[str], args: _Args) -> None:
    for kind, word in zip(kinds, words, strict=True):
        if kind == "s":
            args.strings.append(word)
        else:
            args.numbers.append(parse_number(word))


def _parse_command(name: str, cmd: _Command, argv: list[str]) -> _Args:
    """Apply upstream's order: options (and their numbers) first, then count, then positionals."""
    args = _Args([], [], 0, {})
    try:
        if cmd.optstring is None:
            words = argv
        else:
            got = gnu_getopt(name, argv, cmd.optstring)
            for letter, value in got.options:
                args.options[letter] = parse_number(value or "")
            if got.diagnostic is not None:
                print(got.diagnostic, file=sys.stderr)
                raise _BadArguments(cmd.what)
            words = got.positionals
        if len(words) != len(cmd.positionals) + 1:
            raise _BadArguments(cmd.what)
        _parse_positionals(cmd.positionals, words[:-1], args)
        args.minor = parse_minor(words[-1])
    except ValueError as exc:
        raise _BadArguments(cmd.what) from exc
    return args


_COMMANDS: dict[str, _Command] = {
    "setup-snapshot": _Command(
        "setup snapshot",
        "c:f:",
        "ss",
        lambda ctl, a: ctl.setup_snapshot(a.strings[0], a.strings[1], a.minor, a.opt("f"), a.opt("c")),
    ),
    "reload-snapshot": _Command(
        "reload snapshot",
        "c:",
        "ss",
        lambda ctl, a: ctl.reload_snapshot(a.strings[0], a.strings[1], a.minor, a.opt("c")),
    ),
    "reload-incremental": _Command(
        "reload incremental",
        "c:",
        "ss",
        lambda ctl, a: ctl.reload_incremental(a.strings[0], a.strings[1], a.minor, a.opt("c")),
    ),
    "destroy": _Command("destroy", None, "", lambda ctl, a: ctl.destroy(a.minor)),
    "transition-to-incremental": _Command(
        "transition to incremental", None, "", lambda ctl, a: ctl.transition_to_incremental(a.minor)
    ),
    "transition-to-snapshot": _Command(
        "transition to snapshot",
        "f:",
        "s",
        lambda ctl, a: ctl.transition_to_snapshot(a.strings[0], a.minor, a.opt("f")),
    ),
    "reconfigure": _Command("reconfigure", "c:", "", lambda ctl, a: ctl.reconfigure(a.minor, a.opt("c"))),
    "expand-cow-file": _Command(
        "expand", None, "n", lambda ctl, a: ctl.expand_cow_file(a.minor, a.numbers[0])
    ),
    "reconfigure-auto-expand": _Command(
        "reconfigure auto expand",
        "r:",
        "n",
        lambda ctl, a: ctl.reconfigure_auto_expand(a.minor, a.numbers[0], a.opt("r")),
    ),
}


def ctl_path() -> str:
    return os.environ.get("DBD_CTL_PATH", DEFAULT_CTL_PATH)


def proc_path() -> str:
    return os.environ.get("DBD_PROC_PATH", DEFAULT_PROC_PATH)


def _print_usage() -> None:
    sys.stdout.write(USAGE)
    sys.stdout.flush()


def _bad_arguments(what: str) -> int:
    print(f"error interpreting {what} parameters: {os.strerror(errno.EINVAL)}", file=sys.stderr)
    _print_usage()
    return EXIT_FAILURE


def _not_loaded() -> int:
    print(f"driver does not appear to be loaded: {os.strerror(errno.EINVAL)}", file=sys.stderr)
    return EXIT_FAILURE


def _request_failed(err: DattoError, diagnosis: str | None = None) -> int:
    print(
        f"driver returned an error performing specified action. check dmesg for more info: {err.strerror}",
        file=sys.stderr,
    )
    print(f"dbdctl: {diagnosis or err.hint}", file=sys.stderr)
    return EXIT_FAILURE


def _diagnosis(ctl: Control, err: DattoError) -> str | None:
    """For an EINVAL on an existing tracer, ask the driver for that tracer's state and error so
    the message names the actual cause (say, a COW file that filled up a second ago) rather than
    listing the possible ones."""
    if err.errno != errno.EINVAL or err.minor is None or err.op not in PER_MINOR_OPS:
        return None
    try:
        info = ctl.info(err.minor)
    except (DattoError, ValueError):
        return None
    return diagnose_einval(err.op, err.minor, info.state, info.error)


def _with_control(action: Callable[[Control], int | None]) -> int:
    """Run action on a freshly opened control device; map driver failures to upstream's message."""
    try:
        with CONTROL_FACTORY(ctl_path()) as ctl:
            try:
                return action(ctl) or 0
            except DattoError as err:
                return _request_failed(err, _diagnosis(ctl, err))
    except DattoError as err:
        return _request_failed(err)
    except ValueError as err:  # an argument Control refuses to pass on (a NUL byte in a path, a range)
        print(f"dbdctl: {err}", file=sys.stderr)
        return EXIT_FAILURE


def _block_device_size(path: str) -> int | None:
    """Bytes of the block device at path; None when it is not one or cannot be opened (the driver
    then reports what is wrong with it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return None
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return None
    finally:
        os.close(fd)


DEVICE_SIZE: Callable[[str], int | None] = _block_device_size  # replaced by the unit tests


def _cow_too_small(bdev: str, falloc_mib: int) -> str | None:
    """Why `setup-snapshot -f falloc_mib` on bdev cannot work, or None. The module accepts a COW
    file that cannot hold its own header and index plus one block of data (upstream does too, spec
    section 9, defect 7), and the snapshot then fails with EFBIG at its first copy: a moment after
    setup, since the file system writes as soon as it is thawed. Refuse it here instead."""
    size = DEVICE_SIZE(bdev) if falloc_mib > 0 else None
    if size is None:
        return None
    layout = cow.geometry(size // 512).data_offset
    need = layout + cow.BLOCK_SIZE
    if falloc_mib * MIB >= need:
        return None
    return (
        f"setup-snapshot -f {falloc_mib} on {bdev} ({_human_size(size)}): the COW file's header and index "
        f"alone take {_human_size(layout)}, so the snapshot would fail with EFBIG (File too large) at its "
        f"first copy; use -f {-(-need // MIB)} or more (-f 0: 10 % of the volume). Nothing was set up."
    )


def _run_command(name: str, cmd: _Command, argv: list[str]) -> int:
    args = _parse_command(name, cmd, argv)

    def action(ctl: Control) -> int | None:
        if name == "setup-snapshot":
            problem = _cow_too_small(args.strings[0], args.opt("f"))
            if problem:
                print(f"dbdctl: {problem}", file=sys.stderr)
                return EXIT_FAILURE
        cmd.action(ctl, args)
        return None

    return _with_control(action)


# --- additions -----------------------------------------------------------------------------------


def _parse_extra(
    name: str, what: str, argv: list[str], longopts: Mapping[str, bool], counts: range
) -> tuple[dict[str, str | None], list[str]]:
    """Parse an added sub-command: long options only, positional count in counts."""
    got = gnu_getopt(name, argv, "", longopts)
    if got.diagnostic is not None:
        print(got.diagnostic, file=sys.stderr)
        raise _BadArguments(what)
    if len(got.positionals) not in counts:
        raise _BadArguments(what)
    return dict(got.options), got.positionals


def _print_json(data: Any) -> None:
    # ASCII escapes keep undecodable path bytes (surrogates) printable on any terminal.
    print(json.dumps(data, indent=2))


def _info_dict(info: DattoInfo) -> dict[str, Any]:
    return {
        "minor": info.minor,
        "state": info.state,
        "state_name": info.state_name,
        "error": info.error,
        "block_device": info.bdev,
        "cow_file": info.cow,
        "cache_size": info.cache_size,
        "falloc_size": info.falloc_size,
        "seq_id": info.seqid,
        "uuid": info.uuid_hex,
        "version": info.version,
        "nr_changed_blocks": info.nr_changed_blocks,
    }


def _error_text(code: int | None) -> str:
    if not code:
        return "-"
    return f"{code} ({errno_name(-code)})"


def format_info(info: DattoInfo) -> str:
    """Readable multi-line rendering of an INFO result."""
    rows = [
        ("minor", str(info.minor)),
        ("state", f"{info.state} ({info.state_name})"),
        ("error", _error_text(info.error)),
        ("block device", info.bdev),
        ("cow file", info.cow),
        ("cache size", f"{info.cache_size} bytes"),
        ("cow size limit", f"{info.falloc_size} bytes"),
        ("seq id", str(info.seqid)),
        ("uuid", info.uuid_hex),
        ("version", str(info.version)),
        ("changed blocks", str(info.nr_changed_blocks)),
    ]
    return "\n".join(f"{label + ':':<16}{value}" for label, value in rows)


def _cmd_info(argv: list[str]) -> int:
    opts, words = _parse_extra("info", "info", argv, {"json": False}, range(1, 2))
    minor = _parse_or_bad(parse_minor, words[0], "info")

    def action(ctl: Control) -> None:
        info = ctl.info(minor)
        if "json" in opts:
            _print_json(_info_dict(info))
        else:
            print(format_info(info))

    return _with_control(action)


def _parse_or_bad(parse: Callable[[str], int], text: str, what: str) -> int:
    try:
        return parse(text)
    except ValueError as exc:
        raise _BadArguments(what) from exc


def _cmd_get_free(argv: list[str]) -> int:
    _parse_extra("get-free", "get free", argv, {}, range(0, 1))
    return _with_control(lambda ctl: print(ctl.get_free_minor()))


def _human_size(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 1024:
        return f"{value}B"
    units = ("KiB", "MiB", "GiB", "TiB")
    size, index = value / 1024, 0
    while size >= 1024 and index < len(units) - 1:
        size, index = size / 1024, index + 1
    return f"{size:.1f}{units[index]}"


def _status_row(dev: ProcDevice) -> list[str]:
    return [
        str(dev.minor),
        dev.state_name,
        dev.block_device,
        dev.cow_file,
        "-" if dev.seq_id is None else str(dev.seq_id),
        "-" if dev.nr_changed_blocks is None else str(dev.nr_changed_blocks),
        _human_size(dev.cow_size_current),
        _error_text(dev.error),
    ]


def format_status(devices: Sequence[ProcDevice]) -> str:
    """Aligned table of tracers; the header alone is not printed for an empty list."""
    if not devices:
        return "no tracked devices"
    header = ["MINOR", "STATE", "BLOCK DEVICE", "COW FILE", "SEQ", "CHANGED", "COW SIZE", "ERROR"]
    rows = [header] + [_status_row(dev) for dev in devices]
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _load_proc() -> ProcInfo:
    try:
        return read_proc_info(proc_path())
    except ProcFormatError as exc:
        raise _Failure(f"dbdctl: cannot parse {proc_path()}: {exc}") from exc
    except OSError as exc:
        raise _Failure(f"dbdctl: cannot read {proc_path()}: {exc.strerror}") from exc


def _cmd_status(argv: list[str]) -> int:
    if not os.access(proc_path(), os.F_OK):
        return _not_loaded()
    opts, words = _parse_extra("status", "status", argv, {"json": False}, range(0, 2))
    minor = _parse_or_bad(parse_minor, words[0], "status") if words else None
    proc = _load_proc()
    devices = proc.devices if minor is None else [d for d in proc.devices if d.minor == minor]
    if minor is not None and not devices:
        raise _Failure(f"dbdctl: no tracer on minor {minor}")
    if "json" not in opts:
        print(format_status(devices))
    elif minor is None:
        _print_json(proc.to_dict())
    else:
        _print_json(devices[0].to_dict())
    return 0


def reload_script(info: DattoInfo) -> str:
    """Text of the boot-time script that re-registers the tracer described by info (spec §7)."""
    command = "reload-snapshot" if info.is_snapshot else "reload-incremental"
    words = ["dbdctl", command]
    if info.cache_size != abi.DEFAULT_CACHE_SIZE:
        words += ["-c", str(info.cache_size)]
    words += [info.bdev, info.cow, str(info.minor)]
    return (
        "#!/bin/sh\n"
        f"# Re-register datto minor {info.minor} before its filesystem is mounted read-write.\n"
        "# Written by `dbdctl persist-reload`; the COW path is relative to the mount point.\n"
        f"exec {shlex.join(words)}\n"
    )


def write_reload_script(info: DattoInfo, directory: str) -> str:
    """Atomically write directory/reload_<minor> with mode 0755; returns its path."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    target = os.path.join(directory, f"reload_{info.minor}")
    fd, tmp = tempfile.mkstemp(prefix=f".reload_{info.minor}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(reload_script(info))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def _cmd_persist_reload(argv: list[str]) -> int:
    opts, words = _parse_extra("persist-reload", "persist reload", argv, {"dir": True}, range(1, 2))
    minor = _parse_or_bad(parse_minor, words[0], "persist reload")
    directory = opts.get("dir") or DEFAULT_PERSIST_DIR

    def action(ctl: Control) -> None:
        info = ctl.info(minor)
        if info.error:
            raise _Failure(
                f"dbdctl: the tracer on minor {minor} has failed ({_error_text(info.error)}); "
                "destroy it and set it up again instead of persisting it"
            )
        try:
            print(f"wrote {write_reload_script(info, directory)}")
        except OSError as exc:
            raise _Failure(f"dbdctl: cannot write the reload script in {directory}: {exc.strerror}") from exc

    return _with_control(action)


def _cmd_cow_info(argv: list[str]) -> int:
    # Imported here so dbdctl keeps working while cowinfo is missing or broken.
    from pydbd.cowinfo import main as cow_info_main

    return cow_info_main(argv)


_EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "info": _cmd_info,
    "get-free": _cmd_get_free,
    "persist-reload": _cmd_persist_reload,
}


def _dispatch(name: str, argv: list[str]) -> int:
    # These need no control device, so they come before the "not loaded" check.
    if name in ("help", "--help", "-h"):
        _print_usage()
        return 0
    if name == "cow-info":
        return _cmd_cow_info(argv)
    if name == "status":
        return _cmd_status(argv)
    if not os.access(ctl_path(), os.F_OK):
        return _not_loaded()
    if name in _COMMANDS:
        return _run_command(name, _COMMANDS[name], argv)
    if name in _EXTRA_COMMANDS:
        return _EXTRA_COMMANDS[name](argv)
    _print_usage()
    return EXIT_FAILURE


def _pass_raw_path_bytes() -> None:
    """Paths from the driver may hold bytes that are not UTF-8 (the kernel does not care); they are
    decoded with surrogateescape, so write them back out as the original bytes, as a C tool would,
    instead of failing with UnicodeEncodeError under a strict UTF-8 locale."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dbdctl` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    _pass_raw_path_bytes()
    if not args:
        _print_usage()
        return EXIT_FAILURE
    try:
        return _dispatch(args[0], args[1:])
    except _BadArguments as exc:
        return _bad_arguments(str(exc))
    except _Failure as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
