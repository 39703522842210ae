"""guestlib.agent on the host: arena block selection, FIEMAP, the protocol through real FIFOs."""

from __future__ import annotations

import errno
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


def test_device_runs_groups_consecutive_blocks() -> None:
    assert agent.device_runs([]) == []
    assert agent.device_runs([7, 8, 9, 3, 4, 10]) == [(7, 3), (3, 2), (10, 1)]


def _file_agent(tmp_path: Path, nblocks: int = 8) -> agent.Agent:
    """An agent whose "device" is a regular file of `nblocks` distinct blocks (O_DIRECT or skip)."""
    path = tmp_path / "dev"
    path.write_bytes(b"".join(agent.block_content(f"b{i}") for i in range(nblocks)))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"no O_DIRECT on {tmp_path}: {e}")
    a = agent.Agent()
    a.device, a.arena = str(path), [0, 1, 2, 5]
    return a


def test_trim_zeroes_blocks_of_a_file_and_reports_what_it_reads(tmp_path: Path) -> None:
    a = _file_agent(tmp_path)
    zero = agent.digest(bytes(agent.BLOCK))
    got = a.op_trim([1, 2, 3], "punch_hole")  # device blocks 1, 2 and 5: two fallocate calls
    assert got == {"errno": 0, "digests": [zero, zero, zero]}
    assert a.op_digests(a.device) == [agent.token_digest("b0"), zero, zero, zero]
    data = (tmp_path / "dev").read_bytes()
    assert data[3 * agent.BLOCK : 5 * agent.BLOCK] == b"".join(agent.block_content(f"b{i}") for i in (3, 4))
    # the block-device ioctls are refused on a regular file: the errno, and what it now reads
    for how in ("discard", "zeroout"):
        got = a.op_trim([0], how)
        assert got == {"errno": errno.ENOTTY, "digests": [agent.token_digest("b0")]}
    with pytest.raises(agent.AgentError):
        a.op_trim([0], "shred")


def test_zero_token_is_a_zero_block() -> None:
    assert agent.block_content(agent.ZERO_TOKEN) == bytes(agent.BLOCK)
    assert guest_machine.token_digest(agent.ZERO_TOKEN) == agent.digest(bytes(agent.BLOCK))
    assert guest_machine.ZERO_TOKEN == agent.ZERO_TOKEN


def test_backup_copies_the_arena_or_everything(tmp_path: Path) -> None:
    a = _file_agent(tmp_path)
    image = tmp_path / "img"
    want = [agent.token_digest(f"b{i}") for i in (0, 1, 2, 5)]
    assert a.op_backup(a.device, str(image), full=False) == want
    data = image.read_bytes()
    assert len(data) == 8 * agent.BLOCK and data[3 * agent.BLOCK : 5 * agent.BLOCK] == bytes(2 * agent.BLOCK)
    assert a.op_backup(a.device, str(image), full=True) == want
    assert image.read_bytes() == (tmp_path / "dev").read_bytes()


def test_files_activity_covers_every_action(tmp_path: Path) -> None:
    a = agent.Agent()
    for seed in range(6):
        assert a.op_files(str(tmp_path / "files"), seed, 40, fsync=seed % 2 == 0) == 40
    assert any((tmp_path / "files").iterdir())
