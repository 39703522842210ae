"""pytest plugin: kernel matrix options, guest fixtures, markers, artifacts of failing guest tests.

Register it from tests/conftest.py with `pytest_plugins = ["harness.pytest_plugin"]`.

Options: `--kernel debian-6.1|all|a,b` (default: $DBD_KERNEL or debian-6.1), `--rootfs bookworm|trixie`.
Tests that use `target` (directly or through `guest`, `module_guest`, ...) run once per chosen kernel.
Guests fail (never skip) when they cannot boot. Each guest has its own run dir, so `-n 2` is safe.

Per-test guest settings: `@pytest.mark.guest_config(disks=[DiskSpec(1024)], memory_mib=2048, smp=1)`.

Matrix depth: tests marked `deep` (scenario variants whose kernel-facing paths another test already
covers on every kernel) run only on the `--deep-on` kernels. The default, `auto`, is the default
target when `--kernel all` (what CI runs) and every chosen kernel otherwise, so naming one kernel
runs everything on it. The other kernels' deep instances are deselected, and the header says so.

Long runs: tests marked `long` (a minute or more each under TCG: the XFS variants of the
incremental chain and the power cut per change; gigabyte volumes and minutes-long races, also marked
soak, nightly) run only with `--long` (or DBD_LONG=1). `./run-tests` passes it (they are all deep,
so with `--kernel all` that is the default kernel only); a bare pytest run leaves them out, and
the header says so.

Debug kernels (`debug = true` in vmimages/matrix.toml: KASAN, lockdep, kmemleak; several times
slower under TCG) run only the tests marked `debugkernel`, deep or not; the rest is deselected
there. Every guest on a debug kernel ends with a kmemleak scan, and a leak fails the test.

Soak runs: tests marked `soak`, and on a debug kernel the tests marked `debugkernel(soak=True)`,
run only with `--soak` (or DBD_SOAK=1): the nightly workflow gives it, `./run-tests` does not. They
are the variants too slow for every change on a slow 2-core TCG machine whose paths a cheaper test
in `./run-tests` already covers (the 2 GiB volumes, the minutes-long race, XFS and 1-byte-cache
variants of scenario 1; the debug kernel's reboots and long workloads beside its reload and fuzz
tests). The header says what was left out.
"""

from __future__ import annotations

import json
import os
import shlex
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import artifacts, images, module_under_test
from harness.guest import DEFAULT_DISKS, Guest
from harness.images import GuestDisk
from harness.oracles import Oracles, Tally
from harness.qemu import DiskSpec

GUEST_FIXTURES = {
    "oracles",
    "guest",
    "module_guest",
    "scratch_disk",
    "ext4_volume",
    "xfs_volume",
    "guest_image",
}
VOLUME_MOUNT = "/mnt/vol"
_FAILED = pytest.StashKey[bool]()
_SEED = pytest.StashKey[int]()


