"""Device reports: a device says what it runs and what happened, and the owner sees it.

A registered device posts reports with its own credential over HTTP, as the agent does;
the owner reads them with the real `tufa` CLI (`devices show/list`, `waves status`).
Events are stored once per (device, event id), whatever the agent resends; a bad report
is refused with a 400 naming the field, and stores nothing at all. Everything runs on
both backends: the report and the wave counts are SQL of their own on each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from tuf.api.metadata import Metadata, Targets

from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    download_archive,
    dump_all_tables,
    run_cli,
    send,
)
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS

SHA = "ab" * 32
AT = "2026-12-01T10:00:00Z"
COLOURED = "\x1b[32mok\x1b[0m\r"
LIMIT = 1024 * 1024  # the server's request body limit


def installed(version: str, target: str | None = None, sha256: str = SHA) -> dict[str, str]:
    name = f"rpi4-image-{version}" if target is None else target
    return {"version": version, "target": name, "sha256": sha256}


def event(
    ident: str,
    kind: str = "installed",
    version: str | None = "42",
    at: str = AT,
    detail: str = "",
) -> dict[str, Any]:
    target = None if version is None else f"rpi4-image-{version}"
    return {
        "id": ident,
        "at": at,
        "kind": kind,
        "version": version,
        "target": target,
        "detail": detail,
    }


def post_report(factory: Factory, credential: str | None, body: Any) -> httpx.Response:
    """`POST /device-reports` as the agent sends it, with the device's own credential
    (`body` as JSON, or bytes sent as they are)."""
    path = factory.path("/device-reports")
    if isinstance(body, bytes):
        return send(factory.server, "POST", path, credential, content=body)
    return send(factory.server, "POST", path, credential, json=body)


def report(
    factory: Factory,
    credential: str,
    now: dict[str, str] | None,
    events: list[dict[str, Any]],
) -> int:
    """Send a report that must be accepted; the number of new events stored."""
    response = post_report(factory, credential, {"installed": now, "events": events})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"accepted"}, body
    accepted: int = body["accepted"]
    return accepted


def shown(factory: Factory, device: str) -> dict[str, Any]:
    """What `tufa devices show DEVICE --json` prints, read over HTTP."""
    response = send(factory.server, "GET", factory.path(f"/devices/{device}"), factory.admin_token)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def tufa(env: dict[str, str], *args: str) -> str:
    done = run_cli(*args, env=env)
    assert done.returncode == 0, f"tufa {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- a report, as the owner sees it ----------------------------------------------------------


def test_report_shows_in_devices_show_and_list(factory: Factory, tmp_path: Path) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    device = factory.register_device("prod", name="field-unit-1")
    idle = factory.register_device("ci", name="bench-1")
    fresh = shown(factory, device["name"])
    assert fresh["installed_version"] is None
    assert fresh["last_report_at"] is None
    assert fresh["events"] == []

    events = [
        event("e-1", "download-started", at="2026-12-01T10:00:00Z"),
        # An install command's output, colours and all, is kept as it was sent.
        event("e-2", "download-finished", at="2026-12-01T10:01:00Z", detail=COLOURED),
        # Any offset is read as the time it names, and shown in UTC.
        event("e-3", "installed", at="2026-12-01T12:02:00+02:00", detail="rebooted\ninto 42"),
    ]
    assert report(factory, device["credential"], installed("42"), events) == 3

    found = json.loads(tufa(env, "devices", "show", device["name"], "--json"))
    assert found["installed_version"] == "42"
    assert found["installed_target"] == "rpi4-image-42"
    assert found["installed_sha256"] == SHA
    received = found["last_report_at"]
    assert received is not None
    assert received.endswith("Z")
    assert found["events"] == [
        {
            "id": "e-3",
            "at": "2026-12-01T10:02:00Z",
            "received_at": received,
            "kind": "installed",
            "version": "42",
            "target": "rpi4-image-42",
            "detail": "rebooted\ninto 42",
        },
        {
            "id": "e-2",
            "at": "2026-12-01T10:01:00Z",
            "received_at": received,
            "kind": "download-finished",
            "version": "42",
            "target": "rpi4-image-42",
            "detail": COLOURED,
        },
        {
            "id": "e-1",
            "at": "2026-12-01T10:00:00Z",
            "received_at": received,
            "kind": "download-started",
            "version": "42",
            "target": "rpi4-image-42",
            "detail": "",
        },
    ]
    # By id too, and what the device registered with is unchanged.
    assert shown(factory, device["id"]) == found
    assert (found["name"], found["channel"], found["tag"]) == ("field-unit-1", "prod", "main")

    out = tufa(env, "devices", "show", device["name"])
    assert "installed: version 42 (rpi4-image-42)" in out
    assert f"sha256: {SHA}" in out
    assert f"last report: {received}" in out
    for line in ("download-started", "download-finished", "2026-12-01T10:02:00Z"):
        assert line in out, out
    # ...and shown escaped, not sent to the terminal.
    assert "\\x1b[32mok\\x1b[0m\\r" in out, out
    assert "\x1b" not in out
    assert "\r" not in out
    assert "No events reported." in tufa(env, "devices", "show", idle["name"])
    assert "installed: nothing reported" in tufa(env, "devices", "show", idle["name"])

    listed = {d["name"]: d for d in json.loads(tufa(env, "devices", "list", "--json"))}
    assert listed["field-unit-1"]["installed_version"] == "42"
    assert listed["field-unit-1"]["last_report_at"] == received
    assert listed["bench-1"]["installed_version"] is None
    assert listed["bench-1"]["last_report_at"] is None
    table = tufa(env, "devices", "list")
    assert "installed" in table
    row = next(line for line in table.splitlines() if "field-unit-1" in line)
    assert " 42 " in row, table


def test_events_are_stored_once_whatever_is_resent(factory: Factory) -> None:
    device = factory.register_device("prod")
    credential = device["credential"]
    first = [event("e-1", "download-started"), event("e-2", "download-finished")]
    assert report(factory, credential, None, first) == 2
    stored = shown(factory, device["id"])["events"]

    # The agent crashed before it saw the answer: it resends, and more.
    assert report(factory, credential, None, first) == 0
    changed = {**first[0], "kind": "download-failed", "detail": "resent differently"}
    later = [changed, first[1], event("e-3", at="2026-12-01T11:00:00Z"), event("e-3")]
    assert report(factory, credential, installed("42"), later) == 1  # e-3 once
    found = shown(factory, device["id"])
    assert found["events"][1:] == stored, "a resent event must not change the stored one"
    assert [e["id"] for e in found["events"]] == ["e-3", "e-2", "e-1"]
    assert found["events"][0]["at"] == "2026-12-01T11:00:00Z"  # the first of the two e-3
    assert found["installed_version"] == "42"

    # Ids are the device's own: another device may use the same ones.
    other = factory.register_device("ci")
    assert report(factory, other["credential"], None, first) == 2
    assert [e["id"] for e in shown(factory, other["id"])["events"]] == ["e-2", "e-1"]
    assert len(shown(factory, device["id"])["events"]) == 3

    # A report with no events still says what runs now: null is nothing installed.
    assert report(factory, credential, None, []) == 0
    found = shown(factory, device["id"])
    assert (found["installed_version"], found["installed_target"]) == (None, None)
    assert found["installed_sha256"] is None
    assert len(found["events"]) == 3


def test_show_lists_the_newest_20_events(factory: Factory) -> None:
    device = factory.register_device("prod")
    credential = device["credential"]
    # In two reports, out of order: newest is by the device's clock.
    times = [f"2026-12-01T10:{minute:02d}:00Z" for minute in range(25)]
    older = [event(f"e-{i:02d}", at=times[i]) for i in range(0, 25, 2)]
    newer = [event(f"e-{i:02d}", at=times[i]) for i in range(1, 25, 2)]
    assert report(factory, credential, None, newer) == 12
    assert report(factory, credential, None, older) == 13
    found = shown(factory, device["id"])["events"]
    assert [e["id"] for e in found] == [f"e-{i:02d}" for i in range(24, 4, -1)]
    assert [e["at"] for e in found] == times[24:4:-1]


# -- refused reports store nothing ----------------------------------------------------------


@pytest.fixture(scope="module")
def reporter(server: Server) -> tuple[Factory, dict[str, Any]]:
    """A factory on the shared server, and a device of it that has reported once."""
    factory = create_factory(server)
    device = factory.register_device("prod")
    assert report(factory, device["credential"], installed("41"), [event("e-0")]) == 1
    return factory, device


GOOD = event("ok-1")
LONG = "x" * 65


def _with(**changes: Any) -> dict[str, Any]:
    """A valid event with `changes`; a change to ... leaves the field out."""
    changed = {**GOOD, **changes}
    return {k: v for k, v in changed.items() if v is not ...}


def _events(*events: Any) -> dict[str, Any]:
    return {"installed": installed("42"), "events": list(events)}


def _installed(value: Any) -> dict[str, Any]:
    return {"installed": value, "events": [GOOD]}


SURROGATE = json.dumps(_events(_with(detail="?"))).replace('"?"', '"\\ud800"').encode()

BAD_REPORTS: list[tuple[str, Any, str]] = [
    ("not-an-object", [GOOD], "JSON object"),
    ("no-installed", {"events": [GOOD]}, "'installed'"),
    ("installed-string", _installed("42"), "'installed'"),
    ("installed-no-version", _installed({"target": "t", "sha256": SHA}), "'installed.version'"),
    ("installed-long-version", _installed(installed(LONG)), "'installed.version'"),
    ("installed-empty-target", _installed(installed("42", target="")), "'installed.target'"),
    ("installed-no-sha256", _installed({"version": "42", "target": "t"}), "'installed.sha256'"),
    ("installed-short-sha256", _installed(installed("42", sha256="ab")), "'installed.sha256'"),
    (
        "installed-sha256-not-hex",
        _installed(installed("42", sha256="z" * 64)),
        "'installed.sha256'",
    ),
    ("no-events", {"installed": None}, "'events'"),
    ("events-object", {"installed": None, "events": GOOD}, "'events'"),
    ("101-events", _events(*(_with(id=f"e-{i}") for i in range(101))), "at most 100"),
    ("event-not-object", _events(GOOD, "e-1"), "'events[1]'"),
    ("no-id", _events(_with(id=...)), "'events[0].id'"),
    ("id-with-space", _events(_with(id="e 1")), "'events[0].id'"),
    ("id-too-long", _events(GOOD, _with(id=LONG)), "'events[1].id'"),
    ("id-number", _events(_with(id=1)), "'events[0].id'"),
    ("unknown-kind", _events(GOOD, _with(id="e-2", kind="exploded")), "'events[1].kind'"),
    ("no-kind", _events(_with(kind=...)), "'events[0].kind'"),
    ("no-at", _events(_with(at=...)), "'events[0].at'"),
    ("at-not-a-time", _events(_with(at="yesterday")), "'events[0].at'"),
    ("at-without-zone", _events(_with(at="2026-12-01T10:00:00")), "'events[0].at'"),
    ("at-number", _events(_with(at=1796119200)), "'events[0].at'"),
    ("version-number", _events(_with(version=42)), "'events[0].version'"),
    ("version-too-long", _events(_with(version=LONG)), "'events[0].version'"),
    ("version-empty", _events(_with(version="")), "'events[0].version'"),
    ("target-too-long", _events(_with(target="t" * 256)), "'events[0].target'"),
    ("no-detail", _events(_with(detail=...)), "'events[0].detail'"),
    ("detail-too-long", _events(_with(detail="d" * 1001)), "'events[0].detail'"),
    ("detail-nul", _events(_with(detail="bad\x00byte")), "'events[0].detail'"),
    # Raw JSON: a lone surrogate cannot even be encoded to send as a Python string.
    ("detail-lone-surrogate", SURROGATE, "'events[0].detail'"),
]


@pytest.mark.parametrize(
    ("body", "says"), [c[1:] for c in BAD_REPORTS], ids=[c[0] for c in BAD_REPORTS]
)
def test_bad_reports_are_refused_and_store_nothing(
    server: Server, reporter: tuple[Factory, dict[str, Any]], body: Any, says: str
) -> None:
    factory, device = reporter
    # Every table: `dump_database` leaves out device_events, the table this is about.
    before = dump_all_tables(server)
    response = post_report(factory, device["credential"], body)
    assert_error(response, 400, "bad_request", says)
    assert dump_all_tables(server) == before


def test_limits_and_strangers_are_refused(
    server: Server, reporter: tuple[Factory, dict[str, Any]]
) -> None:
    factory, device = reporter
    stranger = create_factory(server).register_device("prod")
    before = dump_all_tables(server)
    # Exactly 100 events and 1000 characters of detail are fine (checked at the end).
    full = _events(*(_with(id=f"f-{i}", detail="d" * 1000) for i in range(100)))
    # Over the body limit of every JSON endpoint.
    huge = _events(*(_with(id=f"h-{i}", detail="d" * 1000) for i in range(1100)))
    assert_error(post_report(factory, device["credential"], huge), 413, "too_large", str(LIMIT))
    # A device of another factory, and no credential at all.
    refused = post_report(factory, stranger["credential"], full)
    assert_error(refused, 403, "forbidden", factory.name)
    assert_error(post_report(factory, None, full), 401, "unauthorized", "device credential")
    assert dump_all_tables(server) == before
    assert report(factory, device["credential"], installed("42"), full["events"]) == 100


# -- waves count what devices report -----------------------------------------------------------


def test_wave_status_counts_installs_and_failures(factory: Factory, tmp_path: Path) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    archive = tmp_path / "keys.tgz"
    download_archive(factory, archive)
    canary = factory.register_device("prod", name="canary")
    waiting = factory.register_device("prod", name="waiting")
    publish_build(factory, "42")
    create_wave(factory, archive, "release-42", "42")
    rolled = send(
        factory.server,
        "POST",
        factory.path("/waves/release-42/rollout"),
        factory.admin_token,
        json={"devices": [canary["name"]]},
    )
    assert rolled.status_code == 200, rolled.text

    def status() -> tuple[int, int, int, int]:
        (row,) = json.loads(tufa(env, "waves", "status", "--json"))
        assert row["name"] == "release-42"
        return (
            row["devices_served"],
            row["devices_of_tag"],
            row["devices_installed"],
            row["devices_failed"],
        )

    assert status() == (1, 2, 0, 0)
    # Only devices served the wave count: this one is not.
    report(factory, waiting["credential"], installed("42"), [event("w-1", "install-failed")])
    # A failure of another version is not this wave's.
    report(factory, canary["credential"], installed("41"), [event("c-0", "rolled-back", "40")])
    assert status() == (1, 2, 0, 0)

    report(factory, canary["credential"], installed("42"), [event("c-1", "installed")])
    assert status() == (1, 2, 1, 0)
    out = tufa(env, "waves", "status")
    expected = "served to 1 of 2 device(s) of its tag; installed on 1, failed on 0"
    assert f"release-42 (active): {expected}" in out, out

    # It rolled back: failed, and no longer installed.
    back = [event("c-2", "rolled-back", detail="health check failed")]
    report(factory, canary["credential"], installed("41"), back)
    assert status() == (1, 2, 0, 1)
    assert "installed on 0, failed on 1" in tufa(env, "waves", "status", "release-42")
    # A retry that worked: installed, and the failure no longer counts.
    report(factory, canary["credential"], installed("42"), [event("c-3", "installed")])
    assert status() == (1, 2, 1, 0)
    wave = send(
        factory.server, "GET", factory.path("/waves/release-42"), factory.admin_token
    ).json()
    assert (wave["devices_installed"], wave["devices_failed"]) == (1, 0)


def publish_build(factory: Factory, version: str) -> None:
    """A CI job publishing build `version` of tag main, as an external target."""
    item = {
        "name": f"rpi4-image-{version}",
        "version": version,
        "hardware_ids": ["rpi4"],
        "tags": ["main"],
        "url": f"https://cdn.example.com/rpi4-image-{version}",
        "sha256": SHA,
        "length": 1024,
    }
    response = factory.request("POST", "/targets", json={"targets": [item]})
    assert response.status_code == 201, response.text


def create_wave(factory: Factory, archive: Path, name: str, version: str) -> None:
    """What `tufa waves init NAME VERSION main -k ARCHIVE` does, over HTTP."""
    body = {"tag": "main", "version": version, "prune": [], "expires_days": 365}
    prepared = factory.request("POST", "/waves/prepare", json=body)
    assert prepared.status_code == 200, prepared.text
    md = Metadata[Targets].from_dict({"signed": prepared.json()["signed"], "signatures": []})
    for key in OfflineArchive.load(archive).keys_for(TARGETS):
        md.sign(key.prod.signer(), append=True)
    created = factory.request(
        "POST", "/waves", json={**body, "name": name, "targets": md.to_dict()}
    )
    assert created.status_code == 201, created.text
