"""Power cuts during an install, with real `tufa-agent` processes and a real server.

`tufa-agent run --once` runs with TUFA_CRASH_AT=POINT and sends itself SIGKILL when it
reaches POINT (`tufa.core.crashpoints`), as a power cut would stop it: every crash point
of the agent (download, install steps) and of the atomic file writes it relies on. The
device has version 42 installed and 43 published (or, for a first install, nothing
installed); its health check verifies the running file against the signed SHA-256 and,
when a test says so, fails for 43.

After the cut, `current` points at a complete slot that holds exactly 42's or 43's
published bytes (on a first install: at nothing, or at a complete 43), which the status
file knows as installed or being installed; never at a half-written or empty slot, never
dangling; status.json parses. The next run, with no crash, ends on 43 (or on 42, or
nothing, with 43 marked failed when its health check fails), with every event delivered
and no partial or temporary file left behind.

To keep this fast the devices are prepared once per module (42 installed, 43 published;
and one with nothing installed); each case boots the real agent from a copy of that
state directory, the disk the device would come back with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent_helpers import (
    AgentDevice,
    TamperingProxy,
    build_bytes,
    image_name,
    publish_build,
)
from tests.helpers import Factory, Server, create_factory
from tufa.agent.state import AgentStatus
from tufa.core.crashpoints import ENV_VAR as CRASH_AT

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

SRC = Path(__file__).resolve().parents[1] / "src" / "tufa"
BROKEN = "TUFA_TEST_BROKEN_VERSION"  # the version the health check rejects, if any
# Passes when the running file is the signed one and its version is not BROKEN.
HEALTH_CHECK = (
    'echo "$TUFA_TARGET_SHA256  $TUFA_TARGET_PATH" | sha256sum --check --status - '
    f'&& test "$TUFA_TARGET_VERSION" != "${BROKEN}"'
)
# Several download chunks (256 KiB), so that `download:half-written` leaves half a file.
BIG = 1024 * 1024 + 123

DOWNLOAD_POINT = "download:half-written"
INSTALL_POINTS = (
    "install:slot-cleared",
    "install:file-placed",
    "install:slot-written",
    "install:pending-saved",
    "install:switched",
    "install:health-checked",
    "install:rolled-back",
    "install:concluded",
)
WRITE_POINTS = ("write:half-written", "write:before-rename")
# The points a working update passes, in order (a failing one also rolls back).
WORKING_UPDATE = (DOWNLOAD_POINT, *(p for p in INSTALL_POINTS if p != "install:rolled-back"))

# (crash point, whether 43's health check fails); the writes are cut one by one below.
UPDATE_CASES = [
    *((point, False) for point in WORKING_UPDATE),
    *(
        (point, True)
        for point in (
            "install:switched",
            "install:health-checked",
            "install:rolled-back",
            "install:concluded",
        )
    ),
]
FIRST_INSTALL_CASES = [
    *(
        (point, False)
        for point in (
            DOWNLOAD_POINT,
            "install:file-placed",
            "install:pending-saved",
            "install:switched",
            "install:concluded",
        )
    ),
    ("install:switched", True),
    ("install:rolled-back", True),
]

# Loaded before the agent by `sitecustomize` (PYTHONPATH): records each crash point
# reached in TUFA_TEST_TRACE, and crashes at the TUFA_TEST_CRASH_HIT-th time the point
# TUFA_TEST_CRASH_POINT is reached, through the real crash point (TUFA_CRASH_AT).
TRACER = """
import os

if os.environ.get("TUFA_TEST_TRACE") or os.environ.get("TUFA_TEST_CRASH_POINT"):
    import tufa.core.crashpoints as _crashpoints

    _real = _crashpoints.crashpoint
    _hits = {}

    def crashpoint(name):
        trace = os.environ.get("TUFA_TEST_TRACE")
        if trace:
            with open(trace, "a") as f:
                f.write(name + "\\n")
        _hits[name] = _hits.get(name, 0) + 1
        if name == os.environ.get("TUFA_TEST_CRASH_POINT") and _hits[name] == int(
            os.environ["TUFA_TEST_CRASH_HIT"]
        ):
            os.environ["TUFA_CRASH_AT"] = name
        _real(name)

    _crashpoints.crashpoint = crashpoint
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def health(broken: bool) -> dict[str, str]:
    return {BROKEN: "43"} if broken else {}


