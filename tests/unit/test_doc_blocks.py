"""Host tests of harness/docblocks.py: the runnable-block markers of the docs and their extraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import docblocks
from harness.docblocks import ENVIRONMENTS, DocBlockError, DocEnv, collect, parse

ENVS = {"e": DocEnv("test", "true\n")}


def _doc(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_marked_blocks_are_extracted_with_line_kind_and_text() -> None:
    text = _doc(
        "# Title",  # 1
        "<!-- runnable-env: e -->",  # 2
        "",  # 3
        "<!-- runnable -->",  # 4
        "```sh",  # 5
        "echo one",  # 6
        "# a comment",  # 7
        "echo two",  # 8
        "```",  # 9
        "```sh",  # 10: not marked
        "echo not run",
        "```",
        "<!-- runnable: dkms -->",  # 13
        "```bash",  # 14
        "dkms status",
        "```",
    )
    d = parse(text, "x.md", ENVS)
    assert (d.doc, d.env, d.env_line) == ("x.md", "e", 2)
    assert [(b.line, b.kind) for b in d.blocks] == [(5, "guest"), (14, "dkms")]
    assert d.blocks[0].text == "echo one\n# a comment\necho two\n"
    assert d.blocks[0].commands() == ["echo one", "echo two"]
    assert d.blocks[0].where == "x.md:5"
    assert [b.line for b in d.of_kind("dkms")] == [14]


def test_a_doc_without_markers_has_no_blocks() -> None:
    d = parse(_doc("# T", "```sh", "rm -rf /", "```", "    indented code"), "plain.md", ENVS)
    assert d.blocks == () and d.env is None


def test_marker_syntax_variants() -> None:
    text = _doc(
        "<!-- runnable-env: e -->", "  <!--runnable-->", "```sh", "a", "```", "<!-- runnable:guest -->"
    )
    text += _doc("~~~~ shell", "b", "~~~~")
    d = parse(text, "v.md", ENVS)
    assert [b.text for b in d.blocks] == ["a\n", "b\n"]


def test_markers_inside_a_code_block_are_text() -> None:
    text = _doc("```", "<!-- runnable -->", "<!-- runnable-env: nope -->", "```")
    assert parse(text, "c.md", ENVS).blocks == ()


def test_longer_fences_and_indentation() -> None:
    text = _doc("<!-- runnable-env: e -->", "<!-- runnable -->", "  ````sh", "  echo ```", "    x", "  ````")
    (b,) = parse(text, "f.md", ENVS).blocks
    assert b.text == "echo ```\n  x\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            _doc("<!-- runnable-env: e -->", "<!-- runnable -->", "", "```sh", "a", "```"),
            2,
            "not directly followed",
        ),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->", "    indented"), 2, "not directly followed"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->"), 2, "end of the document"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->", "```python", "a", "```"), 3, "```sh block"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->", "```", "a", "```"), 3, "```sh block"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->", "```sh", "", "```"), 3, "empty"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable -->", "```sh", "a"), 3, "never closed"),
        (_doc("```sh", "a", "<!-- runnable -->"), 1, "never closed"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable guest -->", "```sh", "a", "```"), 2, "malformed"),
        (
            _doc("<!-- runnable-env: e -->", "<!-- runnable: cloud -->", "```sh", "a", "```"),
            2,
            "unknown runnable kind",
        ),
        (_doc("<!-- runnable-env: zz -->"), 1, "unknown runnable-env"),
        (_doc("<!-- runnable-env: e -->", "<!-- runnable-env: e -->"), 2, "second runnable-env"),
        (_doc("<!-- runnable -->", "```sh", "a", "```"), 2, "no <!-- runnable-env"),
    ],
)
def test_marking_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(DocBlockError, match=message) as ei:
        parse(text, "bad.md", ENVS)
    assert ei.value.line == line and str(ei.value).startswith(f"bad.md:{line}: ")


def test_a_doc_that_claims_runnable_blocks_must_mark_some() -> None:
    with pytest.raises(DocBlockError, match=r"claims runnable blocks .* but marks none"):
        parse(_doc("# T", "<!-- runnable-env: e -->", "```sh", "a", "```"), "claim.md", ENVS)
    # a dkms block alone does not satisfy the claim: the claim is about guest blocks
    with pytest.raises(DocBlockError, match="marks none"):
        parse(_doc("<!-- runnable-env: e -->", "<!-- runnable: dkms -->", "```sh", "a", "```"), "d.md", ENVS)


def test_dkms_blocks_need_no_environment() -> None:
    d = parse(_doc("<!-- runnable: dkms -->", "```sh", "dkms status", "```"), "k.md", ENVS)
    assert d.env is None and [b.kind for b in d.blocks] == ["dkms"]


def test_collect_reads_readme_install_and_doc(tmp_path: Path) -> None:
    (tmp_path / "doc").mkdir()
    (tmp_path / "README.md").write_text("# R\n")
    (tmp_path / "INSTALL.md").write_text(
        _doc("<!-- runnable-env: sdb1-data -->", "<!-- runnable -->", "```sh", "a", "```")
    )
    (tmp_path / "doc" / "x.md").write_text("# X\n")
    (tmp_path / "doc" / "notes.txt").write_text("<!-- runnable -->\n")
    docs = collect(tmp_path)
    assert [d.doc for d in docs] == ["README.md", "INSTALL.md", "doc/x.md"]
    assert [len(d.blocks) for d in docs] == [0, 1, 0]


def test_script_and_failure_report() -> None:
    (b,) = parse(
        _doc("<!-- runnable-env: e -->", "<!-- runnable -->", "```sh", "false", "```"), "r.md", ENVS
    ).blocks
    assert docblocks.guest_script(b) == "set -e -x\nfalse\n"
    report = docblocks.failure_report(b, 1, "out\n", "+ false\n")
    assert report.startswith("r.md:3: runnable block exited 1\n")
    assert "false\n" in report and "out\n" in report and "+ false\n" in report


# ---------------------------------------------------------------- the real documents


def test_the_checkouts_documents_parse_and_mark_the_expected_blocks() -> None:
    docs = {d.doc: d for d in collect()}
    assert {"README.md", "INSTALL.md", "doc/dbdctl.8.md", "doc/update-img.8.md"} <= set(docs)
    runnable = {name for name, d in docs.items() if d.of_kind("guest")}
    assert runnable == {"INSTALL.md", "doc/dbdctl.8.md", "doc/update-img.8.md"}
    for name in runnable:
        assert docs[name].env in ENVIRONMENTS
    (dkms,) = [b for d in docs.values() for b in d.of_kind("dkms")]
    assert dkms.doc == "INSTALL.md"
    assert any(c.startswith("dkms install") for c in dkms.commands())


def test_environments_name_the_devices_the_documents_use() -> None:
    for name, env in ENVIRONMENTS.items():
        assert "/dev/sdb1" in env.setup and env.summary, name
    assert "/mnt/data" in ENVIRONMENTS["sdb1-mnt-data"].setup
    assert "/data/.datto1" in ENVIRONMENTS["sdb1-data-second-snapshot"].setup
