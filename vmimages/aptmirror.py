"""The Debian mirror of this machine's own apt configuration, which the guest images and build
chroots use too (no mirror is named in the repository).

The first `deb` source of /etc/apt/sources.list.d/*.sources (deb822) or *.list and
/etc/apt/sources.list whose suites are not security suites gives the archive; one whose suites end
in "-security" gives the security archive (without one: the archive's URL with "-security"
appended to its last path element, Debian's layout). DBD_APT_MIRROR and DBD_APT_SECURITY_MIRROR
override both; a matrix.toml `mirror` / `security_mirror` overrides them in turn.
"""

from __future__ import annotations

import os
from pathlib import Path

APT_DIR = Path("/etc/apt")


class MirrorError(RuntimeError):
    """No Debian mirror could be found in the machine's apt configuration."""


def _deb822(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            found += [(uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split()]
    return found


def _one_line(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        words = line.split()
        if not words or words[0] != "deb":
            continue
        rest = line.split("]", 1)[1].split() if "[" in line else words[1:]  # drop [options]
        if len(rest) >= 2:
            found.append((rest[0], [rest[1]]))
    return found


def sources(apt_dir: Path = APT_DIR) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled `deb` source, in apt's reading order."""
    found = []
    main = apt_dir / "sources.list"
    if main.is_file():
        found += _one_line(main.read_text(errors="replace"))
    for path in sorted((apt_dir / "sources.list.d").glob("*")):
        if path.suffix == ".sources":
            found += _deb822(path.read_text(errors="replace"))
        elif path.suffix == ".list":
            found += _one_line(path.read_text(errors="replace"))
    return found


def machine_mirrors(apt_dir: Path = APT_DIR) -> tuple[str, str]:
    """(archive URL, security archive URL), without trailing slashes."""
    archive = os.environ.get("DBD_APT_MIRROR", "").rstrip("/")
    security = os.environ.get("DBD_APT_SECURITY_MIRROR", "").rstrip("/")
    for uri, suites in sources(apt_dir):
        is_security = any(s.endswith("-security") or s.endswith("/updates") for s in suites)
        if is_security and not security:
            security = uri.rstrip("/")
        elif not is_security and not archive:
            archive = uri.rstrip("/")
    if not archive:
        raise MirrorError(
            f"no Debian archive in the apt configuration under {apt_dir} (sources.list, sources.list.d): "
            "add one, or set DBD_APT_MIRROR (and DBD_APT_SECURITY_MIRROR)"
        )
    return archive, security or archive + "-security"
