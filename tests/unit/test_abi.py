"""The ioctl ABI must match spec §2 byte for byte: request numbers embed the struct sizes."""

from __future__ import annotations

import ctypes

import pytest

from pydbd import abi


@pytest.mark.parametrize(
    ("request_number", "expected"),
    [
        (abi.IOCTL_SETUP_SNAP, 0x40289101),
        (abi.IOCTL_RELOAD_SNAP, 0x40209102),
        (abi.IOCTL_RELOAD_INC, 0x40209103),
        (abi.IOCTL_DESTROY, 0x40049104),
        (abi.IOCTL_TRANSITION_INC, 0x40049105),
        (abi.IOCTL_TRANSITION_SNAP, 0x40189106),
        (abi.IOCTL_RECONFIGURE, 0x40109107),
        (abi.IOCTL_DATTOBD_INFO, 0xA0509108),
        (abi.IOCTL_GET_FREE, 0x80049109),
        (abi.IOCTL_EXPAND_COW_FILE, 0x4010910A),
        (abi.IOCTL_RECONFIGURE_AUTO_EXPAND, 0x4018910B),
    ],
)
def test_request_numbers_match_spec_table(request_number: int, expected: int) -> None:
    assert request_number == expected


def test_ioc_encoding() -> None:
    assert abi.ioc(abi.IOC_WRITE, 1, 40) == (1 << 30) | (40 << 16) | (0x91 << 8) | 1
    assert abi.ioc(abi.IOC_READ | abi.IOC_WRITE, 0xFF, 0) == 0xC00091FF


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (abi.SetupParams, 40),
        (abi.ReloadParams, 32),
        (abi.TransitionSnapParams, 24),
        (abi.ReconfigureParams, 16),
        (abi.ExpandCowFileParams, 16),
        (abi.ReconfigureAutoExpandParams, 24),
        (abi.DattobdInfo, 8272),
        (abi.MinorArg, 4),
        (abi.FreeMinorArg, 4),
    ],
)
def test_struct_sizes(struct: type[ctypes._CData], size: int) -> None:
    assert ctypes.sizeof(struct) == size


@pytest.mark.parametrize(
    ("struct", "offsets"),
    [
        (abi.SetupParams, {"bdev": 0, "cow": 8, "fallocated_space": 16, "cache_size": 24, "minor": 32}),
        (abi.ReloadParams, {"bdev": 0, "cow": 8, "cache_size": 16, "minor": 24}),
        (abi.TransitionSnapParams, {"cow": 0, "fallocated_space": 8, "minor": 16}),
        (abi.ReconfigureParams, {"cache_size": 0, "minor": 8}),
        (abi.ExpandCowFileParams, {"size": 0, "minor": 8}),
        (abi.ReconfigureAutoExpandParams, {"step_size": 0, "reserved_space": 8, "minor": 16}),
        (
            abi.DattobdInfo,
            {
                "minor": 0,
                "state": 8,
                "error": 16,
                "cache_size": 24,
                "falloc_size": 32,
                "seqid": 40,
                "uuid": 48,
                "cow": 64,
                "bdev": 4160,
                "version": 8256,
                "nr_changed_blocks": 8264,
            },
        ),
    ],
)
def test_field_offsets(struct: type[ctypes.Structure], offsets: dict[str, int]) -> None:
    actual = {name: getattr(struct, name).offset for name, *_ in struct._fields_}
    assert actual == offsets


@pytest.mark.parametrize(
    ("struct", "field", "size"),
    [
        (abi.SetupParams, "minor", 4),
        (abi.DattobdInfo, "error", 4),
        (abi.DattobdInfo, "uuid", 16),
        (abi.DattobdInfo, "cow", abi.PATH_MAX),
        (abi.DattobdInfo, "bdev", abi.PATH_MAX),
    ],
)
def test_field_sizes(struct: type[ctypes.Structure], field: str, size: int) -> None:
    assert getattr(struct, field).size == size


def test_info_error_is_signed() -> None:
    info = abi.DattobdInfo(error=-27)
    assert info.error == -27
    assert bytes(info)[16:20] == (-27).to_bytes(4, "little", signed=True)


def test_state_bits_and_names() -> None:
    assert (abi.SNAPSHOT, abi.ACTIVE, abi.UNVERIFIED) == (1, 2, 4)
    assert abi.state_name(abi.ACTIVE | abi.SNAPSHOT) == "active snapshot"
    assert abi.state_name(abi.UNVERIFIED) == "unverified incremental"
    assert [abi.state_name(s) for s in range(6)] == [
        "dormant incremental",
        "dormant snapshot",
        "active incremental",
        "active snapshot",
        "unverified incremental",
        "unverified snapshot",
    ]
    assert abi.state_name(9) == "unknown state 9"


def test_constants() -> None:
    assert abi.PATH_MAX == 4096
    assert abi.DEFAULT_CACHE_SIZE == 314572800
