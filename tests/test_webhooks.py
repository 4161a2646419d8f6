"""Webhooks, end to end: a real server process on each backend delivers to a real HTTP
receiver on loopback; time is moved with the server's --clock-offset-file."""

from __future__ import annotations

import functools
import json
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets

from tests.conftest import BACKENDS
from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    download_archive,
    run_cli,
    set_clock_offset,
)
from tests.test_waves import publish
from tests.webhook_receiver import Received, Receiver, free_port, verifies
from tufa.core.archive import OfflineArchive
from tufa.server.webhooks import EVENTS

DAY = 86400


class Clocked:
    """A server whose clock the tests move forward (never back)."""

    def __init__(self, server: Server, offset_file: Path) -> None:
        self.server = server
        self.offset_file = offset_file
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        set_clock_offset(self.offset_file, self.offset)

    def advance_to(self, seconds: float) -> None:
        assert seconds >= self.offset
        self.advance(seconds - self.offset)


def _clocked(make_server: Callable[..., Server], backend: str, where: Path) -> Clocked:
    offset_file = where / "clock-offset"
    set_clock_offset(offset_file, 0)
    extra = ("--clock-offset-file", str(offset_file), "--resign-interval", "1s")
    return Clocked(make_server(backend, extra_args=extra), offset_file)


@pytest.fixture(scope="module", params=BACKENDS)
def clocked(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
) -> Clocked:
    return _clocked(make_server, request.param, tmp_path_factory.mktemp("hooks"))


@pytest.fixture
def receiver() -> Any:
    started = Receiver().start()
    yield started
    started.stop()


