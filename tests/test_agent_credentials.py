"""The device agent's credential over its life, with real `tufa-agent` processes.

A device whose credential is revoked (or whose record is deleted) logs "credential
revoked" with what to do, keeps running what it installed, and asks the server again
only once per --max-backoff instead of at every interval. `tufa-agent rotate-credential`
replaces the credential, the old one dying as the new one is first used, also while the
agent's service runs. Each test runs on both databases. Power cuts during a rotation are
in test_agent_power_cut.py; the server's side is in test_credentials.py.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

from tests.agent_helpers import AgentDevice, Exchange, TamperingProxy, publish_build
from tests.helpers import Factory, assert_error, cli_env, run_cli, send


def tufa(factory: Factory, where: Path, *args: str) -> str:
    done = run_cli(*args, env=cli_env(factory, where / "config.json"))
    assert done.returncode == 0, f"tufa {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def credential_of(device: AgentDevice) -> str:
    return (device.dir / "credential").read_text().strip()


def timestamp_read(factory: Factory, credential: str, channel: str = "ci") -> int:
    path = factory.path(f"/repo/{channel}/metadata/timestamp.json")
    return send(factory.server, "GET", path, credential).status_code


def refused(exchange: Exchange) -> bool:
    return exchange.status == 401


def lose_reports(exchange: Exchange) -> None:
    """A server that cannot take reports for a while: the agent keeps them queued."""
    if exchange.path.endswith("/device-reports"):
        exchange.status, exchange.body = 503, b"busy"


def test_a_revoked_agent_says_so_keeps_its_version_and_stops_asking(
    factory: Factory, tmp_path: Path
) -> None:
    v42 = publish_build(factory, "42")
    proxy = TamperingProxy(factory.server.url)
    device = AgentDevice.register(factory, tmp_path, server_url=proxy.url)
    proxy.tamper = lose_reports
    try:
        device.start("--max-backoff", "4", interval=0.2)
        device.wait_installed("42")
        # Its install events are still queued: a cycle that reported would send them.
        assert json.loads((device.dir / "events.json").read_bytes())
        tufa(factory, tmp_path, "devices", "revoke", device.name)
        proxy.tamper = None
        publish_build(factory, "43")  # what it would install, were it not revoked
        device.wait_for(lambda s: "credential revoked" in (s.get("last_error") or ""))
        # The first refused check (a cycle under way may have had its report refused
        # just before it).
        first = next(i for i, e in enumerate(proxy.seen) if refused(e) and e.method == "GET")
        started = time.monotonic()
        # Two tries, both answered (the proxy records a request before its answer).
        while len(proxy.seen) < first + 2 or not all(e.status for e in proxy.seen[first:][:2]):
            assert time.monotonic() - started < 10, "no second try"
            time.sleep(0.05)
        later = proxy.seen[first:]
        # Each try is one refused metadata request: no report, no download...
        assert [(e.method, e.status) for e in later] == [("GET", 401)] * len(later), later
        assert len(later) == 2, [e.path for e in later]
        # ...and the next one comes after --max-backoff (4 s, less 10 % jitter), not
        # after the 0.2 s interval or a back-off ramp starting from it.
        waited = later[1].at - later[0].at
        assert waited >= 3.5, f"asked again after {waited:.1f} s"
        assert device.process is not None
        assert device.process.poll() is None, device.log()
    finally:
        device.stop()
        proxy.close()
    log = device.log()
    assert "check failed: credential revoked: this device credential was revoked on" in log, log
    assert "(`tufa-agent register --dir NEW_DIR`)" in log, log
    assert f"(device {device.name}; checking again in 4s)" in log, log
    assert "Traceback" not in log
    assert device.installed_version() == "42"
    assert device.running_bytes() == v42
    assert "credential revoked" in device.status()["last_error"]


def test_once_check_and_rotate_name_the_revocation_and_the_deletion(
    factory: Factory, tmp_path: Path
) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path)
    assert device.run_once().returncode == 0
    tufa(factory, tmp_path, "devices", "revoke", device.name)
    for command in (("run", "--once"), ("check",), ("rotate-credential",)):
        done = device.agent(*command)
        assert done.returncode == 1, done.stderr
        assert "credential revoked: this device credential was revoked on" in done.stderr
        assert "Traceback" not in done.stderr
    tufa(factory, tmp_path, "devices", "delete", device.name)
    done = device.run_once()
    assert done.returncode == 1
    assert f"device {device.name!r} was deleted from the factory on" in done.stderr
    assert device.installed_version() == "42"


def test_rotate_credential_replaces_the_device_credential(factory: Factory, tmp_path: Path) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path)
    assert device.run_once().returncode == 0
    old = credential_of(device)

    done = device.agent("rotate-credential")
    assert done.returncode == 0, done.stderr
    assert f"Rotated the credential of {device.name}" in done.stdout, done.stdout
    assert "the old one no longer works" in done.stdout
    new = credential_of(device)
    assert new.startswith("tufad_")
    assert new != old
    assert stat.S_IMODE((device.dir / "credential").stat().st_mode) == 0o600
    assert [p.name for p in device.dir.iterdir() if p.name.endswith(".tmp")] == []
    assert_error(
        send(factory.server, "GET", factory.path("/repo/ci/metadata/timestamp.json"), old),
        401,
        "credential_revoked",
        "it was replaced on",
    )
    record = send(
        factory.server, "GET", factory.path(f"/devices/{device.name}"), factory.admin_token
    )
    assert record.json()["credential_rotation_pending"] is False

    # Everything goes on with the new one: metadata, downloads, reports.
    publish_build(factory, "43")
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert device.installed_version() == "43"
    record = send(
        factory.server, "GET", factory.path(f"/devices/{device.name}"), factory.admin_token
    )
    assert record.json()["installed_version"] == "43"


def test_a_rotation_while_the_service_runs_interrupts_nothing(
    factory: Factory, tmp_path: Path
) -> None:
    publish_build(factory, "42")
    device = AgentDevice.register(factory, tmp_path)
    old = credential_of(device)
    try:
        device.start(interval=0.2)
        device.wait_installed("42")
        done = device.agent("rotate-credential")
        assert done.returncode == 0, done.stderr
        publish_build(factory, "43")
        device.wait_installed("43")
        # Its report of 43 went out with the new credential.
        deadline = time.monotonic() + 20
        path = factory.path(f"/devices/{device.name}")
        while (
            send(factory.server, "GET", path, factory.admin_token).json()["installed_version"]
            != "43"
        ):
            assert time.monotonic() < deadline, device.log()
            time.sleep(0.1)
    finally:
        device.stop()
    assert timestamp_read(factory, old) == 401
    assert timestamp_read(factory, credential_of(device)) == 200
    log = device.log()
    assert "check failed" not in log, log
    assert "refused" not in log, log
