"""Control against a recording fake ioctl: exact bytes per request, errno mapping, INFO decoding."""

from __future__ import annotations

import errno
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
from fake_driver import FakeIoctl, free_minor_bytes, info_bytes

from pydbd import abi
from pydbd.control import Control, DattoInfo
from pydbd.errors import DattoError


@pytest.fixture
def fake() -> FakeIoctl:
    return FakeIoctl()


@pytest.fixture
def ctl(tmp_path: Path, fake: FakeIoctl) -> Control:
    node = tmp_path / "datto-ctl"
    node.touch()
    return Control(str(node), ioctl=fake)


def test_setup_snapshot_packs_setup_params(ctl: Control, fake: FakeIoctl) -> None:
    ctl.setup_snapshot("/dev/loop0", "/mnt/cow.snap", 7, fallocated_mib=25, cache_size=1048576)
    call = fake.last
    assert call.request == 0x40289101
    assert len(call.data) == 40
    _, _, falloc, cache, minor, pad = struct.unpack("<QQQQII", call.data)
    assert (falloc, cache, minor, pad) == (25, 1048576, 7, 0)
    assert call.strings == ("/dev/loop0", "/mnt/cow.snap")


def test_setup_snapshot_defaults_are_zero(ctl: Control, fake: FakeIoctl) -> None:
    ctl.setup_snapshot("/dev/sda1", "/.datto", 0)
    assert struct.unpack_from("<QQI", fake.last.data, 16) == (0, 0, 0)


@pytest.mark.parametrize(
    ("method", "number"), [("reload_snapshot", 0x40209102), ("reload_incremental", 0x40209103)]
)
def test_reload_packs_reload_params(ctl: Control, fake: FakeIoctl, method: str, number: int) -> None:
    getattr(ctl, method)("/dev/sdb1", "/.datto", 3, cache_size=4096)
    call = fake.last
    assert call.request == number
    assert len(call.data) == 32
    assert struct.unpack_from("<QII", call.data, 16) == (4096, 3, 0)
    assert call.strings == ("/dev/sdb1", "/.datto")


@pytest.mark.parametrize(
    ("method", "number"), [("destroy", 0x40049104), ("transition_to_incremental", 0x40049105)]
)
def test_minor_only_requests_pass_a_u32(ctl: Control, fake: FakeIoctl, method: str, number: int) -> None:
    getattr(ctl, method)(0xDEADBEEF)
    assert (fake.last.request, fake.last.data) == (number, struct.pack("<I", 0xDEADBEEF))


def test_transition_to_snapshot_packs_params(ctl: Control, fake: FakeIoctl) -> None:
    ctl.transition_to_snapshot("/.datto1", 2, fallocated_mib=64)
    call = fake.last
    assert call.request == 0x40189106
    assert len(call.data) == 24
    assert struct.unpack_from("<QII", call.data, 8) == (64, 2, 0)
    assert call.strings == ("/.datto1",)


def test_reconfigure_packs_params(ctl: Control, fake: FakeIoctl) -> None:
    ctl.reconfigure(5, cache_size=1 << 40)
    assert fake.last.request == 0x40109107
    assert fake.last.data == struct.pack("<QII", 1 << 40, 5, 0)


def test_expand_cow_file_packs_params(ctl: Control, fake: FakeIoctl) -> None:
    ctl.expand_cow_file(1, 100)
    assert fake.last.request == 0x4010910A
    assert fake.last.data == struct.pack("<QII", 100, 1, 0)


def test_reconfigure_auto_expand_packs_params(ctl: Control, fake: FakeIoctl) -> None:
    ctl.reconfigure_auto_expand(4, step_mib=20, reserved_mib=64)
    assert fake.last.request == 0x4018910B
    assert fake.last.data == struct.pack("<QQII", 20, 64, 4, 0)
    ctl.reconfigure_auto_expand(4, 20)
    assert fake.last.data == struct.pack("<QQII", 20, 0, 4, 0)


def test_get_free_minor_reads_the_int_written_by_the_kernel(ctl: Control, fake: FakeIoctl) -> None:
    fake.replies[abi.IOCTL_GET_FREE] = free_minor_bytes(6)
    assert ctl.get_free_minor() == 6
    assert fake.last.request == 0x80049109
    assert len(fake.last.data) == 4


