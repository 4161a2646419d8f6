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

The command installer (`--installer command`) is cut the same way: its command logs
each run and copies the verified file to an `installed` file. A cut before the agent
recorded the command's outcome (during the command too) runs it again, once; any other
cut does not, and no later poll runs it again.

A credential rotation (`tufa-agent rotate-credential`) is cut at each of its steps too:
after the server answered, halfway through and before the rename of the credential
file's write, and after the write. The device always comes back with a whole credential
that works, and once a rotation completes only the credential on its disk does.

To keep this fast the devices are prepared once per module (42 installed, 43 published;
one with nothing installed; one whose command installed 42); each case boots the real
agent from a copy of that state directory, the disk the device would come back with.
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
from sqlalchemy import select

from tests.agent_helpers import (
    AgentDevice,
    TamperingProxy,
    build_bytes,
    image_name,
    publish_build,
)
from tests.helpers import Factory, Server, create_factory, db_rows, send
from tufa.agent.state import AgentStatus
from tufa.core.crashpoints import ENV_VAR as CRASH_AT
from tufa.server.db import retired_credentials

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
ROTATE_POINTS = ("rotate:answered", "rotate:saved")
# The points a working update passes, in order (a failing one also rolls back).
WORKING_UPDATE = (DOWNLOAD_POINT, *(p for p in INSTALL_POINTS if p != "install:rolled-back"))
# The points a working update passes with the command installer, which has no slots.
COMMAND_UPDATE = (DOWNLOAD_POINT, "install:pending-saved", "install:concluded")

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

# The command installer's command: it logs each run (the version) and copies the verified
# file to `installed`, both on the device's disk (next to the agent's state, so a booted
# copy has them). `cp` overwrites: safe to repeat. With TUFA_TEST_CUT_COMMAND set, the
# power goes off halfway through the copy: the agent and the command are killed.
INSTALL_COMMAND = (
    'disk="$(dirname "$(dirname "$TUFA_TARGET_PATH")")" '
    '&& echo "$TUFA_TARGET_VERSION" >> "$disk/install-command.log" '
    '&& if [ -n "$TUFA_TEST_CUT_COMMAND" ]; then '
    'head -c 1000 "$TUFA_TARGET_PATH" > "$disk/installed"; kill -KILL "$PPID" "$$"; fi '
    '&& cp "$TUFA_TARGET_PATH" "$disk/installed"'
)

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
    command: AgentDevice  # 42 installed by the command installer, 43 published
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
    command = AgentDevice.register(
        factory, where, extra=("--installer", "command", "--install-command", INSTALL_COMMAND)
    )
    done = command.run_once()
    assert done.returncode == 0, done.stderr
    assert command_runs(command) == ["42"]
    assert (command.dir / "installed").read_bytes() == builds["42"]
    builds["43"] = publish_build(factory, "43", build_bytes("43", BIG))
    new = AgentDevice.register(factory, where, extra=("--health-check", HEALTH_CHECK))
    return Prepared(factory, upgrading, new, command, builds)


def boot_copy(device: AgentDevice, where: Path) -> AgentDevice:
    """The same device booting from a copy of its state directory (`current` is a
    relative link, so it stays one)."""
    where.mkdir(parents=True, exist_ok=True)
    copy = where / device.name
    shutil.copytree(device.dir, copy, symlinks=True)
    return AgentDevice(device.factory, copy, device.name, device.channel)


def command_runs(device: AgentDevice) -> list[str]:
    """The versions the install command was run for, in order (its log)."""
    log = device.dir / "install-command.log"
    return log.read_text().split() if log.exists() else []


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
    by_command: bool = False,
) -> None:
    """The status agrees with what runs (`tufa-agent status` too, `with_cli`); every
    event was delivered and the server knows what runs; nothing is left over. What runs
    is the `current` slot, or with the command installer (`by_command`) what its
    command copied to `installed`."""
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
    expected = None if installed is None else builds[installed]
    if by_command:
        assert not os.path.lexists(device.dir / "current")  # no slots of the agent's own
        assert (device.dir / "installed").read_bytes() == expected
    else:
        assert device.running_bytes() == expected
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
    tested = {point for point, _ in UPDATE_CASES} | set(WRITE_POINTS) | set(ROTATE_POINTS)
    assert found == {DOWNLOAD_POINT, *INSTALL_POINTS, *WRITE_POINTS, *ROTATE_POINTS} == tested
    assert {point for point, _ in ROTATION_CASES} == {*ROTATE_POINTS, *WRITE_POINTS}