def add_hook(factory: Factory, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    response = factory.request("POST", "/webhooks", json={"url": url, "events": events, **extra})
    assert response.status_code == 201, response.text
    hook: dict[str, Any] = response.json()
    return hook


def log_of(factory: Factory, hook: dict[str, Any]) -> list[dict[str, Any]]:
    response = factory.request("GET", f"/webhooks/{hook['id']}/deliveries")
    assert response.status_code == 200, response.text
    log: list[dict[str, Any]] = response.json()
    return log


def wait_log(
    factory: Factory, hook: dict[str, Any], what: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        log = log_of(factory, hook)
        if what(log):
            return log
        assert time.monotonic() < deadline, f"timed out; the delivery log: {log}"
        time.sleep(0.1)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_a_delivery_is_signed_with_the_hooks_secret(clocked: Clocked, receiver: Receiver) -> None:
    factory = create_factory(clocked.server)
    hook = add_hook(factory, receiver.url, ["device.first-seen"])
    assert hook["secret"].startswith("whsec_"), hook
    assert hook["id"].startswith("wh_")
    assert hook["events"] == ["device.first-seen"]

    device = factory.register_device("prod", name="line-1-unit-7")

    (got,) = receiver.wait_for(lambda r: len(r) == 1)
    assert got.event == "device.first-seen"
    assert got.headers["content-type"] == "application/json"
    assert verifies(hook["secret"], got.body, got.headers["x-tufa-signature"])
    altered = got.body[:-2] + bytes([got.body[-2] ^ 1]) + got.body[-1:]
    assert not verifies(hook["secret"], altered, got.headers["x-tufa-signature"])
    assert not verifies("another secret entirely", got.body, got.headers["x-tufa-signature"])
    payload = got.payload
    assert payload["id"] == got.headers["x-tufa-delivery"]
    assert re.fullmatch("[0-9a-f]{32}", payload["id"]), payload
    assert payload["event"] == "device.first-seen"
    assert payload["factory"] == factory.name
    assert payload["data"] == {
        "device": device["id"],
        "name": "line-1-unit-7",
        "hardware_id": "rpi4",
        "tag": "main",
        "channel": "prod",
    }
    (entry,) = wait_log(factory, hook, lambda log: log[0]["status"] == "delivered")
    assert entry["id"] == payload["id"]
    assert entry["attempts"] == 1
    assert entry["last_status"] == 200
    assert entry["next_attempt_at"] is None
    assert moment(entry["created_at"]) <= moment(entry["delivered_at"])
    assert moment(payload["created_at"]) == moment(entry["created_at"])
    # The secret is never shown again: not in the list, not to anyone.
    listed = factory.request("GET", "/webhooks").json()
    assert listed == [{k: v for k, v in hook.items() if k != "secret"}]


def test_a_chosen_secret_signs_and_is_not_echoed(clocked: Clocked, receiver: Receiver) -> None:
    factory = create_factory(clocked.server)
    chosen = secrets.token_urlsafe(24)
    hook = add_hook(factory, receiver.url, ["keys.expiring"], secret=chosen)
    assert hook["secret"] is None
    queued = factory.request("POST", f"/webhooks/{hook['id']}/test")
    assert queued.status_code == 201, queued.text
    (got,) = receiver.wait_for(lambda r: len(r) == 1)
    assert got.event == "webhook.test"
    assert got.payload["id"] == queued.json()["delivery"]
    assert verifies(chosen, got.body, got.headers["x-tufa-signature"])


def test_a_receiver_down_gets_the_delivery_once_it_is_back(clocked: Clocked) -> None:
    """Refused connections, then a 500 from a receiver that had applied the delivery:
    retried after each back-off, and the receiver, de-duplicating by delivery id,
    applies it once."""
    factory = create_factory(clocked.server)
    receiver = Receiver()  # nothing listens on its port yet
    hook = add_hook(factory, receiver.url, ["device.first-seen"])
    factory.register_device("ci")

    (first,) = wait_log(factory, hook, lambda log: log[0]["attempts"] == 1)
    assert first["status"] == "retrying"
    assert first["last_status"] is None
    assert "ConnectError" in first["last_error"], first
    # The next attempt waits out the back-off: 10 s of the server's clock, not sooner.
    time.sleep(2)
    assert log_of(factory, hook)[0]["attempts"] == 1
    retry_at = moment(first["next_attempt_at"])

    receiver.status = 500
    receiver.start()
    try:
        clocked.advance(11)
        (second,) = wait_log(factory, hook, lambda log: log[0]["attempts"] == 2)
        assert second["status"] == "retrying"
        assert second["last_status"] == 500
        assert "HTTP 500" in second["last_error"]
        # Doubled: 20 s after the second attempt.
        assert (moment(second["next_attempt_at"]) - retry_at).total_seconds() >= 20
        receiver.status = 200
        clocked.advance(21)
        (done,) = wait_log(factory, hook, lambda log: log[0]["status"] == "delivered")
        assert done["attempts"] == 3
        assert done["last_status"] == 200
        assert done["last_error"] is None
        assert done["next_attempt_at"] is None
    finally:
        receiver.stop()
    assert [r.payload["id"] for r in receiver.received] == [done["id"]] * 2
    assert receiver.effects == [done["id"]]
    assert all(
        verifies(hook["secret"], r.body, r.headers["x-tufa-signature"]) for r in receiver.received
    )


def test_a_slow_receiver_never_slows_a_request(clocked: Clocked, receiver: Receiver) -> None:
    factory = create_factory(clocked.server)
    add_hook(factory, receiver.url, ["device.first-seen"])
    receiver.delay = 3
    started = time.monotonic()
    for _ in range(3):
        factory.register_device("ci")
    assert time.monotonic() - started < 2, "registrations waited for the receiver"
    receiver.wait_for(lambda r: len(r) == 3)


def test_a_delivery_is_given_up_after_a_day(clocked: Clocked) -> None:
    factory = create_factory(clocked.server)
    hook = add_hook(factory, f"http://127.0.0.1:{free_port()}/never", ["keys.expiring"])
    factory.request("POST", f"/webhooks/{hook['id']}/test").raise_for_status()
    wait_log(factory, hook, lambda log: log[0]["attempts"] == 1)

    clocked.advance(DAY - 60)  # within the day: retried, not given up
    wait_log(factory, hook, lambda log: log[0]["attempts"] == 2)
    assert log_of(factory, hook)[0]["status"] == "retrying"
    clocked.advance(3600 + 60)  # past the day, and past the longest back-off
    (entry,) = wait_log(factory, hook, lambda log: log[0]["status"] == "given-up")
    assert entry["attempts"] == 3
    assert entry["next_attempt_at"] is None
    assert entry["given_up_at"] is not None
    assert "ConnectError" in entry["last_error"]
    clocked.advance(2 * 3600)
    time.sleep(2)
    assert log_of(factory, hook)[0]["attempts"] == 3
    metrics = clocked.server.request("GET", "/metrics", clocked.server.operator_token).text
    counted = re.search(r'tufa_webhook_deliveries_total\{outcome="given-up"\} (\S+)', metrics)
    assert counted is not None, metrics
    assert float(counted.group(1)) >= 1, metrics


def test_failed_installs_in_a_report_are_told_once(clocked: Clocked, receiver: Receiver) -> None:
    factory = create_factory(clocked.server)
    hook = add_hook(factory, receiver.url, ["device.install-failed"])
    device = factory.register_device("prod", name="unit-9")
    events = [
        {"id": "e-1", "kind": "installed", "version": "7", "detail": ""},
        {"id": "e-2", "kind": "install-failed", "version": "8", "detail": "no space left"},
        {"id": "e-3", "kind": "rolled-back", "version": "8", "detail": "health check failed"},
    ]
    report = {
        "installed": {"version": "7", "target": "fw-7", "sha256": "ab" * 32},
        "events": [{**e, "at": "2026-12-01T10:00:00Z", "target": None} for e in events],
    }
    for _ in range(2):  # sent again after a lost answer: stored, and told, once
        sent = factory.request("POST", "/device-reports", device["credential"], json=report)
        assert sent.status_code == 200, sent.text

    received = receiver.wait_for(lambda r: len(r) == 2)
    time.sleep(1.5)
    assert len(receiver.received) == 2
    assert sorted((r.payload["data"] for r in received), key=lambda d: d["kind"]) == [
        {
            "device": device["id"],
            "name": "unit-9",
            "version": "8",
            "kind": "install-failed",
            "detail": "no space left",
        },
        {
            "device": device["id"],
            "name": "unit-9",
            "version": "8",
            "kind": "rolled-back",
            "detail": "health check failed",
        },
    ]
    assert {r.event for r in received} == {"device.install-failed"}
    assert len(log_of(factory, hook)) == 2


def _at_least(count: int, received: list[Received]) -> bool:
    return len(received) >= count


def _release_with_expiry(factory: Factory, archive: Path, days: int) -> None:
    """Build 1 of tag main, released to every device of the tag by a completed wave
    whose production targets expire in `days` days."""
    publish(factory, "1")
    body = {"tag": "main", "version": "1", "prune": [], "expires_days": days}
    prepared = factory.request("POST", "/waves/prepare", json=body)
    assert prepared.status_code == 200, prepared.text
    md = Metadata[Targets].from_dict({"signed": prepared.json()["signed"], "signatures": []})
    for key in OfflineArchive.load(archive).keys_for("targets"):
        md.sign(key.prod.signer(), append=True)
    wave = {"name": "w1", "tag": "main", "version": "1", "targets": md.to_dict()}
    factory.request("POST", "/waves", json=wave).raise_for_status()
    factory.request("POST", "/waves/w1/complete").raise_for_status()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_expiring_fires_30_7_and_1_days_ahead_once_each(
    make_server: Callable[..., Server], tmp_path: Path, backend: str
) -> None:
    """Each channel's root (365 days) and the production targets of the default view
    (365 days) and of tag main (100 days): each threshold once per file."""
    clocked = _clocked(make_server, backend, tmp_path)  # its clock goes far: its own server
    factory = create_factory(clocked.server)
    download_archive(factory, tmp_path / "keys.tgz")
    _release_with_expiry(factory, tmp_path / "keys.tgz", 100)
    receiver = Receiver().start()
    try:
        add_hook(factory, receiver.url, ["keys.expiring"])
        told: list[tuple[str, str, str | None, int]] = []
        roots_and_default = (("ci", "root"), ("prod", "root"), ("prod", "targets"))
        steps: list[tuple[float, set[tuple[str, str, str | None, int]]]] = [
            (100 - days + 0.5, {("prod", "targets", "main", days)}) for days in (30, 7, 1)
        ]
        steps += [
            (365 - days + 0.5, {(c, role, None, days) for c, role in roots_and_default})
            for days in (30, 7, 1)
        ]
        time.sleep(2)
        assert receiver.received == [], "fired before any threshold"
        for days, expected in steps:
            clocked.advance_to(days * DAY)
            count = len(told) + len(expected)
            received = receiver.wait_for(functools.partial(_at_least, count))
            time.sleep(2.5)  # two more checks: nothing is told twice
            assert len(receiver.received) == count
            new = [r.payload["data"] for r in received[len(told) :]]
            got = {(d["channel"], d["role"], d["tag"], d["days_before"]) for d in new}
            assert got == expected, (days, new)
            for data in new:
                assert data["version"] >= 1
                assert data["expires_at"].endswith("Z")
                assert "metadata expires in" in data["message"], data
            told += sorted(got, key=str)
    finally:
        receiver.stop()


def test_bad_urls_and_events_are_refused(clocked: Clocked) -> None:
    factory = create_factory(clocked.server)
    for url in ("ftp://hooks.example.com/x", "hooks.example.com/x", "https://", "http://a b/"):
        response = factory.request(
            "POST", "/webhooks", json={"url": url, "events": ["keys.expiring"]}
        )
        assert_error(response, 400, "bad_request", "field 'url'")
    response = factory.request(
        "POST", "/webhooks", json={"url": "https://h.example.com", "events": ["wave.exploded"]}
    )
    assert_error(response, 400, "bad_request", "'wave.exploded'")
    assert ", ".join(EVENTS) in response.json()["error"]["message"]
    for events in ([], "keys.expiring", [7]):
        response = factory.request(
            "POST", "/webhooks", json={"url": "https://h.example.com", "events": events}
        )
        assert_error(response, 400, "bad_request", "field 'events'")
    response = factory.request(
        "POST",
        "/webhooks",
        json={"url": "https://h.example.com", "events": ["keys.expiring"], "secret": "short"},
    )
    assert_error(response, 400, "bad_request", "field 'secret'")
    assert factory.request("GET", "/webhooks").json() == []
    unknown = factory.request("DELETE", "/webhooks/wh_0000000000000000")
    assert_error(unknown, 404, "not_found", "wh_0000000000000000")


def test_a_read_token_can_neither_see_nor_change_hooks(
    clocked: Clocked, receiver: Receiver
) -> None:
    """A hook's URL may carry the receiver's own token, and its log what the receiver
    answered: both are for admins only."""
    factory = create_factory(clocked.server)
    hook = add_hook(factory, receiver.url, ["device.first-seen"])
    read = factory.token("read")
    body = {"url": receiver.url, "events": ["keys.expiring"]}
    assert_error(factory.request("POST", "/webhooks", read, json=body), 403, "forbidden")
    assert_error(factory.request("DELETE", f"/webhooks/{hook['id']}", read), 403, "forbidden")
    assert_error(factory.request("POST", f"/webhooks/{hook['id']}/test", read), 403, "forbidden")
    assert_error(factory.request("GET", "/webhooks", read), 403, "forbidden")
    log = factory.request("GET", f"/webhooks/{hook['id']}/deliveries", read)
    assert_error(log, 403, "forbidden")
    listed = factory.request("GET", "/webhooks")
    assert [h["id"] for h in listed.json()] == [hook["id"]]
    assert "secret" not in listed.json()[0]
    # Another factory's admin sees nothing of it.
    other = create_factory(clocked.server)
    assert other.request("GET", "/webhooks").json() == []
    assert_error(other.request("DELETE", f"/webhooks/{hook['id']}"), 404, "not_found")


def test_the_cli_adds_tests_lists_and_removes(
    clocked: Clocked, receiver: Receiver, tmp_path: Path
) -> None:
    factory = create_factory(clocked.server)
    env = cli_env(factory, tmp_path / "config.toml")

    def tufa(*args: str) -> Any:
        done = run_cli("webhooks", *args, "--json", env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    hook = tufa("add", receiver.url, "--events", "device.first-seen,keys.expiring")
    assert hook["events"] == ["device.first-seen", "keys.expiring"]
    assert hook["secret"]
    assert [h["id"] for h in tufa("list")] == [hook["id"]]
    queued = tufa("test", hook["id"])
    (got,) = receiver.wait_for(lambda r: len(r) == 1)
    assert got.payload["id"] == queued["delivery"]
    assert got.event == "webhook.test"
    wait_log(factory, hook, lambda log: log[0]["status"] == "delivered")
    (entry,) = tufa("deliveries", hook["id"])
    assert entry["id"] == queued["delivery"]
    assert entry["attempts"] == 1
    table = run_cli("webhooks", "deliveries", hook["id"], env=env)
    assert table.returncode == 0, table.stderr
    assert "webhook.test" in table.stdout
    bad = run_cli("webhooks", "add", "gopher://x", "--events", "keys.expiring", env=env)
    assert bad.returncode != 0
    assert "field 'url'" in bad.stderr, bad.stderr
    assert tufa("remove", hook["id"])["id"] == hook["id"]
    assert tufa("list") == []
    factory.register_device("ci")
    time.sleep(1.5)
    assert len(receiver.received) == 1, "a removed hook was delivered to"


def test_replicas_on_one_database_deliver_each_delivery_once(
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
) -> None:
    db_url = make_db_url("postgres")
    first = make_server("postgres", db_url=db_url)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", extra_args=shared_key, db_url=db_url)
    second.local.operator_token = first.operator_token
    factory = create_factory(first)
    on_second = Factory(second, factory.name, factory.admin_token)
    receiver = Receiver().start()
    try:
        add_hook(factory, receiver.url, ["device.first-seen"])
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda i: (factory, on_second)[i % 2].register_device("ci"), range(24)))
        receiver.wait_for(lambda r: len(r) >= 24)
        holder, standby = (
            (first, second)
            if "runs the webhook deliverer" in first.local.log()
            else (second, first)
        )
        assert "runs the webhook deliverer" not in standby.local.log()
        # The process holding the lock stops: the other takes over.
        holder.local.stop()
        on_standby = Factory(standby, factory.name, factory.admin_token)
        for _ in range(3):
            on_standby.register_device("ci")
        receiver.wait_for(lambda r: len(r) >= 27)
        time.sleep(1.5)
    finally:
        receiver.stop()
    ids = [r.payload["id"] for r in receiver.received]
    assert len(ids) == 27, ids
    assert len(set(ids)) == 27, ids