# -- the prepared devices -----------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    factory: Factory
    upgrading: AgentDevice  # 42 installed, 43 published and not yet seen
    new: AgentDevice  # registered, nothing installed, 43 published
    builds: dict[str, bytes]


@pytest.fixture(scope="module")
def prepared(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    factory = create_factory(server)
    where = tmp_path_factory.mktemp("prepared")
    upgrading = AgentDevice.register(factory, where, extra=("--health-check", HEALTH_CHECK))
    builds = {"42": publish_build(factory, "42")}
    done = upgrading.run_once()
    assert done.returncode == 0, done.stderr
    assert upgrading.running_bytes() == builds["42"]
    builds["43"] = publish_build(factory, "43", build_bytes("43", BIG))
    new = AgentDevice.register(factory, where, extra=("--health-check", HEALTH_CHECK))
    return Prepared(factory, upgrading, new, builds)


def boot_copy(device: AgentDevice, where: Path) -> AgentDevice:
    """The same device booting from a copy of its state directory (`current` is a
    relative link, so it stays one)."""
    where.mkdir(parents=True, exist_ok=True)
    copy = where / device.name
    shutil.copytree(device.dir, copy, symlinks=True)
    return AgentDevice(device.factory, copy, device.name, device.channel)


def tracer_env(where: Path, **settings: str) -> dict[str, str]:
    folder = where / "tracer"
    if not folder.exists():
        folder.mkdir()
        (folder / "sitecustomize.py").write_text(TRACER)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **settings}


# -- what a power cut may leave, and where the next run must end ----------------------------


def cut_power(device: AgentDevice, point: str, env: dict[str, str]) -> None:
    done = device.run_once(env={CRASH_AT: point, **env})
    assert done.returncode == -signal.SIGKILL, (
        f"the agent did not die at {point}: exit status {done.returncode}\n{done.stderr}"
    )


def read_status(device: AgentDevice) -> AgentStatus:
    """status.json parses, as JSON and as the agent's status."""
    path = device.dir / "status.json"
    return AgentStatus.from_json(json.loads(path.read_bytes())) if path.exists() else AgentStatus()


def assert_runs_a_complete_release(
    device: AgentDevice, builds: dict[str, bytes], first_install: bool
) -> str | None:
    """`current` is absent (first install only) or a link to a complete slot holding
    exactly a published build, which the status knows; return its version."""
    status = read_status(device)
    current = device.dir / "current"
    if not os.path.lexists(current):
        assert first_install, "an installed device was left with no `current` slot"
        assert status.installed is None
        return None
    assert current.is_symlink(), "`current` is not a link"
    slot = device.dir / os.readlink(current)
    assert slot.parent.resolve() == (device.dir / "slots").resolve(), os.readlink(current)
    assert slot.is_dir(), f"`current` dangles: {os.readlink(current)}"
    release = json.loads((slot / "release.json").read_bytes())
    version = release["version"]
    assert version in builds, release
    assert sorted(p.name for p in slot.iterdir()) == sorted(["release.json", image_name(version)])
    data = (slot / image_name(version)).read_bytes()
    assert data == builds[version], f"the running slot holds other bytes than {version}'s"
    assert release == {"version": version, "target": image_name(version), "sha256": sha256(data)}
    known = {r.sha256 for r in (status.installed, status.pending) if r is not None}
    assert release["sha256"] in known, f"the status knows nothing of the running {version}"
    if not first_install:
        assert status.installed is not None
    return str(version)