# A failed release is recorded as failed before the rollback: a cut after that point
# finishes the rollback and does not try the release again.
AFTER_THE_VERDICT = ("install:rolled-back", "install:concluded")


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
    # A failing 43 fails again in this run, unless the cut came after the verdict was saved.
    assert done.returncode == (1 if broken and point not in AFTER_THE_VERDICT else 0), done.stderr
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
    assert done.returncode == (1 if broken and point not in AFTER_THE_VERDICT else 0), done.stderr
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


# -- the command installer -----------------------------------------------------------------

DURING_THE_COMMAND = "during-the-command"
# (how the power is cut, how many times the command ran for 43 before the cut, and in all).
COMMAND_CASES = [
    (DOWNLOAD_POINT, 0, 1),
    ("install:pending-saved", 0, 1),  # recorded as pending, the command not yet run
    (DURING_THE_COMMAND, 1, 2),  # halfway through its copy: run again
    ("install:concluded", 1, 1),  # its success recorded: not run again
]


def cut_the_command_installer(
    prepared: Prepared,
    where: Path,
    crash: dict[str, str],
    ran: int,
    runs: int,
    with_cli: bool = False,
) -> None:
    """Boot a copy of the command device, cut its update to 43 with the environment
    `crash`; then a clean run. After the cut the device is known to run 42 or 43, the
    command's copy holds exactly 42's or 43's bytes (a prefix of 43's when the cut came
    during the copy), and the status says 43 is installed only once the command copied it.
    The clean run ends on 43 with the command run `runs` times for it in all (`ran` of
    them before the cut); a later poll does not run it again."""
    builds = prepared.builds
    device = boot_copy(prepared.command, where)
    done = device.run_once(env=crash)
    assert done.returncode == -signal.SIGKILL, f"{crash}: {done.returncode}\n{done.stderr}"
    assert command_runs(device) == ["42", *["43"] * ran], crash
    status = read_status(device)
    assert status.installed is not None, status
    assert status.installed.version in ("42", "43"), status
    assert status.pending is None or status.pending.version == "43", status
    copied = (device.dir / "installed").read_bytes()
    if crash.get("TUFA_TEST_CUT_COMMAND"):
        assert copied == builds["43"][:1000]
    else:
        assert copied in (builds["42"], builds["43"]), crash
    if status.installed.version == "43":
        assert copied == builds["43"], f"{crash}: 43 recorded as installed before its copy"

    done = device.run_once()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, f"{crash}: {done.stderr}"
    assert command_runs(device) == ["42", *["43"] * runs], crash
    assert_settled(device, builds, "43", False, with_cli=with_cli, by_command=True)
    again = device.run_once()
    assert again.returncode == 0, f"{crash}: {again.stderr}"
    assert "version 43 (rpi4-image-43) is up to date" in again.stderr, again.stderr
    assert command_runs(device) == ["42", *["43"] * runs], f"{crash}: run again by a poll"


@sqlite_only
@pytest.mark.parametrize(
    ("cut", "ran", "runs"), COMMAND_CASES, ids=[cut for cut, _, _ in COMMAND_CASES]
)
def test_power_cut_during_an_update_by_the_install_command(
    prepared: Prepared, tmp_path: Path, cut: str, ran: int, runs: int
) -> None:
    crash = {"TUFA_TEST_CUT_COMMAND": "1"} if cut == DURING_THE_COMMAND else {CRASH_AT: cut}
    cut_the_command_installer(prepared, tmp_path, crash, ran, runs, with_cli=True)


