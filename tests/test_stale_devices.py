"""Stale devices, seen from the fleet (ADR 0018): real `tufa-agent` processes report the
timestamp they verified and their poll interval, and the server flags a device whose
verified timestamp it superseded longer ago than 2 x that interval + 60 s, or which
had expired, at the device's last report.

A device behind a proxy that replays the first timestamp.json it saw still verifies
(the replayed file has not expired), so the agent itself sees nothing wrong; the
server does, once its clock (`--clock-offset-file`) is past the allowance since it
published the newer timestamp. An idle agent reports once an hour by its own clock:
`an_hour_passes` moves that on, as its status file keeps it. Everything runs on both
backends, which store the reports and the timestamps' publication times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_helpers import AgentDevice, Exchange, TamperingProxy, publish_build
from tests.conftest import BACKENDS
from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    run_cli,
    send,
    served_metadata,
    set_clock_offset,
)
from tufa.core.metadata import TIMESTAMP

HEARTBEAT = 3600  # the agent's report interval when nothing changed (agent.py)
FUTURE = "2099-01-01T00:00:00Z"
PAST = "2000-01-01T00:00:00Z"


@pytest.fixture(scope="module", params=BACKENDS)
def clock_server(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Server, Path]:
    """A server of each backend whose clock the tests move; it checks every second
    whether online metadata is due for re-signing."""
    offset_file = tmp_path_factory.mktemp("clock") / "offset"
    set_clock_offset(offset_file, 0)
    extra = ("--clock-offset-file", str(offset_file), "--resign-interval", "1s")
    return make_server(request.param, extra_args=extra), offset_file


@pytest.fixture
def clock(clock_server: tuple[Server, Path]) -> Iterator[Callable[[float], None]]:
    """Moves the server's clock by the seconds given; back to true time afterwards."""
    _server, offset_file = clock_server
    yield lambda seconds: set_clock_offset(offset_file, seconds)
    set_clock_offset(offset_file, 0)


@pytest.fixture
def factory(clock_server: tuple[Server, Path]) -> Factory:
    return create_factory(clock_server[0])


class FreezingProxy(TamperingProxy):
    """A proxy (or a cache stuck in front of the server) that serves every device the
    first timestamp.json it saw, for as long as `frozen` is set."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.first: bytes | None = None
        self.frozen = True
        self.tamper = self._freeze

    def _freeze(self, exchange: Exchange) -> None:
        name = exchange.path.split("?")[0].rsplit("/", 1)[-1]
        if exchange.method != "GET" or name != "timestamp.json" or exchange.status != 200:
            return
        if self.first is None:
            self.first = exchange.body
        elif self.frozen:
            exchange.body = self.first


def an_hour_passes(device: AgentDevice) -> None:
    """The device's last report is an hour old by its clock: its next run reports."""
    status_file = device.dir / "status.json"
    status = json.loads(status_file.read_bytes())
    status["reported_at"] -= HEARTBEAT
    status_file.write_text(json.dumps(status))


def run_once(device: AgentDevice, interval: int) -> None:
    done = device.agent("run", "--once", "--interval", str(interval))
    assert done.returncode == 0, done.stderr
    assert "refused" not in done.stderr, done.stderr


def verified_version(device: AgentDevice) -> int:
    """The timestamp version in the device's trust store (what ngclient verified)."""
    trusted = json.loads((device.dir / "metadata" / "timestamp.json").read_bytes())
    version: int = trusted["signed"]["version"]
    return version


def served_version(factory: Factory) -> int:
    version: int = json.loads(served_metadata(factory, "ci")[TIMESTAMP])["signed"]["version"]
    return version


def listed(factory: Factory, tmp_path: Path, *args: str) -> dict[str, dict[str, Any]]:
    """`tufa devices list --json ARGS`, by device name."""
    done = run_cli("devices", "list", "--json", *args, env=cli_env(factory, tmp_path / "cli"))
    assert done.returncode == 0, done.stderr
    return {d["name"]: d for d in json.loads(done.stdout)}


def stale_names(factory: Factory, tmp_path: Path) -> set[str]:
    return set(listed(factory, tmp_path, "--stale"))


def stale_gauge(factory: Factory) -> float:
    """The factory's `tufa_stale_devices` on /metrics."""
    server = factory.server
    response = server.request("GET", "/metrics", server.operator_token)
    assert response.status_code == 200, response.text
    series = f'tufa_stale_devices{{factory="{factory.name}"}} '
    lines = [line for line in response.text.splitlines() if line.startswith(series)]
    assert len(lines) == 1, response.text
    return float(lines[0].removeprefix(series))


