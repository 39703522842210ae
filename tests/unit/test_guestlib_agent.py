"""guestlib.agent on the host: arena block selection, FIEMAP, the protocol through real FIFOs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from fuzz import guest_machine
from guestlib import agent


def test_whole_blocks_skips_straddling_blocks() -> None:
    # a 1 KiB-block filesystem: extents need not start or end on a 4 KiB device block
    extents = [(4096, 8192), (5 * 4096 + 1024, 3 * 4096), (100 * 4096, 4095)]
    assert agent.whole_blocks(extents) == [1, 2, 6, 7]


def test_host_and_guest_agree_on_block_contents() -> None:
    for token in ("init:0", "w17", ""):
        assert guest_machine.token_digest(token) == agent.token_digest(token)
    assert agent.token_digest("w1") != agent.token_digest("w2")
    assert len(agent.block_content("x")) == agent.BLOCK


def test_fiemap_maps_a_written_file(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    path.write_bytes(os.urandom(16 * agent.BLOCK))
    try:
        extents = agent.fiemap_extents(str(path))
    except OSError as e:  # tmpfs and some overlays have no FIEMAP
        pytest.skip(f"no FIEMAP on {tmp_path}: {e}")
    assert sum(length for _p, length in extents) >= 16 * agent.BLOCK
    assert all(p > 0 for p, _l in extents)


def test_serve_answers_requests_through_fifos(tmp_path: Path) -> None:
    worker = threading.Thread(target=agent.serve, args=(str(tmp_path),), daemon=True)
    worker.start()
    for _ in range(200):
        if (tmp_path / "pid").exists():
            break
        threading.Event().wait(0.01)

    def call(req: dict[str, object]) -> dict[str, object]:
        with open(tmp_path / "in", "w") as f:
            f.write(json.dumps(req) + "\n")
        with open(tmp_path / "out") as f:
            reply: dict[str, object] = json.loads(f.readline())
        return reply

    assert call({"op": "sh", "cmd": "echo hi"}) == {"ok": True, "result": {"rc": 0, "out": "hi\n", "err": ""}}
    bad = call({"op": "cow_index", "path": str(tmp_path / "missing"), "device_sectors": 8})
    assert bad["ok"] is False and "FileNotFoundError" in str(bad["error"]) and bad["errno"] == 2
    assert call({"op": "quit"}) == {"ok": True, "result": None}
    worker.join(5)
    assert not worker.is_alive()
