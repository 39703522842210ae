"""Every document's runnable shell blocks, run in one guest.

harness/docblocks.py extracts the blocks marked `<!-- runnable -->` from README.md, INSTALL.md and
doc/*.md and defines the environments the documents declare. The guest gets what INSTALL.md
sections 1 and 2 install (the module of this checkout loaded, dbdctl and update-img on PATH); then,
per document: its environment, its blocks in order (`bash -e`, from the checkout at /src), and a
teardown (every tracer destroyed, the mounts gone), so the next document starts clean. A failing
block fails the test with the document, the line of its fence, the block and its output; the other
documents still run, and every failure is reported.

The commands do not depend on the kernel (the module tests cover that on every kernel), so this is
`deep`: CI runs it on the default kernel only.
"""

from __future__ import annotations

import time

import pytest

from harness.docblocks import ENVIRONMENTS, TEARDOWN, Block, DocBlocks, collect, failure_report, guest_script
from harness.guest import Guest
from harness.qemu import DiskSpec

pytestmark = [pytest.mark.guest, pytest.mark.deep, pytest.mark.guest_config(disks=[DiskSpec(96)])]

BLOCK_TIMEOUT = 300.0


def _run(g: Guest, script: str, name: str) -> tuple[int, str, str]:
    path = g.put_file(f"docs/{name}.sh", script)
    r = g.run(f"cd /src && bash {path}", timeout=BLOCK_TIMEOUT)
    return r.rc, r.stdout, r.stderr


def _run_doc(g: Guest, doc: DocBlocks, blocks: list[Block], n: int) -> list[str]:
    """Environment, blocks, teardown of one document; the failure reports (empty: all passed)."""
    assert doc.env is not None
    failures: list[str] = []
    rc, out, err = _run(g, "set -e -x\n" + ENVIRONMENTS[doc.env].setup, f"{n}-env")
    if rc != 0:
        failures.append(
            f"{doc.doc}:{doc.env_line}: environment {doc.env!r} failed (rc {rc}), its blocks did not run\n"
            f"--- stdout\n{out}--- stderr\n{err}"
        )
    else:
        for i, block in enumerate(blocks):
            t0 = time.monotonic()
            rc, out, err = _run(g, guest_script(block), f"{n}-{i}")
            print(f"{block.where}: rc {rc} in {time.monotonic() - t0:.1f}s")
            if rc != 0:
                failures.append(failure_report(block, rc, out, err))
                break  # the later blocks of this document build on this one
    rc, out, err = _run(g, "set -e -x\n" + TEARDOWN, f"{n}-teardown")
    if rc != 0:
        failures.append(f"{doc.doc}: teardown failed (rc {rc})\n--- stdout\n{out}--- stderr\n{err}")
    return failures


def test_runnable_doc_blocks(module_guest: Guest) -> None:
    g = module_guest
    docs = [(d, d.of_kind("guest")) for d in collect()]
    docs = [(d, blocks) for d, blocks in docs if blocks]
    assert docs, "no document marks a runnable block"
    g.install_pydbd_tools()
    failures: list[str] = []
    for n, (doc, blocks) in enumerate(docs):
        t0 = time.monotonic()
        failures += _run_doc(g, doc, blocks, n)
        print(f"{doc.doc} ({doc.env}, {len(blocks)} blocks): {time.monotonic() - t0:.1f}s")
    if failures:
        pytest.fail(
            f"{len(failures)} runnable doc block(s) failed:\n\n" + "\n\n".join(failures), pytrace=False
        )