def test_a_device_fed_a_frozen_timestamp_is_flagged_once_its_allowance_passed(
    factory: Factory, clock: Callable[[float], None], tmp_path: Path
) -> None:
    """Two devices behind a proxy that replays the first timestamp.json: `fast` polls
    every 60 s (allowance 180 s), `slow` every 600 s (allowance 1260 s); `direct` polls
    the server itself. Build 2 brings a new timestamp; the frozen devices keep verifying
    the old one, and are flagged as the server's clock passes each allowance."""
    server = factory.server
    publish_build(factory, "1")
    with ExitStack() as stack:
        proxy = FreezingProxy(server.url)
        stack.callback(proxy.close)
        where = tmp_path / "devices"
        fast = AgentDevice.register(factory, where, name="fast", server_url=proxy.url)
        slow = AgentDevice.register(factory, where, name="slow", server_url=proxy.url)
        direct = AgentDevice.register(factory, where, name="direct")
        intervals = [(fast, 60), (slow, 600), (direct, 300)]
        for device, interval in intervals:
            run_once(device, interval)
            assert device.installed_version() == "1"
        first = served_version(factory)
        devices = listed(factory, tmp_path)
        for device, interval in intervals:
            shown = devices[device.name]
            assert shown["verified_timestamp_version"] == first
            assert shown["served_timestamp_version"] == first
            assert shown["poll_interval"] == interval
            assert shown["stale"] is False
        assert stale_gauge(factory) == 0

        publish_build(factory, "2")
        newer = served_version(factory)
        assert newer > first

        def report_all(offset: float) -> None:
            clock(offset)
            for device, interval in intervals:
                an_hour_passes(device)
                run_once(device, interval)

        report_all(60)  # within every allowance
        assert direct.installed_version() == "2"
        assert verified_version(direct) == newer
        for device in (fast, slow):  # the agent sees nothing wrong: the replay verifies
            assert device.installed_version() == "1"
            assert verified_version(device) == first
        assert stale_names(factory, tmp_path) == set()

        report_all(400)  # past fast's allowance, within slow's
        assert stale_names(factory, tmp_path) == {"fast"}
        shown = listed(factory, tmp_path)["fast"]
        assert (shown["verified_timestamp_version"], shown["served_timestamp_version"]) == (
            first,
            newer,
        )
        assert stale_gauge(factory) == 1

        report_all(1500)  # past both
        assert stale_names(factory, tmp_path) == {"fast", "slow"}
        assert stale_gauge(factory) == 2
        env = cli_env(factory, tmp_path / "cli")
        table = run_cli("devices", "list", env={**env, "COLUMNS": "250"})
        assert table.returncode == 0, table.stderr
        cells = [
            [cell.strip() for cell in line.split("│")]
            for line in table.stdout.splitlines()
            if "rpi4" in line
        ]
        metadata = {row[1]: row[-3] for row in cells}  # name, ..., metadata, status
        assert metadata == {"fast": "stale", "slow": "stale", "direct": "fresh"}, table.stdout
        shown_text = run_cli("devices", "show", "fast", env=env)
        assert shown_text.returncode == 0, shown_text.stderr
        assert f"stale: verified timestamp v{first}" in shown_text.stdout, shown_text.stdout
        assert f"the server serves timestamp v{newer}" in shown_text.stdout

        # The proxy passes fresh files again: the next poll verifies the new timestamp
        # and reports it at once (no hour to wait), and the flag clears.
        proxy.frozen = False
        run_once(fast, 60)
        assert fast.installed_version() == "2"
        assert stale_names(factory, tmp_path) == {"slow"}
        assert stale_gauge(factory) == 1


def view_timestamp_version(factory: Factory, hardware_id: str) -> int:
    """The timestamp version a CI device of `hardware_id` and tag main is served."""
    query = f"?hardware_id={hardware_id}&tag=main"
    response = factory.request("GET", f"/repo/ci/metadata/timestamp.json{query}")
    assert response.status_code == 200, response.text
    version: int = response.json()["signed"]["version"]
    return version


def test_newer_timestamps_of_other_views_do_not_make_a_device_stale(
    factory: Factory, clock: Callable[[float], None], tmp_path: Path
) -> None:
    """The views of a channel share one version counter: builds for another hardware id
    move it past the version this device verified, but its own view published nothing
    newer, so the device is not stale however long ago that was."""
    publish_build(factory, "1")
    device = AgentDevice.register(factory, tmp_path / "devices", name="unit")
    run_once(device, 60)
    mine = verified_version(device)
    publish_build(factory, "1", hardware_ids=("rpi5",))
    publish_build(factory, "2", hardware_ids=("rpi5",))
    assert view_timestamp_version(factory, "rpi5") > mine
    clock(3600)
    an_hour_passes(device)
    run_once(device, 60)
    assert verified_version(device) == mine
    shown = listed(factory, tmp_path)["unit"]
    assert (shown["served_timestamp_version"], shown["stale"]) == (mine, False)
    assert shown["last_report_at"] is not None
    assert stale_gauge(factory) == 0