@dataclass(frozen=True)
class Volume:
    device: str  # e.g. /dev/vdb
    mountpoint: str  # /mnt/vol
    fstype: str
    disk: GuestDisk


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dbd-guest", "dattobd QEMU guests")
    group.addoption(
        "--kernel",
        default=os.environ.get("DBD_KERNEL", "debian-6.1"),
        help="guest kernel target(s): a name, a comma list, or 'all' (default debian-6.1)",
    )
    group.addoption("--rootfs", default=os.environ.get("DBD_ROOTFS", "bookworm"), help="guest root fs")
    group.addoption(
        "--seed",
        type=int,
        default=int(os.environ["DBD_SEED"]) if os.environ.get("DBD_SEED") else None,
        help="base seed of the oracle scenarios (default: each test's own fixed seed, printed on failure)",
    )
    group.addoption(
        "--deep-on",
        default=os.environ.get("DBD_DEEP_ON", "auto"),
        help="kernels that also run the tests marked deep: 'auto' (the default target with --kernel all, "
        "else every chosen kernel), 'all', or a comma list",
    )
    group.addoption(
        "--long",
        action="store_true",
        default=os.environ.get("DBD_LONG") == "1",
        help="also run the tests marked long (gigabyte volumes, minutes-long races)",
    )
    group.addoption(
        "--ko",
        default=os.environ.get(module_under_test.ENV_KO),
        help="test a prebuilt module instead of kernel/: a .ko, or a directory of <target>.ko",
    )
    group.addoption(
        "--module-src",
        default=os.environ.get(module_under_test.ENV_SRC),
        help="test the module built from this source tree instead of kernel/",
    )
    group.addoption(
        "--module-build",
        default=os.environ.get(module_under_test.ENV_BUILD),
        help="build command for --module-src in the target's chroot (default "
        "'make -C {src} -j{jobs} KDIR={kdir}'; {release} is the kernel release)",
    )
    group.addoption(
        "--soak",
        action="store_true",
        default=os.environ.get("DBD_SOAK") == "1",
        help="also run the nightly tier: tests marked soak, and debugkernel(soak=True) on debug kernels",
    )


_CONFIG: dict[str, pytest.Config] = {}


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config
    try:
        chosen = module_under_test.choose(
            config.getoption("--ko"), config.getoption("--module-src"), config.getoption("--module-build")
        )
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    chosen.export()
    config.addinivalue_line("markers", "guest: needs a QEMU guest (boots a throwaway VM)")
    config.addinivalue_line("markers", "slow: takes more than a minute")
    config.addinivalue_line("markers", "guest_config(**kwargs): Guest() keyword arguments for this test")
    config.addinivalue_line("markers", "deep: full-depth scenario, runs only on the --deep-on kernels")
    config.addinivalue_line(
        "markers", "debugkernel: also runs on the debug kernels (the only tests that run there)"
    )
    config.addinivalue_line("markers", "debugonly: runs only on the debug kernels")
    config.addinivalue_line("markers", "long: many minutes under TCG; only with --long (run-tests gives it)")
    config.addinivalue_line("markers", "soak: nightly tier; only with --soak (run-tests does not give it)")


def selected_kernels(config: pytest.Config) -> list[str]:
    value = str(config.getoption("--kernel")).strip()
    if value == "all":
        return images.all_targets()
    return [k.strip() for k in value.split(",") if k.strip()]


def deep_kernels(config: pytest.Config) -> list[str]:
    """The chosen kernels that also run the tests marked deep (see the module docstring)."""
    chosen = selected_kernels(config)
    value = str(config.getoption("--deep-on")).strip()
    if value == "auto":
        if str(config.getoption("--kernel")).strip() != "all":
            return chosen
        value = images.default_target()
    if value == "all":
        return chosen
    wanted = {k.strip() for k in value.split(",") if k.strip()}
    return [k for k in chosen if k in wanted]


def pytest_report_header(config: pytest.Config) -> list[str]:
    chosen = selected_kernels(config)
    debug = [k for k in chosen if images.is_debug_target(k)]
    deep = [k for k in deep_kernels(config) if k not in debug]
    subset = [k for k in chosen if k not in deep and k not in debug]
    line = f"guest kernels: all tests on {', '.join(deep) or 'none'}"
    line += f"; without the deep ones on {', '.join(subset)}" if subset else ""
    line += f"; only the debugkernel ones on {', '.join(debug)}" if debug else ""
    line += "; long ones included" if config.getoption("--long") else "; long ones deselected (--long)"
    line += "; soak ones included" if config.getoption("--soak") else "; soak ones deselected (--soak)"
    return [line, f"module under test: {module_under_test.from_env().describe()}"]


