"""vmimages.aptmirror: the Debian mirror comes from the machine's apt configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmimages import aptmirror


def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "sources.list.d").mkdir(exist_ok=True)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBD_APT_MIRROR", raising=False)
    monkeypatch.delenv("DBD_APT_SECURITY_MIRROR", raising=False)


def test_deb822_archive_and_security(tmp_path: Path) -> None:
    apt = _apt(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n# a comment\nURIs: http://m.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://s.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example/x\n"
        "Suites: bookworm\n"
    )})  # fmt: skip
    assert aptmirror.machine_mirrors(apt) == ("http://m.example/debian", "http://s.example/debian-security")


def test_one_line_sources_with_options_and_derived_security(tmp_path: Path) -> None:
    apt = _apt(tmp_path, {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )})  # fmt: skip
    assert aptmirror.machine_mirrors(apt) == ("http://m.example/debian", "http://m.example/debian-security")


def test_environment_overrides_and_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = _apt(
        tmp_path, {"sources.list.d/off.sources": "Types: deb\nEnabled: no\nURIs: http://x/\nSuites: a\n"}
    )
    with pytest.raises(aptmirror.MirrorError, match="DBD_APT_MIRROR"):
        aptmirror.machine_mirrors(apt)
    monkeypatch.setenv("DBD_APT_MIRROR", "http://env.example/debian/")
    assert aptmirror.machine_mirrors(apt) == (
        "http://env.example/debian",
        "http://env.example/debian-security",
    )