@sqlite_only
@pytest.mark.parametrize("half", [0, 1], ids=["odd-writes", "even-writes"])
def test_power_cut_at_each_file_write_of_an_update_by_the_install_command(
    prepared: Prepared, tmp_path: Path, half: int
) -> None:
    """Every atomic write of the update cut in turn, as in the slots' test above. A write
    after the install was recorded as pending and before its success was (the events,
    the status) leaves the command run and its outcome unknown: it is run again."""
    trace = tmp_path / "trace"
    clean = boot_copy(prepared.command, tmp_path / "clean")
    done = clean.run_once(env=tracer_env(tmp_path, TUFA_TEST_TRACE=str(trace)))
    assert done.returncode == 0, done.stderr
    assert command_runs(clean) == ["42", "43"]
    passed = trace.read_text().split()
    assert [p for p in passed if p not in WRITE_POINTS] == list(COMMAND_UPDATE)
    writes = passed.count(WRITE_POINTS[0])
    assert writes == passed.count(WRITE_POINTS[1])
    pending, concluded = passed.index("install:pending-saved"), passed.index("install:concluded")
    assert WRITE_POINTS[0] in passed[pending:concluded], passed  # some cuts rerun the command

    for hit in range(1 + half, writes + 1, 2):
        point = WRITE_POINTS[(hit - 1) % 2]
        at = [i for i, p in enumerate(passed) if p == point][hit - 1]
        crash = tracer_env(tmp_path, TUFA_TEST_CRASH_POINT=point, TUFA_TEST_CRASH_HIT=str(hit))
        cut_the_command_installer(
            prepared,
            tmp_path / f"write-{hit}",
            crash,
            ran=1 if at > pending else 0,
            runs=2 if pending < at < concluded else 1,
        )


# -- a credential rotation ------------------------------------------------------------------

# (crash point, whether the new credential is on the device's disk when the power goes).
# The server has issued the new credential at every one of them.
ROTATION_CASES = [
    ("rotate:answered", False),
    ("write:half-written", False),
    ("write:before-rename", False),
    ("rotate:saved", True),
]


def credential_on_disk(device: AgentDevice) -> str:
    path = device.dir / "credential"
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


def works(factory: Factory, credential: str) -> bool:
    path = factory.path("/repo/ci/metadata/timestamp.json")
    status = send(factory.server, "GET", path, credential).status_code
    assert status in (200, 401), status
    return status == 200


@pytest.mark.parametrize(("point", "saved"), ROTATION_CASES, ids=[p for p, _ in ROTATION_CASES])
def test_power_cut_during_a_credential_rotation(
    factory: Factory, tmp_path: Path, point: str, saved: bool
) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path)
    assert device.run_once().returncode == 0
    old = credential_on_disk(device)

    done = device.agent("rotate-credential", env={CRASH_AT: point})
    assert done.returncode == -signal.SIGKILL, f"{point}: {done.returncode}\n{done.stderr}"
    on_disk = credential_on_disk(device)
    assert on_disk.startswith("tufad_")
    assert len(on_disk) == len(old)  # a whole credential, never half of one
    assert (on_disk != old) is saved

    # The device comes back and goes on as before, with what its disk holds.
    publish_build(factory, "43")
    done = device.run_once()
    assert done.returncode == 0, f"{point}: {done.stderr}"
    assert device.installed_version() == "43"
    record = factory.request("GET", f"/devices/{device.name}").json()
    assert record["installed_version"] == "43"
    if saved:
        # That run was the new credential's first use: the old one died with it.
        assert not works(factory, old)
    else:
        # The new credential was lost with the power, and the old one still works: the
        # next rotation goes through, and the lost one never will.
        assert works(factory, old)
        done = device.agent("rotate-credential")
        assert done.returncode == 0, done.stderr
        assert not works(factory, old)
    final = credential_on_disk(device)
    assert final != old
    assert works(factory, final)
    assert (
        factory.request("GET", f"/devices/{device.name}").json()["credential_rotation_pending"]
        is False
    )
    assert [p.name for p in device.dir.iterdir() if p.name.endswith(".tmp")] == []
    # What died: the old credential, replaced; and a lost one, superseded by the retry.
    retired = db_rows(
        factory.server,
        select(retired_credentials.c.reason).where(retired_credentials.c.device_id == record["id"]),
    )
    assert sorted(r.reason for r in retired) == (
        ["replaced"] if saved else ["replaced", "superseded"]
    )