def test_a_new_timestamp_is_reported_at_once_and_an_old_one_once_an_hour(
    factory: Factory, clock: Callable[[float], None], tmp_path: Path
) -> None:
    """Nothing to install, so no events: the agent still reports as soon as it verified
    a timestamp it has not reported (here one the re-signer made, 13 hours on), and
    otherwise only once its hour has passed."""
    publish_build(factory, "1")
    device = AgentDevice.register(factory, tmp_path / "devices", name="idle")
    run_once(device, 60)
    before = verified_version(device)
    reported = listed(factory, tmp_path)["idle"]["last_report_at"]
    run_once(device, 60)  # nothing new: no report
    assert listed(factory, tmp_path)["idle"]["last_report_at"] == reported
    clock(13 * 3600)  # the timestamp (valid a day) is re-signed at half its validity
    deadline = time.monotonic() + 15
    while view_timestamp_version(factory, "rpi4") == before:
        assert time.monotonic() < deadline, "the server did not re-sign the timestamp"
        time.sleep(0.2)
    run_once(device, 60)
    shown = listed(factory, tmp_path)["idle"]
    assert verified_version(device) > before
    assert shown["verified_timestamp_version"] == verified_version(device)
    assert shown["last_report_at"] != reported
    assert shown["stale"] is False


def device_credential(factory: Factory) -> tuple[str, str]:
    """A CI device registered over the API: its name and credential."""
    device = factory.register_device("ci")
    return device["name"], device["credential"]


def post_report(factory: Factory, credential: str, **fields: Any) -> httpx.Response:
    body = {"installed": None, "events": [], **fields}
    return send(factory.server, "POST", factory.path("/device-reports"), credential, json=body)


def test_a_device_that_verified_an_expired_timestamp_is_stale(
    factory: Factory, tmp_path: Path
) -> None:
    """The newest timestamp, but expired by the server's clock at the report (a device
    whose clock runs late accepts it): stale. Before it expires: not."""
    name, credential = device_credential(factory)
    newest = served_version(factory)
    for expires, stale in ((FUTURE, False), (PAST, True)):
        sent = post_report(factory, credential, timestamp={"version": newest, "expires": expires})
        assert sent.status_code == 200, sent.text
        shown = listed(factory, tmp_path)[name]
        assert shown["stale"] is stale
        assert shown["verified_timestamp_expires"] == expires
        assert shown["poll_interval"] is None


def test_a_device_that_says_nothing_of_its_metadata_is_not_stale(
    factory: Factory, tmp_path: Path
) -> None:
    """A report without the fields (an older agent) leaves them unknown, even after a
    report that made the device stale: the server does not guess."""
    name, credential = device_credential(factory)
    stale = {"version": served_version(factory), "expires": PAST}
    assert post_report(factory, credential, timestamp=stale).status_code == 200
    assert stale_names(factory, tmp_path) == {name}
    assert post_report(factory, credential).status_code == 200
    shown = listed(factory, tmp_path)[name]
    assert shown["stale"] is False
    assert shown["verified_timestamp_version"] is None
    assert shown["served_timestamp_version"] == served_version(factory)
    assert stale_names(factory, tmp_path) == set()


def test_a_production_device_before_its_tags_first_release_is_judged_by_the_default_view(
    factory: Factory, tmp_path: Path
) -> None:
    """A tag that released nothing yet is served the channel's default view: the version
    the device verifies there is the newest, so it is not stale."""
    device = factory.register_device("prod")
    response = factory.request("GET", "/repo/prod/metadata/timestamp.json")
    default = response.json()["signed"]["version"]
    timestamp = {"version": default, "expires": FUTURE}
    sent = post_report(factory, device["credential"], timestamp=timestamp, poll_interval=30)
    assert sent.status_code == 200, sent.text
    shown = listed(factory, tmp_path)[device["name"]]
    assert (shown["served_timestamp_version"], shown["stale"]) == (default, False)


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"timestamp": "v3"}, "'timestamp'"),
    ({"timestamp": [3, FUTURE]}, "'timestamp'"),
    ({"timestamp": {"expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": "3", "expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": True, "expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": 0, "expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": 2**31, "expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": 3.5, "expires": FUTURE}}, "'timestamp.version'"),
    ({"timestamp": {"version": 3}}, "'timestamp.expires'"),
    ({"timestamp": {"version": 3, "expires": "tomorrow"}}, "'timestamp.expires'"),
    ({"timestamp": {"version": 3, "expires": "2099-01-01T00:00:00"}}, "'timestamp.expires'"),
    ({"poll_interval": "300"}, "'poll_interval'"),
    ({"poll_interval": -1}, "'poll_interval'"),
    ({"poll_interval": False}, "'poll_interval'"),
    ({"poll_interval": 10**12}, "'poll_interval'"),
    ({"poll_interval": 300.5}, "'poll_interval'"),
]


def test_bad_report_fields_are_refused_naming_the_field(factory: Factory, tmp_path: Path) -> None:
    """Each bad field: a 400 that names it, and nothing of the report is stored."""
    name, credential = device_credential(factory)
    for fields, label in BAD_FIELDS:
        assert_error(post_report(factory, credential, **fields), 400, "bad_request", label)
    shown = listed(factory, tmp_path)[name]
    assert shown["last_report_at"] is None
    assert shown["verified_timestamp_version"] is None
    assert shown["poll_interval"] is None


def test_the_list_endpoint_refuses_a_stale_filter_it_does_not_know(factory: Factory) -> None:
    assert_error(factory.request("GET", "/devices?stale=yes"), 400, "bad_request", "'stale'")
    assert factory.request("GET", "/devices?stale=false").status_code == 200