def leftovers(device: AgentDevice) -> list[str]:
    return sorted(
        str(p.relative_to(device.dir))
        for p in device.dir.rglob("*")
        if p.name.endswith((".part", ".tmp")) or p.name == "current.new"
    )


def assert_settled(
    device: AgentDevice,
    builds: dict[str, bytes],
    installed: str | None,
    failed: bool,
    with_cli: bool = False,
) -> None:
    """The status agrees with what runs (`tufa-agent status` too, `with_cli`); every
    event was delivered and the server knows what runs; nothing is left over."""
    status = read_status(device)
    assert (status.installed.version if status.installed else None) == installed, status
    assert status.pending is None, status
    assert status.failed == ([sha256(builds["43"])] if failed else []), status
    assert json.loads((device.dir / "events.json").read_bytes()) == []
    if with_cli:
        report = device.status()
        assert (report["installed"] or {}).get("version") == installed, report
        assert (report["installing"], report["unsent_events"]) == (None, 0), report
        assert report["failed_sha256"] == status.failed, report
    assert device.running_bytes() == (None if installed is None else builds[installed])
    assert leftovers(device) == []
    kept = sorted(p.name for p in (device.dir / "downloads").iterdir())
    assert kept == ([] if installed is None else [sha256(builds[installed])])
    config = json.loads((device.dir / "config.json").read_bytes())
    shown = device.factory.request("GET", f"/devices/{config['device_id']}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["installed_version"] == installed


# -- every crash point -----------------------------------------------------------------------


def test_every_crash_point_of_the_agent_is_tested() -> None:
    found = set()
    for path in [*(SRC / "agent").glob("*.py"), SRC / "core" / "files.py"]:
        found |= set(re.findall(r'crashpoint\("([^"]+)"\)', path.read_text()))
    tested = {point for point, _ in UPDATE_CASES} | set(WRITE_POINTS)
    assert found == {DOWNLOAD_POINT, *INSTALL_POINTS, *WRITE_POINTS} == tested


@sqlite_only
@pytest.mark.parametrize(
    ("point", "broken"),
    UPDATE_CASES,
    ids=[f"{p}-{'43-fails' if b else '43-works'}" for p, b in UPDATE_CASES],
)
def test_power_cut_during_an_update(
    prepared: Prepared, tmp_path: Path, point: str, broken: bool
) -> None:
    device = boot_copy(prepared.upgrading, tmp_path)
    cut_power(device, point, health(broken))
    assert assert_runs_a_complete_release(device, prepared.builds, False) in ("42", "43")

    done = device.run_once(env=health(broken))
    assert "Traceback" not in done.stderr, done.stderr
    # A failing 43 fails again in this run, unless the cut came after the verdict.
    assert done.returncode == (1 if broken and point != "install:concluded" else 0), done.stderr
    assert_settled(device, prepared.builds, "42" if broken else "43", broken)


@sqlite_only
@pytest.mark.parametrize(
    ("point", "broken"),
    FIRST_INSTALL_CASES,
    ids=[f"{p}-{'43-fails' if b else '43-works'}" for p, b in FIRST_INSTALL_CASES],
)
def test_power_cut_during_a_first_install(
    prepared: Prepared, tmp_path: Path, point: str, broken: bool
) -> None:
    device = boot_copy(prepared.new, tmp_path)
    cut_power(device, point, health(broken))
    assert assert_runs_a_complete_release(device, prepared.builds, True) in (None, "43")

    done = device.run_once(env=health(broken))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == (1 if broken else 0), done.stderr
    assert_settled(device, prepared.builds, None if broken else "43", broken, with_cli=True)


@sqlite_only
def test_a_download_cut_halfway_resumes_where_it_stopped(
    prepared: Prepared, tmp_path: Path
) -> None:
    device = boot_copy(prepared.upgrading, tmp_path)
    cut_power(device, DOWNLOAD_POINT, {})
    data = prepared.builds["43"]
    part = device.dir / "downloads" / f"{sha256(data)}.part"
    kept = part.read_bytes()
    assert 0 < len(kept) < len(data)
    assert data.startswith(kept)
    assert device.running_bytes() == prepared.builds["42"]

    proxy = TamperingProxy(prepared.factory.server.url)
    try:
        device.point_at(proxy.url)
        done = device.run_once()
        assert done.returncode == 0, done.stderr
        (fetched,) = proxy.requests_for(f".{image_name('43')}")
    finally:
        proxy.close()
    assert fetched.headers.get("Range") == f"bytes={len(kept)}-"
    assert fetched.status == 206
    assert len(fetched.body) == len(data) - len(kept)
    device.point_at(prepared.factory.server.url)
    assert_settled(device, prepared.builds, "43", False)


@sqlite_only
@pytest.mark.parametrize("half", [0, 1], ids=["odd-writes", "even-writes"])
def test_power_cut_at_each_file_write_of_an_update(
    prepared: Prepared, tmp_path: Path, half: int
) -> None:
    """Every atomic write of the update (status, events, the slot's release.json) cut in
    turn, the odd ones halfway through the temporary file, the even ones before the
    rename (this test's two halves run in parallel): the Nth time the agent passes the
    point, it dies."""
    trace = tmp_path / "trace"
    clean = boot_copy(prepared.upgrading, tmp_path / "clean")
    done = clean.run_once(env=tracer_env(tmp_path, TUFA_TEST_TRACE=str(trace)))
    assert done.returncode == 0, done.stderr
    passed = trace.read_text().split()
    assert [p for p in passed if p not in WRITE_POINTS] == list(WORKING_UPDATE)
    writes = passed.count(WRITE_POINTS[0])
    assert writes == passed.count(WRITE_POINTS[1])
    assert writes >= 8, passed  # status (3+), events (3+), release.json

    for hit in range(1 + half, writes + 1, 2):
        point = WRITE_POINTS[(hit - 1) % 2]
        device = boot_copy(prepared.upgrading, tmp_path / f"write-{hit}")
        crash = tracer_env(tmp_path, TUFA_TEST_CRASH_POINT=point, TUFA_TEST_CRASH_HIT=str(hit))
        done = device.run_once(env=crash)
        assert done.returncode == -signal.SIGKILL, f"write {hit}: {done.returncode} {done.stderr}"
        running = assert_runs_a_complete_release(device, prepared.builds, False)
        assert running in ("42", "43"), f"write {hit}"

        done = device.run_once()
        assert done.returncode == 0, f"write {hit}: {done.stderr}"
        assert_settled(device, prepared.builds, "43", False)


@sqlite_only
def test_the_daemon_outlives_an_interrupted_install_that_fails(
    prepared: Prepared, tmp_path: Path
) -> None:
    """A device restarted after a cut between the switch and the verdict on 43, which
    fails its health check: the agent rolls back, reports it, and keeps polling."""
    device = boot_copy(prepared.upgrading, tmp_path)
    cut_power(device, "install:health-checked", health(True))
    assert assert_runs_a_complete_release(device, prepared.builds, False) == "43"

    device.start(env=health(True))
    try:
        failed = sha256(prepared.builds["43"])
        device.wait_for(lambda s: failed in s.get("failed", []) and not s.get("pending"))
        events = device.dir / "events.json"
        deadline = time.monotonic() + 30
        while json.loads(events.read_bytes()):
            assert device.process is not None
            assert device.process.poll() is None, f"the agent exited\n{device.log()}"
            assert time.monotonic() < deadline, f"events never delivered\n{device.log()}"
            time.sleep(0.1)
        # And it goes on checking (last_check has a resolution of one second).
        checked = read_status(device).last_check
        device.wait_for(lambda s: s.get("last_check") != checked)
        assert device.process is not None
        assert device.process.poll() is None, f"the agent exited\n{device.log()}"
    finally:
        device.stop()
    assert "finishing the install of version 43" in device.log()
    assert_settled(device, prepared.builds, "42", True, with_cli=True)