def test_info_sends_minor_and_decodes_reply(ctl: Control, fake: FakeIoctl) -> None:
    uuid = bytes.fromhex("3f0c9a7e1d2b4c5a9e8f00112233aabb")
    numbers: dict[str, Any] = {
        "minor": 9,
        "state": 2,
        "error": -27,
        "cache_size": 123,
        "falloc_size": 47815065,
        "seqid": 4,
        "version": 1,
        "nr_changed_blocks": 517,
    }
    fake.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(
        **numbers, uuid=uuid, cow=b'/cow "x".snap', bdev=b"/dev/mapper/vg-root"
    )
    info = ctl.info(9)
    call = fake.last
    assert call.request == 0xA0509108
    assert len(call.data) == 8272
    assert struct.unpack_from("<I", call.data) == (9,)
    assert call.data[4:] == bytes(8268)  # everything but the minor is zeroed on input
    assert info == DattoInfo(**numbers, uuid=uuid, cow='/cow "x".snap', bdev="/dev/mapper/vg-root")
    assert info.uuid_hex == "3f0c9a7e1d2b4c5a9e8f00112233aabb"
    assert info.state_name == "active incremental"
    assert (info.is_snapshot, info.is_active, info.is_unverified) == (False, True, False)


def test_info_decodes_handcrafted_buffer_by_offset(ctl: Control, fake: FakeIoctl) -> None:
    raw = bytearray(8272)
    struct.pack_into("<I", raw, 0, 3)
    struct.pack_into("<Q", raw, 8, 5)
    struct.pack_into("<i", raw, 16, -22)
    struct.pack_into("<QQQ", raw, 24, 314572800, 0, 0)
    raw[64:72] = b"/.datto\0"
    raw[4160:4170] = b"/dev/sdb1\0"
    struct.pack_into("<QQ", raw, 8256, 0xAAAA, 0xBBBB)  # echoed caller bytes, spec §9.4
    fake.replies[abi.IOCTL_DATTOBD_INFO] = bytes(raw)
    info = ctl.info(3)
    assert (info.minor, info.state, info.error, info.cow, info.bdev) == (3, 5, -22, "/.datto", "/dev/sdb1")
    assert (info.version, info.nr_changed_blocks, info.uuid) == (0xAAAA, 0xBBBB, bytes(16))
    assert info.is_unverified and info.is_snapshot and not info.is_active


def test_info_uses_a_full_4096_byte_path(ctl: Control, fake: FakeIoctl) -> None:
    long_path = b"/" + b"a" * 4094
    fake.replies[abi.IOCTL_DATTOBD_INFO] = info_bytes(cow=long_path)
    assert ctl.info(0).cow == long_path.decode()


def test_one_descriptor_is_reused_and_closed(ctl: Control, fake: FakeIoctl) -> None:
    with ctl:
        ctl.destroy(1)
        ctl.destroy(2)
    assert fake.calls[0].fd == fake.calls[1].fd
    assert ctl._fd is None


@pytest.mark.parametrize(
    ("call", "op", "minor"),
    [
        (lambda c: c.setup_snapshot("/dev/x", "/c", 0), "setup-snapshot", 0),
        (lambda c: c.reload_snapshot("/dev/x", "/c", 1), "reload-snapshot", 1),
        (lambda c: c.reload_incremental("/dev/x", "/c", 2), "reload-incremental", 2),
        (lambda c: c.destroy(3), "destroy", 3),
        (lambda c: c.transition_to_incremental(4), "transition-to-incremental", 4),
        (lambda c: c.transition_to_snapshot("/c", 5), "transition-to-snapshot", 5),
        (lambda c: c.reconfigure(6), "reconfigure", 6),
        (lambda c: c.info(7), "info", 7),
        (lambda c: c.get_free_minor(), "get-free", None),
        (lambda c: c.expand_cow_file(8, 1), "expand-cow-file", 8),
        (lambda c: c.reconfigure_auto_expand(9, 1), "reconfigure-auto-expand", 9),
    ],
)
def test_every_method_maps_oserror_to_datto_error(
    ctl: Control, fake: FakeIoctl, call: object, op: str, minor: int | None
) -> None:
    fake.errors = _fail_everything(errno.EIO)
    with pytest.raises(DattoError) as caught:
        call(ctl)  # type: ignore[operator]
    err = caught.value
    assert (err.op, err.minor, err.errno) == (op, minor, errno.EIO)
    assert isinstance(err.__cause__, OSError)


def _fail_everything(code: int) -> dict[int, int]:
    requests = [
        getattr(abi, name) for name in dir(abi) if name.startswith("IOCTL_") and name != "IOCTL_MAGIC"
    ]
    return dict.fromkeys(requests, code)


def test_setup_busy_explains_how_to_pick_a_minor(ctl: Control, fake: FakeIoctl) -> None:
    fake.errors[abi.IOCTL_SETUP_SNAP] = errno.EBUSY
    with pytest.raises(DattoError) as caught:
        ctl.setup_snapshot("/dev/loop0", "/cow", 0)
    err = caught.value
    assert err.path == "/dev/loop0"
    assert err.strerror == "Device or resource busy"
    text = str(err)
    assert "EBUSY" in text and "Device or resource busy" in text
    assert "minor 0 is already in use" in text and "dbdctl get-free" in text