def _runs_on(item: pytest.Item, deep: set[str], long: bool = False, soak: bool = False) -> bool:
    """Whether this instance runs at this matrix depth (see the module docstring)."""
    if item.get_closest_marker("long") and not long:
        return False
    if item.get_closest_marker("soak") and not soak:
        return False
    target = _target_of(item)
    if target is not None and images.is_debug_target(target):
        debugkernel = item.get_closest_marker("debugkernel")
        if debugkernel is not None and debugkernel.kwargs.get("soak") and not soak:
            return False
        return debugkernel is not None or item.get_closest_marker("debugonly") is not None
    if item.get_closest_marker("debugonly"):
        return False
    return not item.get_closest_marker("deep") or target in deep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" in metafunc.fixturenames:
        kernels = selected_kernels(metafunc.config)
        metafunc.parametrize("target", kernels, indirect=True, ids=kernels, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deep = set(deep_kernels(config))
    long = bool(config.getoption("--long"))
    soak = bool(config.getoption("--soak"))
    shallow = [item for item in items if not _runs_on(item, deep, long, soak)]
    if shallow:
        config.hook.pytest_deselected(items=shallow)
        dropped = {id(item) for item in shallow}
        items[:] = [item for item in items if id(item) not in dropped]
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & GUEST_FIXTURES:
            item.add_marker(pytest.mark.guest)
            item.add_marker(pytest.mark.slow)
    _longest_first(items, shortest=os.environ.get(SHORTEST_FIRST_ENV) == "1")


# Longest-first scheduling: with 2 xdist workers a long test started last leaves one worker idle
# for minutes. Guest tests are ordered by their last known duration (kept in the harness cache,
# outside the checkout, over a seed committed in ci/ so that a cold cache schedules as well);
# unknown ones count as long, so new tests start early.
DURATIONS_FILE = "guest-test-durations.json"
DURATIONS_SEED = Path(__file__).resolve().parents[1] / "ci" / DURATIONS_FILE
UNKNOWN_DURATION = 90.0
# A run that stops at its first failure (ci/mutation's -x) learns soonest from the short tests.
SHORTEST_FIRST_ENV = "DBD_SHORTEST_FIRST"
_DURATIONS = pytest.StashKey[dict[str, float]]()


def _durations_path() -> Any:
    from vmimages.cache import cache_dir

    return cache_dir() / DURATIONS_FILE


def _read_durations(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _load_durations() -> dict[str, float]:
    """The seed's durations, overridden by those this machine measured."""
    return {**_read_durations(DURATIONS_SEED), **_read_durations(_durations_path())}


def _longest_first(items: list[pytest.Item], shortest: bool = False) -> None:
    known = _load_durations()
    guest = [i for i in items if i.get_closest_marker("guest")]
    if len(guest) < 2:
        return
    order = {id(i): n for n, i in enumerate(items)}
    sign = 1 if shortest else -1
    guest.sort(key=lambda i: (sign * known.get(i.nodeid, UNKNOWN_DURATION), order[id(i)]))
    rest = [i for i in items if not i.get_closest_marker("guest")]
    items[:] = rest + guest


def first_line(report: pytest.TestReport) -> str:
    """The first line of a failure's message (the kernel's report for a KernelCrashError)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(report.longrepr or "")
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = getattr(report, "config", None) or _CONFIG.get("config")
    if config is None:
        return
    if report.passed or report.failed:
        seen = config.stash.setdefault(_DURATIONS, {})
        seen[report.nodeid] = seen.get(report.nodeid, 0.0) + report.duration
    # Under xdist the controller shows only dots until the end: name each failure as it comes.
    xdist_controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    tr = config.pluginmanager.get_plugin("terminalreporter") if report.failed and xdist_controller else None
    if tr is not None:
        tr.write_line(f"FAILED {report.nodeid} ({report.when}): {first_line(report)}", red=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or a plain run) merges this run's guest test durations into the cache."""
    if hasattr(session.config, "workerinput"):
        return
    if module_under_test.from_env().foreign:
        return  # another module's timings would mislead the scheduling of ours
    seen = session.config.stash.get(_DURATIONS, {})
    seen = {k: v for k, v in seen.items() if "[debian-" in k or "-debian-" in k}  # guest tests
    if not seen:
        return
    merged = {**_load_durations(), **{k: round(v, 1) for k, v in seen.items()}}
    path = _durations_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs the ordering


def _target_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return str(callspec.params["target"]) if callspec and "target" in callspec.params else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.failed and rep.when in ("setup", "call"):
        item.stash[_FAILED] = True
        if set(getattr(item, "fixturenames", ())) & GUEST_FIXTURES:
            rep.sections.append(("guest artifacts", str(artifacts.test_dir(item.nodeid))))
        if _SEED in item.stash:
            rep.sections.append(
                ("workload seed", f"{item.stash[_SEED]} (rerun with --seed {item.stash[_SEED]})")
            )
    return rep


def default_smp() -> int:
    """vCPUs per guest: 1 unless DBD_SMP says otherwise (a test can ask with guest_config(smp=2)).

    Under TCG on this 2-core host, two-vCPU guests hit emulator artefacts that a kernel reports as
    real findings: a starved vCPU thread shows as an RCU stall, and 6.12/7.2 sometimes oops at boot
    in int3 text patching (static keys) when the other vCPU runs the patched code. With one vCPU
    neither happens, and preemption still interleaves the module's threads. (Under TCG that one
    vCPU has a second, never online, beside it: harness.qemu.smp_option says why.)
    """
    return int(os.environ.get("DBD_SMP", "1"))


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> str:
    """The kernel target of this test instance (parametrized from --kernel)."""
    return str(getattr(request, "param", None) or selected_kernels(request.config)[0])


@pytest.fixture(scope="session")
def rootfs(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--rootfs"))


@pytest.fixture(scope="session")
def guest_image(target: str, rootfs: str) -> Any:
    """The GuestImage of the target (built once per session and target; cached on disk by vmimages)."""
    return images.guest_image(target, rootfs)


@pytest.fixture
def guest(request: pytest.FixtureRequest, target: str, rootfs: str) -> Iterator[Guest]:
    """A freshly booted guest (module not loaded) with one 512 MiB sparse scratch disk at /dev/vdb."""
    marker = request.node.get_closest_marker("guest_config")
    kwargs: dict[str, Any] = {"disks": DEFAULT_DISKS, **(marker.kwargs if marker else {})}
    kwargs.setdefault("module", False)
    kwargs.setdefault("smp", default_smp())
    yield from _booted(request, Guest(target=target, rootfs=rootfs, name=request.node.nodeid, **kwargs))


def _booted(request: pytest.FixtureRequest, g: Guest) -> Iterator[Guest]:
    """Boot g for the test, then finish it (artifacts on failure, kernel findings fail the test)."""
    try:
        g.boot()
    except BaseException:
        g.finish(test_failed=True, artifact_dir=artifacts.test_dir(request.node.nodeid))
        raise
    yield g
    g.finish(
        test_failed=request.node.stash.get(_FAILED, False),
        artifact_dir=artifacts.test_dir(request.node.nodeid),
    )


@pytest.fixture
def boot_integration_guest(
    request: pytest.FixtureRequest, target: str, rootfs: str, tmp_path: Any
) -> Iterator[Guest]:
    """A guest whose initramfs runs dist/'s early-boot reload (harness.bootint) before mounting
    the root: the module is loaded by the initramfs at every boot, and persisted reload scripts
    (`dbdctl persist-reload`) on the root are run as on a real system."""
    from harness.bootint import boot_integration_image

    image = boot_integration_image(target, tmp_path / "bootint", rootfs)
    g = Guest(
        target=target, rootfs=rootfs, name=request.node.nodeid, module=False, smp=default_smp(), image=image
    )
    yield from _booted(request, g)


@pytest.fixture
def seed(request: pytest.FixtureRequest, target: str) -> int:
    """This test's workload seed: --seed if given, else a fixed value derived from the test's id, so
    every run of a test repeats the same workload. A failure report shows how to rerun it."""
    base = request.config.getoption("--seed")
    value = int(base) if base is not None else zlib.crc32(request.node.nodeid.encode()) % 1_000_000
    request.node.stash[_SEED] = value
    return value


@pytest.fixture
def oracles(request: pytest.FixtureRequest, guest: Guest, seed: int, target: str) -> Iterator[Oracles]:
    """guestlib's oracles in this test's guest; the test counts as one oracle scenario."""
    rerun = shlex.join(
        [
            "pytest",
            request.node.nodeid,
            "--kernel",
            target,
            "--seed",
            str(seed),
            *module_under_test.from_env().args(),
        ]
    )
    o = Oracles(guest, Tally(), context=f"seed {seed}; rerun: {rerun}")
    o.start_write_trace()
    yield o
    request.node.user_properties.extend([("oracle_scenario", 1), *o.tally.properties()])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line for the oracle scenarios of this run (also under xdist: user_properties travel)."""
    totals: dict[str, int] = {}
    scenarios: set[str] = set()
    failed: set[str] = set()
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if not isinstance(rep, pytest.TestReport):
                continue
            if rep.failed:
                failed.add(rep.nodeid)
            props = dict(rep.user_properties)
            if rep.when == "teardown" and "oracle_scenario" in props:
                scenarios.add(rep.nodeid)
                for key, value in props.items():
                    if isinstance(value, int):
                        totals[key] = totals.get(key, 0) + value
    if scenarios:
        terminalreporter.write_line(
            f"oracle scenarios: {len(scenarios)} run, {len(scenarios & failed)} failed; "
            f"{totals.get('oracle_blocks_verified', 0)} blocks verified, "
            f"{totals.get('oracle_checks_passed', 0)} checks passed, "
            f"{totals.get('oracle_crash_points', 0)} crash points checked"
        )


@pytest.fixture
def module_guest(guest: Guest) -> Guest:
    """The `guest` with the dattobd module (built from kernel/ for the target) loaded, debug=1."""
    guest.load_module()
    return guest


@pytest.fixture
def scratch_disk(guest: Guest) -> GuestDisk:
    """The guest's first data disk (/dev/vdb), blank."""
    disks = guest.disks
    if not disks:
        raise pytest.UsageError("scratch_disk needs a guest with a data disk (see guest_config(disks=...))")
    return disks[0]


def _volume(guest: Guest, disk: GuestDisk, fstype: str) -> Volume:
    # ext4 without lazy init: its background zeroing of inode tables would otherwise write tens of
    # MiB during the test, racing with COW-capacity and change-count assertions.
    mkfs = {
        # no orphan_file (trixie's default): 5.10 cannot mount it
        "ext4": "mkfs.ext4 -q -F -O ^orphan_file -E lazy_itable_init=0,lazy_journal_init=0",
        "xfs": "mkfs.xfs -q -f",
    }[fstype]
    guest.check(f"{mkfs} {disk.device} && mkdir -p {VOLUME_MOUNT} && mount {disk.device} {VOLUME_MOUNT}")
    return Volume(disk.device, VOLUME_MOUNT, fstype, disk)


@pytest.fixture
def ext4_volume(guest: Guest, scratch_disk: GuestDisk) -> Volume:
    """ext4 made on the scratch disk and mounted at /mnt/vol."""
    return _volume(guest, scratch_disk, "ext4")


@pytest.fixture
def xfs_volume(guest: Guest, scratch_disk: GuestDisk) -> Volume:
    """XFS made on the scratch disk and mounted at /mnt/vol (XFS needs a disk of 300 MiB or more)."""
    return _volume(guest, scratch_disk, "xfs")


__all__ = ["DiskSpec", "Volume"]
