"""`python -m vmimages pin`: refresh the package pins of matrix.toml from the archive."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .apt import PrivateApt, version_compare
from .matrix import MATRIX_FILE, Target, parse


class PinError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pins:
    kernel_release: str
    kernel_packages: tuple[str, ...]
    headers_packages: tuple[str, ...]
    build_packages: tuple[str, ...]


def _dep_names(depends: str) -> list[str]:
    """Package names in a Depends field (first alternative of each)."""
    out = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            out.append(first.split()[0])
    return out


def latest_release(apt: PrivateApt, release: str) -> str:
    """Newest ABI of the same kernel series and flavour, e.g. 6.1.0-54-amd64 -> 6.1.0-56-amd64."""
    m = re.match(r"(\d+\.\d+)[.\d]*(?:-\d+)?(\+deb\d+)?.*?(-[a-z0-9]+)$", release)
    if not m:
        return release
    series, debtag, flavour = m.group(1), m.group(2) or "", m.group(3)
    pat = re.compile(
        rf"linux-image-({re.escape(series)}(?:\.\d+)+(?:-\d+)?{re.escape(debtag)}(?:\.\d+)?{flavour})$"
    )
    best, best_ver = release, apt.candidate(f"linux-image-{release}") or "0"
    for name in apt.pkgnames(f"linux-image-{series}"):
        hit = pat.match(name)
        ver = apt.candidate(name) if hit else None
        if hit and ver and version_compare(ver, best_ver) > 0:
            best, best_ver = hit.group(1), ver
    return best


def resolve(target: Target, latest: bool = False) -> Pins:
    apt = PrivateApt(target.sources)
    apt.update(force=True)
    rel = latest_release(apt, target.kernel_release) if latest else target.kernel_release
    image = f"linux-image-{rel}"
    ver = apt.candidate(image)
    if ver is None:
        raise PinError(f"{target.name}: {image} is not in {', '.join(target.sources.apt_suites)}")
    deps = _dep_names(apt.field(image, ver, "Depends"))
    # Split packaging (sid 7.x): the image is a meta package over linux-base-* (config, modules.builtin,
    # modules.order), linux-binary-* (vmlinuz) and linux-modules-*.
    split = [d for d in deps if d in (f"linux-base-{rel}", f"linux-binary-{rel}", f"linux-modules-{rel}")]
    kernel = tuple(f"{p}={apt.candidate(p)}" for p in split) if split else (f"{image}={ver}",)
    headers = f"linux-headers-{rel}"
    hver = apt.candidate(headers)
    if hver is None:
        raise PinError(f"{target.name}: {headers} is not in the archive")
    hdeps = apt.field(headers, hver, "Depends")
    gcc = re.search(r"\bgcc-(\d+)", hdeps)
    build = ("make", "libc6-dev", f"gcc-{gcc.group(1)}" if gcc else "gcc")
    return Pins(rel, kernel, (f"{headers}={hver}",), build)


def _toml_list(items: tuple[str, ...]) -> str:
    one = "[" + ", ".join(f'"{i}"' for i in items) + "]"
    if len(one) < 90:
        return one
    return "[\n" + "".join(f'  "{i}",\n' for i in items) + "]"


def set_key(text: str, table: str, key: str, value: str) -> str:
    """Replace `key = ...` (a single line, or an array over several lines) inside [table] of a TOML text."""
    lines = text.splitlines(keepends=True)
    header = re.compile(r"^\s*\[")
    inside = False
    for i, line in enumerate(lines):
        if header.match(line):
            inside = line.strip() == f"[{table}]"
            continue
        if inside and re.match(rf"^{re.escape(key)}\s*=", line):
            end = i
            if line.split("=", 1)[1].strip().startswith("[") and "]" not in line:
                while end + 1 < len(lines) and "]" not in lines[end]:
                    end += 1
            lines[i : end + 1] = [f"{key} = {value}\n"]
            return "".join(lines)
    raise PinError(f"[{table}] has no {key} to update")


def apply(text: str, name: str, pins: Pins) -> str:
    table = f'targets."{name}"'
    text = set_key(text, table, "kernel_release", f'"{pins.kernel_release}"')
    text = set_key(text, table, "kernel_packages", _toml_list(pins.kernel_packages))
    text = set_key(text, table, "headers_packages", _toml_list(pins.headers_packages))
    return set_key(text, table, "build_packages", _toml_list(pins.build_packages))


def pin(
    names: list[str] | None = None, latest: bool = False, path: Path = MATRIX_FILE, write: bool = True
) -> list[str]:
    """Update the matrix file in place (unless write is false); returns one line per changed target."""
    text = path.read_text()
    matrix = parse(text)
    changes = []
    for name, target in matrix.targets.items():
        if names and name not in names:
            continue
        pins = resolve(target, latest)
        new = apply(text, name, pins)
        if new != text:
            changes.append(f"{name}: {pins.kernel_release} {' '.join(pins.kernel_packages)}")
            text = new
    parse(text)  # still valid
    if write:
        path.write_text(text)
    return changes