def test_setup_einval_lists_the_causes(ctl: Control, fake: FakeIoctl) -> None:
    fake.errors[abi.IOCTL_SETUP_SNAP] = errno.EINVAL
    with pytest.raises(DattoError) as caught:
        ctl.setup_snapshot("/dev/loop0", "/cow", 30)
    hint = caught.value.hint
    for cause in ("not mounted read-write", "already tracked", "not on that filesystem", "out of range"):
        assert cause in hint
    assert "EINVAL" in str(caught.value)


@pytest.mark.parametrize(
    ("call", "code", "expected"),
    [
        (lambda c: c.destroy(2), errno.ENOENT, "no tracer on minor 2"),
        (lambda c: c.info(2), errno.ENOENT, "no tracer on minor 2"),
        (lambda c: c.destroy(2), errno.EBUSY, "/dev/datto2 is open (mounted?) — unmount it first"),
        (lambda c: c.transition_to_incremental(2), errno.EBUSY, "/dev/datto2 is open"),
        (lambda c: c.transition_to_snapshot("/c", 2), errno.EBUSY, "unmount it first"),
        (lambda c: c.transition_to_incremental(2), errno.EFBIG, "expand-cow-file"),
        (lambda c: c.transition_to_incremental(2), errno.EINVAL, "not an active snapshot"),
        (lambda c: c.transition_to_snapshot("/c", 2), errno.EINVAL, "active incremental"),
        (lambda c: c.reload_incremental("/dev/x", "/c", 2), errno.EINVAL, "mounted read-write"),
        (lambda c: c.reload_incremental("/dev/x", "/c", 2), errno.EBUSY, "already in use"),
        (lambda c: c.expand_cow_file(2, 5), errno.ENOSPC, "has now failed"),
        (lambda c: c.get_free_minor(), errno.ENOENT, "every minor is in use"),
        (lambda c: c.reconfigure(2), errno.EPERM, "root"),
        (lambda c: c.reconfigure(2), errno.EACCES, "CAP_SYS_ADMIN"),
        (lambda c: c.reconfigure(2), errno.ENOTTY, "modprobe dattobd"),
        (lambda c: c.reconfigure(2), errno.E2BIG, "dmesg"),
    ],
)
def test_hints_are_specific_to_request_and_errno(
    ctl: Control, fake: FakeIoctl, call: object, code: int, expected: str
) -> None:
    fake.errors = _fail_everything(code)
    with pytest.raises(DattoError) as caught:
        call(ctl)  # type: ignore[operator]
    assert expected in caught.value.hint
    assert errno.errorcode[code] in str(caught.value)


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENODEV, errno.ENXIO])
def test_open_failure_says_module_not_loaded(tmp_path: Path, code: int) -> None:
    err = DattoError("open", None, code, "/dev/datto-ctl")
    assert "modprobe dattobd" in err.hint and "/dev/datto-ctl" in err.hint


def test_missing_device_raises_on_first_use(tmp_path: Path, fake: FakeIoctl) -> None:
    ctl = Control(str(tmp_path / "absent"), ioctl=fake)
    with pytest.raises(DattoError) as caught:
        ctl.destroy(0)
    assert (caught.value.op, caught.value.errno, caught.value.path) == ("open", errno.ENOENT, ctl.path)
    assert "not loaded" in str(caught.value)
    assert fake.calls == []
    with pytest.raises(DattoError):
        Control.open(str(tmp_path / "absent"), ioctl=fake)


def test_datto_error_is_an_oserror_and_pickles() -> None:
    err = DattoError("destroy", 4, errno.EBUSY)
    assert isinstance(err, OSError)
    assert (err.errno, err.strerror, err.path) == (errno.EBUSY, "Device or resource busy", None)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.op, clone.minor, clone.errno, str(clone)) == ("destroy", 4, errno.EBUSY, str(err))
    assert str(err).startswith("destroy on minor 4 failed: Device or resource busy (EBUSY)")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.destroy(-1),
        lambda c: c.destroy(2**32),
        lambda c: c.expand_cow_file(0, 2**64),
        lambda c: c.setup_snapshot("/dev/x", "/c\0d", 0),
    ],
)
def test_out_of_range_arguments_are_rejected_before_the_ioctl(
    ctl: Control, fake: FakeIoctl, call: object
) -> None:
    with pytest.raises(ValueError):
        call(ctl)  # type: ignore[operator]
    assert fake.calls == []


def test_default_ioctl_is_fcntl(tmp_path: Path) -> None:
    import fcntl

    assert Control(str(tmp_path))._ioctl is fcntl.ioctl
