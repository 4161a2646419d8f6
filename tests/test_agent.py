"""The device agent as its user sees it: real `tufa-agent` processes against a real server.

Every test drives the installed `tufa-agent` command (register, check, run, status) in a
state directory of its own, against a `tufa-server` process, most of them through a
`TamperingProxy` that records each request and can take the server away, slow it or
rewrite an answer. Nothing is mocked: the agent verifies with python-tuf's ngclient,
downloads, installs into slots or through a command, rolls back, and reports; the owner
reads the reports with the real `tufa` CLI.

Covered: registration and its refusals, which build a device picks, the slot and the
command installers with their failures, the no-downgrade rule, reports (also after an
outage, and as wave counts), outages (down, hung, long) and the run loop's back-off,
resumed downloads, a full disk, an offline bundle, and that the agent imports nothing
of the server.

The agent does the same on either database, so one smoke test runs on both backends
and the rest on SQLite.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets

from tests.agent_helpers import (
    HARDWARE_ID,
    AgentDevice,
    Exchange,
    TamperingProxy,
    build_bytes,
    image_name,
    publish_build,
)
from tests.helpers import (
    Factory,
    Server,
    cli_env,
    run_cli,
    send,
    served_metadata,
    write_forged_mirror,
)
from tests.test_rotations import stolen_online_signers
from tests.test_waves import post_wave, prepared, start_owner
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS
from tufa.demo.local_server import console_script, free_port

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

MiB = 1024 * 1024


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def proxy(factory: Factory) -> Iterator[TamperingProxy]:
    """A tampering proxy in front of the test's server."""
    found = TamperingProxy(factory.server.url)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, as the small data partition of a device (needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a 2 MiB tmpfs at {disk}: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def succeeds(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def error_line(done: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The command failed with `status`, saying why in one line (click's `Error: ...`, or
    the run loop's ERROR log line) and with no traceback; that line."""
    assert done.returncode == status, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [
        line for line in done.stderr.splitlines() if line.startswith("Error: ") or " ERROR " in line
    ]
    assert len(lines) == 1, done.stderr
    return lines[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads_of(proxy: TamperingProxy, version: str) -> list[Exchange]:
    """The requests the device made for the file of build `version`."""
    return [e for e in proxy.requests_for(f".{image_name(version)}") if "/targets/" in e.path]


def header(exchange: Exchange, name: str) -> str | None:
    return next((v for k, v in exchange.headers.items() if k.lower() == name.lower()), None)


def slot(device: AgentDevice) -> str:
    """The slot `current` points at."""
    return os.readlink(device.dir / "current")


def leftovers(device: AgentDevice) -> list[str]:
    """Partial downloads in the device's downloads/ directory."""
    downloads = device.dir / "downloads"
    return sorted(p.name for p in downloads.glob("*.part")) if downloads.exists() else []


def device_record(factory: Factory, name: str) -> dict[str, Any]:
    """What `tufa devices show NAME --json` prints, read over HTTP (a CLI process costs
    a second; the CLI itself is run where the test is about what the owner sees)."""
    response = send(factory.server, "GET", factory.path(f"/devices/{name}"), factory.admin_token)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def shown_with_cli(factory: Factory, name: str, config: Path) -> dict[str, Any]:
    """`tufa devices show NAME --json`, as the owner runs it."""
    done = succeeds(run_cli("devices", "show", name, "--json", env=cli_env(factory, config)))
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def events_of(record: dict[str, Any]) -> Counter[tuple[str, str | None]]:
    """(kind, version) of each event the server holds for the device, with counts."""
    return Counter((e["kind"], e["version"]) for e in record["events"])


def server_devices(factory: Factory) -> list[str]:
    response = send(factory.server, "GET", factory.path("/devices"), factory.admin_token)
    assert response.status_code == 200, response.text
    return sorted(d["name"] for d in response.json())


def unregistered(factory: Factory, where: Path, name: str) -> AgentDevice:
    """A device whose `register` is still to be run (by the test, to see it refused)."""
    where.mkdir(parents=True, exist_ok=True)
    return AgentDevice(factory, where / name, name, "ci")


def register_args(
    factory: Factory, root: Path | None, name: str, *extra: str, token: str | None = None
) -> list[str]:
    """`tufa-agent register` arguments (without --root if `root` is None)."""
    return [
        "register", "--server", factory.server.url, "--factory", factory.name,
        "--token", token or factory.token("register"), "--hardware-id", HARDWARE_ID,
        "--tag", "main",
        *(["--root", str(root)] if root else []), "--name", name, *extra,
    ]  # fmt: skip


# -- one smoke test on both backends ----------------------------------------------------------


def test_agent_installs_a_build_and_reports_it(factory: Factory, tmp_path: Path) -> None:
    device = AgentDevice.register(factory, tmp_path)
    data = publish_build(factory, "1")
    succeeds(device.run_once())
    assert device.running_bytes() == data
    record = device_record(factory, device.name)
    assert (record["installed_version"], record["installed_sha256"]) == ("1", sha256(data))
    assert events_of(record) == Counter(
        {("download-started", "1"): 1, ("download-finished", "1"): 1, ("installed", "1"): 1}
    )


# -- resilience ------------------------------------------------------------------------------


@sqlite_only
def test_outages_and_a_hung_server_never_stop_the_agent_or_touch_what_runs(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    v1 = publish_build(factory, "1")
    hung = TamperingProxy(factory.server.url)
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    waiting = AgentDevice.register(factory, tmp_path, server_url=hung.url)
    offline: AgentDevice | None = None
    stuck: subprocess.Popen[str] | None = None
    try:
        succeeds(device.run_once())
        succeeds(waiting.run_once())
        v2 = publish_build(factory, "2")

        # A server that takes the connection and never answers: the agent gives up after
        # its 30 s timeout. Started now, it runs while the rest of the test does.
        hung.delay = 31.0
        started = time.monotonic()
        stuck = subprocess.Popen(
            [console_script("tufa-agent"), "run", "--once", "--dir", str(waiting.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        # A server that is down: one clear line, exit 1, and what runs stays.
        proxy.down = True
        line = error_line(device.run_once())
        assert line.endswith("check failed: server error: HTTP 503"), line
        assert device.running_bytes() == v1
        status = device.status()
        assert status["installed"]["version"] == "1"
        assert status["last_error"] == "server error: HTTP 503"

        # The run loop outlives the outage, asking less and less often (bounded).
        before = len(proxy.requests_for("root.json"))
        device.start("--max-backoff", "1", interval=0.2)
        cycles = cycle_times(proxy, before, count=6, timeout=20)
        assert device.process is not None
        assert device.process.poll() is None, device.log()
        assert device.running_bytes() == v1
        # 0.2 s doubled at each failure: 0.4, 0.8, then --max-backoff 1 s; 10 % jitter.
        # (Not backing off: 0.2 s apart; unbounded: 1.6, then 3.2, then 6.4 s.)
        gaps = [b - a for a, b in itertools.pairwise(cycles)]
        assert 0.3 <= gaps[0] <= 0.8, gaps
        assert 0.65 <= gaps[1] <= 1.3, gaps
        assert all(0.85 <= gap <= 1.6 for gap in gaps[2:]), gaps

        proxy.down = False
        back = time.monotonic()
        device.wait_installed("2", timeout=10)
        assert time.monotonic() - back < 3, "the back-off is bounded by --max-backoff"
        assert device.running_bytes() == v2
        device.stop()
        assert "check failed: server error: HTTP 503" in device.log()
        assert "Traceback" not in device.log()

        # A very long outage: past 1024 failures in a row (weeks at the default back-off,
        # seconds at --interval 0), 2**failures no longer fits a float; the loop goes on.
        offline = AgentDevice.register(factory, tmp_path)
        offline.point_at(f"http://127.0.0.1:{free_port()}")  # nothing listens there
        offline.start("--max-backoff", "0", interval=0)
        offline.wait_for(lambda _: offline.log().count("check failed") > 1100, timeout=90)
        offline.stop()
        assert "Traceback" not in offline.log()

        out, err = stuck.communicate(timeout=45)
        assert time.monotonic() - started < 40
        line = error_line(subprocess.CompletedProcess(stuck.args, stuck.returncode, out, err))
        assert line.endswith("check failed: cannot reach the server: it did not answer in time")
        assert waiting.running_bytes() == v1
        # The proxy answers a second later, to nobody; then it may close.
        deadline = time.monotonic() + 10
        while any(e.status == 0 for e in hung.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        device.stop()
        if offline is not None:
            offline.stop()
        if stuck is not None and stuck.poll() is None:
            stuck.kill()
            stuck.wait()
        hung.close()


def cycle_times(proxy: TamperingProxy, before: int, count: int, timeout: float) -> list[float]:
    """When the next `count` update cycles began (each opens with an `N.root.json`
    request; `before` of them came earlier), in seconds from now; fails after `timeout`."""
    start, seen, found = time.monotonic(), before, list[float]()
    while len(found) < count:
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"{len(found)} cycle(s) in {timeout} s: {found}"
        now = len(proxy.requests_for("root.json"))
        found += [elapsed] * (now - seen)
        seen = now
        time.sleep(0.02)
    return found[:count]


# -- registration -----------------------------------------------------------------------------


@sqlite_only
def test_register_refuses_a_root_it_cannot_trust_and_leaves_nothing(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    ci_root = factory.root_v1("ci")
    forged = json.loads(ci_root)
    for signature in forged["signatures"]:  # one hex digit changed in each signature
        sig = signature["sig"]
        signature["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    roots = {
        "forged": (json.dumps(forged).encode(), "is not signed by enough of its own root keys"),
        "garbage": (b"\x00 this is no root {", "is not valid TUF root metadata"),
    }
    device = unregistered(factory, tmp_path, "refused-1")
    missing = device.agent(*register_args(factory, None, device.name))
    assert missing.returncode == 2, missing.stderr
    assert "--root" in missing.stderr
    for label, (data, says) in roots.items():
        root_file = tmp_path / f"{label}-root.json"
        root_file.write_bytes(data)
        done = device.agent(*register_args(factory, root_file, device.name))
        line = error_line(done)
        assert says in line, line
        assert str(root_file) in line, line
    # A good root, and a token that may not register devices: the server says no.
    (tmp_path / "ci-root.json").write_bytes(ci_root)
    done = device.agent(
        *register_args(factory, tmp_path / "ci-root.json", device.name, token=factory.token("read"))
    )
    assert "the server refused the registration: HTTP 403" in error_line(done)
    assert not device.dir.exists(), "a refused registration left a state directory"
    assert server_devices(factory) == [], "a refused registration reached the server"

    # A CI root: the device follows the CI channel; the credential is for its eyes only.
    done = succeeds(device.agent(*register_args(factory, tmp_path / "ci-root.json", device.name)))
    assert f"Registered {device.name} (" in done.stdout
    assert "on the ci channel" in done.stdout
    assert (device.dir / "credential").stat().st_mode & 0o777 == 0o600
    assert (device.dir / "metadata" / "root.json").read_bytes() == ci_root
    assert json.loads((device.dir / "config.json").read_bytes())["channel"] == "ci"
    assert device_record(factory, device.name)["channel"] == "ci"

    # The same directory does not take a second device.
    again = device.agent(*register_args(factory, tmp_path / "ci-root.json", "refused-2"))
    assert "already holds a registered device" in error_line(again)
    assert server_devices(factory) == [device.name]

    # A production root (two targets signatures): the production channel.
    prod = AgentDevice.register(factory, tmp_path, root=factory.root_v1("prod"))
    assert json.loads((prod.dir / "config.json").read_bytes())["channel"] == "prod"
    assert device_record(factory, prod.name)["channel"] == "prod"


@sqlite_only
def test_run_needs_a_registered_device_and_its_trusted_root(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    nowhere = unregistered(factory, tmp_path, "never-registered")
    line = error_line(nowhere.run_once())
    assert "holds no registered device" in line
    assert "tufa-agent register" in line

    # No trust on first use: without its root the device refuses to ask the server.
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    publish_build(factory, "1")
    (device.dir / "metadata" / "root.json").unlink()
    asked = len(proxy.seen)
    line = error_line(device.run_once())
    assert "has no trusted root" in line
    assert "never trusts on first use" in line
    assert len(proxy.seen) == asked, "the device asked the server without a trusted root"
    assert device.running_bytes() is None


# -- which build a device picks ---------------------------------------------------------------


@sqlite_only
def test_check_picks_the_highest_version_for_its_hardware_and_tag(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    nine = publish_build(factory, "9")
    ten = publish_build(factory, "10")  # numerically above 9 ("10" < "9" as text)
    publish_build(factory, "11", hardware_ids=("imx8",))  # another board
    publish_build(factory, "12", name="rpi4-image-12-beta", tags=("beta",))  # another tag
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)

    # `check` says what it would install, and installs (downloads) nothing.
    done = succeeds(device.agent("check"))
    assert done.stdout == f"Version 10 ({image_name('10')}) is to be installed.\n"
    planned = json.loads(succeeds(device.agent("check", "--json")).stdout)
    assert planned == {
        "install": {
            "version": "10",
            "target": image_name("10"),
            "sha256": sha256(ten),
            "length": len(ten),
            "slot": None,
        },
        "reason": f"version 10 ({image_name('10')}) is to be installed",
    }
    assert [e.path for e in proxy.seen if "/targets/" in e.path] == []
    assert not (device.dir / "current").exists()

    before = datetime.now(UTC) - timedelta(seconds=2)
    succeeds(device.run_once())
    assert device.running_bytes() == ten != nine
    assert downloads_of(proxy, "9") == []
    status = device.status()
    assert status["installed"] == {
        "version": "10",
        "target": image_name("10"),
        "sha256": sha256(ten),
        "length": len(ten),
        "slot": "a",
    }
    assert status["installing"] is None
    assert status["last_error"] is None
    assert status["failed_sha256"] == []
    assert status["unsent_events"] == 0
    checked = datetime.fromisoformat(status["last_check"].replace("Z", "+00:00"))
    assert before <= checked <= datetime.now(UTC)
    served = served_metadata(factory, "ci")
    versions = {role: json.loads(data)["signed"]["version"] for role, data in served.items()}
    assert status["trusted_metadata"] == versions


# -- installers ------------------------------------------------------------------------------


@sqlite_only
def test_slot_installer_rolls_back_a_failing_build_and_never_retries_it(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    health = (
        'test -f "$TUFA_TARGET_PATH" && '
        '{ test "$TUFA_TARGET_VERSION" != 43 || { echo "selftest failed" >&2; exit 3; }; }'
    )
    device = AgentDevice.register(
        factory, tmp_path, server_url=proxy.url, extra=("--health-check", health)
    )
    v42 = publish_build(factory, "42")
    succeeds(device.run_once())
    assert slot(device) == "slots/a"
    assert device.running_bytes() == v42
    assert (device.dir / "slots" / "a" / image_name("42")).read_bytes() == v42

    # 43 fails its health check: back to 42, exactly as it was.
    v43 = publish_build(factory, "43")
    line = error_line(device.run_once())
    assert "version 43 failed to install: the health check exited with status 3" in line
    assert "selftest failed" in line
    assert slot(device) == "slots/a"
    assert device.running_bytes() == v42
    status = device.status()
    assert status["installed"]["version"] == "42"
    assert status["installing"] is None
    assert status["failed_sha256"] == [sha256(v43)]
    assert "version 43 failed to install" in status["last_error"]
    assert not (device.dir / "downloads" / sha256(v43)).exists()
    assert len(downloads_of(proxy, "43")) == 1

    # It is not tried again: no download, no switch, 42 keeps running.
    done = succeeds(device.run_once())
    assert "failed to install before; waiting for a newer version" in done.stderr
    assert len(downloads_of(proxy, "43")) == 1
    assert slot(device) == "slots/a"
    assert device.running_bytes() == v42

    # A newer build goes to the other slot; the old one stays for a rollback.
    v44 = publish_build(factory, "44")
    succeeds(device.run_once())
    assert slot(device) == "slots/b"
    assert device.running_bytes() == v44
    assert (device.dir / "slots" / "a" / image_name("42")).read_bytes() == v42

    # The owner sees what runs, and what happened on the way, each event once.
    record = shown_with_cli(factory, device.name, tmp_path / "owner.json")
    assert (record["installed_version"], record["installed_sha256"]) == ("44", sha256(v44))
    assert events_of(record) == Counter(
        {
            ("download-started", "42"): 1,
            ("download-finished", "42"): 1,
            ("installed", "42"): 1,
            ("download-started", "43"): 1,
            ("download-finished", "43"): 1,
            ("install-failed", "43"): 1,
            ("rolled-back", "43"): 1,
            ("download-started", "44"): 1,
            ("download-finished", "44"): 1,
            ("installed", "44"): 1,
        }
    )
    details = {e["kind"]: e["detail"] for e in record["events"] if e["version"] == "43"}
    assert "selftest failed" in details["install-failed"]
    assert details["rolled-back"] == "back to 42"


@sqlite_only
def test_command_installer_gets_the_verified_file_and_a_failure_is_not_retried(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    flashed, calls = tmp_path / "flashed", tmp_path / "calls.txt"
    flashed.mkdir()
    command = (
        f'echo "$TUFA_TARGET_VERSION" >> {shlex.quote(str(calls))}; '
        'if [ "$TUFA_TARGET_VERSION" = 3 ]; then echo "flash failed" >&2; exit 7; fi; '
        f'cp "$TUFA_TARGET_PATH" {shlex.quote(str(flashed))}/"$TUFA_TARGET_NAME"'
    )
    lacking = unregistered(factory, tmp_path, "no-command")
    (tmp_path / "root.json").write_bytes(factory.root_v1("ci"))
    done = lacking.agent(
        *register_args(factory, tmp_path / "root.json", lacking.name, "--installer", "command")
    )
    assert "--installer command needs --install-command" in error_line(done)
    assert not lacking.dir.exists()

    device = AgentDevice.register(
        factory,
        tmp_path,
        server_url=proxy.url,
        extra=("--installer", "command", "--install-command", command),
    )
    v2 = publish_build(factory, "2")
    succeeds(device.run_once())
    assert (flashed / image_name("2")).read_bytes() == v2
    assert not (device.dir / "current").exists(), "the command installer uses no slots"

    publish_build(factory, "3")
    line = error_line(device.run_once())
    assert "version 3 failed to install: the install command exited with status 7" in line
    assert "flash failed" in line
    assert not (flashed / image_name("3")).exists()
    succeeds(device.run_once())
    assert calls.read_text().split() == ["2", "3"], "the failed install was run again"
    assert len(downloads_of(proxy, "3")) == 1
    status = device.status()
    assert status["installed"]["version"] == "2"
    assert len(status["failed_sha256"]) == 1

    record = device_record(factory, device.name)
    assert record["installed_version"] == "2"
    assert events_of(record) == Counter(
        {
            ("download-started", "2"): 1,
            ("download-finished", "2"): 1,
            ("installed", "2"): 1,
            ("download-started", "3"): 1,
            ("download-finished", "3"): 1,
            ("install-failed", "3"): 1,  # and no rolled-back: a command has no slot to undo
        }
    )


@sqlite_only
def test_a_lower_version_is_never_installed(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    publish_build(factory, "42")
    v43 = publish_build(factory, "43")
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    succeeds(device.run_once())
    assert device.running_bytes() == v43
    assert downloads_of(proxy, "42") == []

    # A lower build published later is not "the latest" to the agent.
    publish_build(factory, "41")
    done = succeeds(device.run_once())
    assert f"version 43 ({image_name('43')}) is up to date" in done.stderr
    assert downloads_of(proxy, "41") == []

    # The server never drops a tag's highest version (a prune keeps the highest), so
    # a list whose highest is 42 is signed here with the server's own online keys, as a
    # compromised or broken server could: valid metadata for the CI channel, a downgrade.
    served = served_metadata(factory, "ci")
    targets = Metadata[Targets].from_bytes(served[TARGETS])
    del targets.signed.targets[image_name("43")]
    targets.signed.version += 1
    targets.signatures.clear()
    stolen = stolen_online_signers(factory.server, factory, "ci")
    targets.sign(stolen[TARGETS])
    mirror = tmp_path / "mirror"
    write_forged_mirror(served, targets, stolen, mirror)
    forged = {p.name: p.read_bytes() for p in mirror.iterdir() if p.name != "root.json"}

    def serve_forged(exchange: Exchange) -> None:
        name = exchange.path.split("?")[0].rsplit("/", 1)[-1]
        if "/metadata/" in exchange.path and name in forged:
            exchange.status, exchange.body = 200, forged[name]
            exchange.response_headers = {"content-type": "application/json"}

    proxy.tamper = serve_forged
    done = succeeds(device.run_once())
    assert (
        f"refusing to move from version 43 to 42 ({image_name('42')}): the agent never "
        "installs a lower or equal version"
    ) in done.stderr
    assert downloads_of(proxy, "42") == []
    assert device.running_bytes() == v43
    status = device.status()
    assert status["installed"]["version"] == "43"
    assert status["trusted_metadata"]["targets"] == targets.signed.version  # verified, refused


# -- reports ---------------------------------------------------------------------------------


@sqlite_only
def test_events_wait_for_the_server_and_arrive_once(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    v5 = publish_build(factory, "5")

    def cut_off_after_the_download(exchange: Exchange) -> None:
        if "/targets/" in exchange.path:
            proxy.down = True  # from the next request on: the report finds no server

    proxy.tamper = cut_off_after_the_download
    succeeds(device.run_once())  # installed, and nobody to report it to
    assert device.running_bytes() == v5
    assert device.status()["unsent_events"] == 3
    record = device_record(factory, device.name)
    assert (record["installed_version"], record["events"]) == (None, [])

    proxy.tamper = None
    assert "server error: HTTP 503" in error_line(device.run_once())
    assert device.running_bytes() == v5

    proxy.down = False
    succeeds(device.run_once())
    assert json.loads((device.dir / "events.json").read_bytes()) == []
    record = device_record(factory, device.name)
    assert record["installed_version"] == "5"
    assert events_of(record) == Counter(
        {("download-started", "5"): 1, ("download-finished", "5"): 1, ("installed", "5"): 1}
    )
    reports = [e for e in proxy.seen if e.path.endswith("/device-reports")]
    assert [e.status for e in reports] == [503, 503, 200]


@sqlite_only
def test_wave_status_counts_what_production_agents_report(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    v7 = publish_build(factory, "7")
    prod_root = factory.root_v1("prod")
    good = AgentDevice.register(factory, tmp_path, "prod", root=prod_root)
    bad = AgentDevice.register(
        factory, tmp_path, "prod", root=prod_root, extra=("--health-check", "exit 1")
    )
    # `tufa waves init rel-7 7 main -k ARCHIVE`, then `tufa waves rollout rel-7 --uuids
    # GOOD,BAD`, over HTTP (a CLI process costs a second; test_waves runs those).
    wave = prepared(factory, "7")
    for key in OfflineArchive.load(owner.archive).keys_for(TARGETS):
        wave.sign(key.prod.signer(), append=True)
    assert post_wave(factory, "rel-7", "7", wave).status_code == 201
    path = factory.path("/waves/rel-7/rollout")
    body = {"devices": [good.name, bad.name]}
    taken = send(server, "POST", path, factory.admin_token, json=body)
    assert taken.status_code == 200, taken.text
    succeeds(good.run_once())
    assert good.running_bytes() == v7
    assert "version 7 failed to install" in error_line(bad.run_once())
    assert not (bad.dir / "current").exists(), "rolled back to nothing installed"

    assert owner.json("waves", "status", "rel-7") == [
        {
            "name": "rel-7",
            "status": "active",
            "devices_served": 2,
            "devices_of_tag": 2,
            "devices_installed": 1,
            "devices_failed": 1,
            "devices_stale": 0,
            "state": "active",
            "stage": None,
            "halt_reason": None,
            "plan": None,
        }
    ]


# -- downloads and disks ---------------------------------------------------------------------


@sqlite_only
def test_a_cut_download_resumes_and_bad_partial_bytes_are_thrown_away(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    v1 = publish_build(factory, "1", build_bytes("1", 3 * MiB))
    cut = device.run_once(env={"TUFA_CRASH_AT": "download:half-written"})
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    part = device.dir / "downloads" / f"{sha256(v1)}.part"
    kept = part.read_bytes()
    assert len(v1) // 2 <= len(kept) < len(v1)
    assert kept == v1[: len(kept)]
    assert device.running_bytes() is None

    succeeds(device.run_once())
    first, resumed = downloads_of(proxy, "1")
    assert header(first, "range") is None
    assert header(resumed, "range") == f"bytes={len(kept)}-"
    assert resumed.status == 206
    assert device.running_bytes() == v1
    assert leftovers(device) == []

    # A partial file that is not the start of the build: refused by its hash, deleted,
    # and the next run downloads it whole.
    v2 = publish_build(factory, "2", build_bytes("2", 3 * MiB))
    wrong = b"\x00" * (len(v2) // 2)
    (device.dir / "downloads" / f"{sha256(v2)}.part").write_bytes(wrong)
    line = error_line(device.run_once())
    assert "the bytes do not match the signed hash, so they were thrown away" in line, line
    assert leftovers(device) == []
    assert device.running_bytes() == v1
    succeeds(device.run_once())
    resumed, whole = downloads_of(proxy, "2")
    assert header(resumed, "range") == f"bytes={len(wrong)}-"
    assert (header(whole, "range"), whole.status) == (None, 200)
    assert device.running_bytes() == v2


@sqlite_only
def test_a_full_disk_is_refused_cleanly_and_a_smaller_build_installs(
    server: Server, factory: Factory, small_disk: Path, proxy: TamperingProxy
) -> None:
    device = AgentDevice.register(factory, small_disk, server_url=proxy.url)
    v1 = publish_build(factory, "1")
    succeeds(device.run_once())

    # Larger than the free space: refused before a byte is written.
    publish_build(factory, "2", build_bytes("2", 3 * MiB))
    line = error_line(device.run_once())
    named = re.search(r"not enough free space in .*: the download needs 3\.0 MiB more and "
                      r"(\d+\.\d) MiB is free", line)  # fmt: skip
    assert named, line
    assert abs(float(named[1]) - shutil.disk_usage(small_disk).free / MiB) <= 0.1, line
    assert downloads_of(proxy, "2") == []
    assert leftovers(device) == []
    assert device.running_bytes() == v1

    # Fits when checked, but the disk fills up while it downloads.
    filler = small_disk / "filler"

    def fill_disk(exchange: Exchange) -> None:
        if exchange.path.endswith(f".{image_name('3')}"):
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            filler.write_bytes(b"\x00" * (free - 64 * 1024))

    proxy.tamper = fill_disk
    v3 = publish_build(factory, "3", build_bytes("3", MiB // 2))
    line = error_line(device.run_once())
    assert "is full" in line, line
    assert "was not saved" in line, line
    assert leftovers(device) == []
    assert device.running_bytes() == v1
    assert "is full" in device.status()["last_error"]

    proxy.tamper = None
    filler.unlink()
    succeeds(device.run_once())
    assert device.running_bytes() == v3
    assert leftovers(device) == []


@sqlite_only
def test_install_bundle_installs_the_version_it_holds_with_no_network(
    server: Server, factory: Factory, tmp_path: Path, proxy: TamperingProxy
) -> None:
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    v7 = publish_build(factory, "7")
    publish_build(factory, "8")  # listed in the bundle's metadata, not in the bundle
    bundle = tmp_path / "usb" / "update-7"
    env = cli_env(factory, tmp_path / "owner.json")
    succeeds(run_cli("targets", "offline-update", "main", "7", str(bundle), "-q", env=env))
    asked = len(proxy.seen)
    succeeds(device.agent("install-bundle", str(bundle)))
    assert device.running_bytes() == v7
    assert len(proxy.seen) == asked, "install-bundle used the network"


# -- the agent's footprint -------------------------------------------------------------------


# -- what the review of the agent found ----------------------------------------------------


@sqlite_only
def test_a_health_check_printing_bytes_that_are_not_text_still_decides(
    factory: Factory, tmp_path: Path
) -> None:
    check = "printf '\\377\\376 not UTF-8\\n'; test \"$TUFA_TARGET_VERSION\" != 43"
    device = AgentDevice.register(factory, tmp_path, extra=("--health-check", check))
    data = publish_build(factory, "42")
    succeeds(device.run_once())
    publish_build(factory, "43")
    failed = device.run_once()
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr, failed.stderr
    assert "version 43 failed to install" in error_line(failed)
    assert device.running_bytes() == data
    status = device.status()
    assert (status["installed"]["version"], status["installing"]) == ("42", None)


@sqlite_only
def test_a_second_agent_process_waits_for_the_first(factory: Factory, tmp_path: Path) -> None:
    device = AgentDevice.register(factory, tmp_path)
    publish_build(factory, "42")
    with (device.dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a `run` in the middle of its cycle holds it
        waiting = subprocess.Popen(
            [console_script("tufa-agent"), "check", "--dir", str(device.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert waiting.poll() is None, "check ran while another agent held the state"
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "waiting for another tufa-agent process" in err
    assert "Version 42 (rpi4-image-42) is to be installed." in out


@sqlite_only
def test_register_says_why_the_server_refused(factory: Factory, tmp_path: Path) -> None:
    AgentDevice.register(factory, tmp_path / "first", name="twin")
    root = tmp_path / "root.json"
    root.write_bytes(factory.root_v1("ci"))
    second = unregistered(factory, tmp_path / "second", "twin")
    done = second.agent(*register_args(factory, root, "twin"))
    assert "HTTP 409" in error_line(done)
    assert "a device named 'twin' is already registered" in done.stderr
    assert not second.dir.exists()


@sqlite_only
def test_reports_the_server_refuses_do_not_hold_up_later_ones(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    publish_build(factory, "42")

    def refuse_reports(exchange: Exchange) -> None:
        if exchange.path.endswith("/device-reports"):
            exchange.status, exchange.body = 400, b'{"error": {"message": "no"}}'

    proxy.tamper = refuse_reports
    done = succeeds(device.run_once())
    assert "the server refused 3 event(s)" in done.stderr
    assert device.status()["unsent_events"] == 0
    proxy.tamper = None
    publish_build(factory, "43")
    succeeds(device.run_once())
    record = device_record(factory, device.name)
    assert record["installed_version"] == "43"
    assert events_of(record)[("installed", "43")] == 1


@sqlite_only
def test_tuf_debug_commands_never_send_the_admin_token_from_the_environment(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(factory.root_v1("ci"))
    trust = tmp_path / "trust"
    agent = console_script("tufa-agent")
    subprocess.run([agent, "tuf", "init", "--metadata-dir", str(trust), str(root)], check=True)
    done = subprocess.run(
        [agent, "tuf", "refresh", "--metadata-dir", str(trust), "--metadata-url",
         f"{proxy.url}{factory.path('/repo/ci/metadata/')}"],
        env={**os.environ, "TUFA_TOKEN": factory.admin_token},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr
    assert proxy.seen, "the refresh reached no server"
    assert all(header(e, "authorization") is None for e in proxy.seen)


def test_the_agent_imports_nothing_of_the_server() -> None:
    code = (
        "import sys\n"
        "import tufa.agent.main\n"
        "server_side = ('tufa.server', 'tufa.cli', 'starlette', 'sqlalchemy', 'uvicorn',\n"
        "               'alembic', 'psycopg')\n"
        "found = sorted(m for m in sys.modules\n"
        "               if any(m == p or m.startswith(p + '.') for p in server_side))\n"
        "assert not found, found\n"
        "assert 'tufa.agent.agent' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr


@sqlite_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_sigterm_and_ctrl_c(
    factory: Factory, tmp_path: Path, signum: signal.Signals
) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path)
    device.start(interval=0.2)
    try:
        device.wait_installed("42")
        assert device.process is not None
        device.process.send_signal(signum)
        assert device.process.wait(timeout=30) == 0, device.log()
    finally:
        device.stop()
    last = device.log().splitlines()[-1]
    assert last.endswith(
        f"INFO stopped on {signum.name}; version 42 ({image_name('42')}) stays installed"
    ), device.log()
    assert "Aborted" not in device.log()
    assert "Traceback" not in device.log()


@sqlite_only
def test_a_stop_during_a_check_lets_the_check_finish_and_a_second_stops_at_once(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    for second_signal in (False, True):
        device.start(interval=0.2)
        try:
            device.wait_installed("42")
            assert device.process is not None
            proxy.delay = 2.0  # each answer of the next check comes late
            asked = len(proxy.seen)
            deadline = time.monotonic() + 10
            while len(proxy.seen) == asked:
                assert time.monotonic() < deadline, device.log()
                time.sleep(0.02)
            device.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            if second_signal:
                time.sleep(0.3)
                device.process.send_signal(signal.SIGINT)
            assert device.process.wait(timeout=60) == 0, device.log()
            took = time.monotonic() - started
        finally:
            proxy.delay = 0.0
            device.stop()
        log = device.log()
        assert "SIGTERM received: stopping once the check under way is done" in log, log
        if second_signal:
            assert took < 1.9, took
            assert log.rstrip().endswith(
                "stopped on SIGINT; version 42 (rpi4-image-42) stays installed"
            )
        else:
            assert took >= 1.5, took  # the answer it waited for, at least
            assert log.rstrip().endswith(
                "stopped on SIGTERM; version 42 (rpi4-image-42) stays installed"
            )
        assert "Traceback" not in log, log
        (device.dir.parent / f"{device.name}.log").unlink()
