"""Private apt configuration per Debian suite; never touches the machine's own apt sources."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, locked

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Lists older than this are refreshed before a download that cannot find its pinned version.
MAX_LIST_AGE = 24 * 3600


class AptError(RuntimeError):
    pass


@dataclass(frozen=True)
class SuiteSources:
    """The apt suites (e.g. bookworm, bookworm-updates, bookworm-security) that make up one suite."""

    name: str
    apt_suites: tuple[str, ...]
    mirror: str
    security_mirror: str
    check_valid_until: bool = True

    def sources_list(self) -> str:
        lines = []
        for s in self.apt_suites:
            url = self.security_mirror if s.endswith("-security") else self.mirror
            lines.append(f"deb [signed-by={KEYRING}] {url} {s} main\n")
        return "".join(lines)

    def apt_options(self) -> list[str]:
        """Options for mmdebstrap --aptopt (same semantics as our private config)."""
        return [] if self.check_valid_until else ['Acquire::Check-Valid-Until "false"']


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure raise with its combined output."""
    p = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        check=False,
    )
    if p.returncode != 0:
        raise AptError(f"command failed (rc={p.returncode}): {' '.join(cmd)}\n{p.stdout[-8000:]}")
    return p.stdout


class PrivateApt:
    """apt-get/apt-cache with their own sources.list, state and cache under the harness cache."""

    def __init__(self, sources: SuiteSources, root: Path | None = None) -> None:
        self.sources = sources
        self.dir = (root or cache_dir()) / "apt" / sources.name
        self.sources_file = self.dir / "sources.list"
        self.state = self.dir / "state"
        self.cachedir = self.dir / "cache"
        self.status = self.dir / "status"
        self.lock_path = self.dir / ".lock"

    def options(self) -> list[str]:
        opts = {
            "Dir::Etc::sourcelist": str(self.sources_file),
            "Dir::Etc::sourceparts": "-",
            "Dir::Etc::preferences": "/dev/null",
            "Dir::Etc::preferencesparts": str(self.dir / "preferences.d"),  # empty; "-" warns
            "Dir::State": str(self.state),
            "Dir::State::status": str(self.status),
            "Dir::Cache": str(self.cachedir),
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "Acquire::Languages": "none",
            "Dir::Etc::Trusted": KEYRING,
            "Dir::Etc::TrustedParts": "-",
        }
        if not self.sources.check_valid_until:
            opts["Acquire::Check-Valid-Until"] = "false"
        out: list[str] = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out

    def _mkdirs(self) -> None:
        for d in (
            self.state / "lists" / "partial",
            self.cachedir / "archives" / "partial",
            self.dir / "preferences.d",
        ):
            d.mkdir(parents=True, exist_ok=True)
        if not self.status.exists():
            self.status.touch()

    def _setup(self) -> None:
        self._mkdirs()
        text = self.sources.sources_list()
        if not self.sources_file.exists() or self.sources_file.read_text() != text:
            self.sources_file.write_text(text)
            (self.dir / "updated").unlink(missing_ok=True)

    def list_age(self) -> float:
        stamp = self.dir / "updated"
        return time.time() - stamp.stat().st_mtime if stamp.exists() else float("inf")

    def update(self, force: bool = False, max_age: float = MAX_LIST_AGE) -> None:
        with locked(self.lock_path):
            self._setup()
            if not force and self.list_age() < max_age:
                return
            run(["apt-get", *self.options(), "-q", "update"])
            (self.dir / "updated").touch()

    def ensure_lists(self) -> None:
        self.update(max_age=float("inf"))

    def cache(self, *args: str) -> str:
        self._mkdirs()
        return run(["apt-cache", *self.options(), *args])

    def candidate(self, package: str) -> str | None:
        """Candidate version of package, or None if the archive does not have it."""
        try:
            out = self.cache("policy", package)
        except AptError:
            return None
        m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        return None if not m or m.group(1) == "(none)" else m.group(1)

    def field(self, package: str, version: str, name: str) -> str:
        """One control field of package=version ('' if absent)."""
        out = self.cache("show", f"{package}={version}")
        m = re.search(rf"^{re.escape(name)}:\s*(.*(?:\n[ \t].*)*)", out, re.M)
        return m.group(1).replace("\n", " ").strip() if m else ""

    def pkgnames(self, prefix: str) -> list[str]:
        return sorted(self.cache("pkgnames", prefix).split())

    def download(self, pins: list[str], dest: Path) -> list[Path]:
        """apt-get download name=version ... into dest; refreshes the lists once if a pin is missing."""
        dest.mkdir(parents=True, exist_ok=True)
        self.ensure_lists()
        try:
            run(["apt-get", *self.options(), "-q", "download", *pins], cwd=dest)
        except AptError:
            self.update(force=True)
            try:
                run(["apt-get", *self.options(), "-q", "download", *pins], cwd=dest)
            except AptError as e:
                raise AptError(
                    f"{e}\nIf a pinned version left the archive, refresh the pins with "
                    "`python -m vmimages pin` (see vmimages/matrix.toml)."
                ) from None
        return sorted(dest.glob("*.deb"))


def version_compare(a: str, b: str) -> int:
    """dpkg version comparison: -1, 0 or 1."""
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0
    return -1 if lt else 1


def extract_debs(debs: list[Path], dest: Path) -> None:
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(dest)])


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C.UTF-8")
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env
