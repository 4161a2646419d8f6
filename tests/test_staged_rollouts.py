"""Staged rollouts (`tufa waves rollout --plan`): a wave that advances stage by stage by
itself, and halts itself when its devices' health says so.

A simulated fleet of real registered production devices, each with its own credential,
sends real reports over HTTP as the agent does; some of them poll with python-tuf's
ngclient at every step, which fails the test if any version they trust goes down
(invariant 3). The server's clock is moved with `--clock-offset-file` instead of
waiting for soak times and silences; its background task runs every second, and the
tests wait for what it must do (or, to show it did not, for several of its turns).

Run on both databases; the restart and two-replica tests kill the process that holds
the background lock (SIGKILL) in the middle of a plan.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_helpers import (
    AgentDevice,
    Exchange,
    TamperingProxy,
    build_bytes,
    publish_build,
)
from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    download_archive,
    run_cli,
    send,
    set_clock_offset,
)
from tests.test_waves import Device, image, post_wave, prepared, publish
from tests.test_webhooks import Clocked, add_hook
from tests.webhook_receiver import Receiver, verifies
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS
from tufa.server.rollout_plans import share_of

MINUTE = 60
INTERVAL = 1.0  # --rollout-interval of the servers here
# Several of the background task's turns: long enough for it to have done what it would.
TURNS = 3.5 * INTERVAL


def start_server(
    make_server: Callable[..., Server],
    backend: str,
    offset_file: Path,
    **kwargs: Any,
) -> Server:
    extra = ("--rollout-interval", f"{INTERVAL:g}s", "--clock-offset-file", str(offset_file))
    return make_server(backend, extra_args=extra, **kwargs)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def clocked(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
) -> Clocked:
    offset_file = tmp_path_factory.mktemp("clock") / "offset"
    set_clock_offset(offset_file, 0)
    return Clocked(start_server(make_server, request.param, offset_file), offset_file)


# -- the fleet --------------------------------------------------------------------------------


@dataclass
class Fleet:
    factory: Factory
    devices: list[Device]
    where: Path
    reported: dict[str, int] = field(default_factory=dict)

    def by_id(self, device_id: str) -> Device:
        return next(d for d in self.devices if d.id == device_id)

    def report(self, device: Device, kind: str, version: str = "2", **verified: Any) -> None:
        """A report as the agent sends it: what runs now, and one new event; `verified`,
        the timestamp it verified last and its poll interval."""
        runs = version if kind == "installed" else "1"
        self.reported[device.id] = self.reported.get(device.id, 0) + 1
        body = {
            **verified,
            "installed": {"version": runs, "target": image(runs), "sha256": "0" * 64},
            "events": [
                {
                    "id": f"{time.time_ns():020d}{secrets.token_hex(8)}",
                    "at": "2026-12-01T00:00:00Z",
                    "kind": kind,
                    "version": version,
                    "target": image(version),
                    "detail": "",
                }
            ],
        }
        path = self.factory.path("/device-reports")
        response = send(self.factory.server, "POST", path, device.credential, json=body)
        assert response.status_code == 200, response.text

    def wave(self, name: str = "rel-2") -> dict[str, Any]:
        response = self.factory.request("GET", f"/waves/{name}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def served(self, name: str = "rel-2") -> list[Device]:
        """The devices the server serves the wave to, as their own metadata shows."""
        return [d for d in self.devices if image("2") in d.sees()]

    def rollout(self, **body: Any) -> httpx.Response:
        return self.factory.request("POST", "/waves/rel-2/rollout", json=body)

    def wait_for(
        self, what: Callable[[dict[str, Any]], bool], name: str = "rel-2", timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            wave = self.wave(name)
            if what(wave):
                return wave
            assert time.monotonic() < deadline, f"still: {wave['rollout']}"
            time.sleep(0.2)


def make_fleet(factory: Factory, where: Path, size: int) -> Fleet:
    """`size` production devices of tag main on build 1; wave rel-2 of build 2, signed
    by the owner's offline targets key and ready to roll out."""
    devices = [Device.register(factory, where, f"dev-{i:02d}") for i in range(size)]
    publish(factory, "1")
    archive = OfflineArchive.from_bytes(download_archive(factory, where / "offline.tgz"))
    for version, name in (("1", "rel-1"), ("2", "rel-2")):
        if version == "2":
            publish(factory, "2")
        md = prepared(factory, version)
        for key in archive.keys_for(TARGETS):
            md.sign(key.prod.signer(), append=True)
        assert post_wave(factory, name, version, md).status_code == 201
        if version == "1":
            done = factory.request("POST", f"/waves/{name}/complete")
            assert done.status_code == 200, done.text
    return Fleet(factory, devices, where)


@pytest.fixture
def fleet(clocked: Clocked, tmp_path: Path) -> Fleet:
    return make_fleet(create_factory(clocked.server), tmp_path, 10)


def stage_counts(wave: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    assert all(s["devices_stale"] == 0 for s in wave["rollout"]["stages"])
    return [
        (s["devices_served"], s["devices_installed"], s["devices_failed"], s["devices_silent"])
        for s in wave["rollout"]["stages"]
    ]


def state_is(state: str, stage: int | None = None) -> Callable[[dict[str, Any]], bool]:
    def check(wave: dict[str, Any]) -> bool:
        rollout = wave["rollout"]
        return bool(rollout["state"] == state and (stage is None or rollout["stage"] == stage))

    return check


# -- a plan that goes all the way -------------------------------------------------------------


def test_a_plan_advances_through_every_stage_after_each_soak_and_completes(
    clocked: Clocked, fleet: Fleet
) -> None:
    canaries = fleet.devices[:3]
    for device in canaries:
        device.poll()  # they trust the tag's release 1 before the wave
    plan: dict[str, Any] = {
        "plan": ["20%", "50%", "100%"],
        "soak_seconds": 30 * MINUTE,
        "min_reports": 2,
    }
    started = fleet.rollout(**plan)
    assert started.status_code == 200, started.text
    assert [(s["devices_new"], s["devices_in_all"]) for s in started.json()["stages"]] == [
        (2, 2),
        (3, 5),
        (5, 10),
    ]
    wave = fleet.wave()
    assert wave["rollout"]["state"] == "soaking"
    assert wave["rollout"]["stage"] == 1
    first = {d.id for d in fleet.served()}
    assert len(first) == 2
    assert stage_counts(wave) == [(2, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)]

    for device_id in first:
        fleet.report(fleet.by_id(device_id), "installed")
    time.sleep(TURNS)  # the gate holds, but the soak time has not passed
    wave = fleet.wave()
    assert (wave["rollout"]["stage"], wave["rollout"]["state"]) == (1, "soaking")
    assert wave["rollout"]["gate"]["reports"] == 2

    clocked.advance(31 * MINUTE)
    wave = fleet.wait_for(state_is("soaking", stage=2))
    second = {d.id for d in fleet.served()}
    assert len(second) == 5
    assert first < second
    assert stage_counts(wave) == [(2, 2, 0, 0), (3, 0, 0, 0), (0, 0, 0, 0)]
    for device_id in second - first:
        fleet.report(fleet.by_id(device_id), "installed")

    clocked.advance(31 * MINUTE)
    fleet.wait_for(state_is("soaking", stage=3))
    assert len(fleet.served()) == 10
    for device in fleet.devices:
        if device.id not in second:
            fleet.report(device, "installed")

    clocked.advance(31 * MINUTE)
    # The plan's row and the wave's are read by separate statements: wait for both.
    wave = fleet.wait_for(lambda w: state_is("completed")(w) and w["status"] == "complete")
    assert stage_counts(wave) == [(2, 2, 0, 0), (3, 3, 0, 0), (5, 5, 0, 0)]
    # A device registered after the plan ends is served the release the wave completed.
    late = Device.register(fleet.factory, fleet.where, "late")
    assert image("2") in late.sees()
    for device in canaries:
        device.poll()  # no version went down on the way


# -- halting -----------------------------------------------------------------------------------


def halted_fleet(clocked: Clocked, fleet: Fleet) -> tuple[list[Device], list[Device]]:
    """A plan whose first stage (4 devices) breaches the gate: 2 of 4 failed."""
    plan: dict[str, Any] = {"plan": ["4", "100%"], "min_reports": 4, "max_failure_rate": "25%"}
    assert fleet.rollout(**plan).status_code == 200
    first = fleet.served()
    assert len(first) == 4
    fleet.report(first[0], "installed")
    fleet.report(first[1], "installed")
    fleet.report(first[2], "install-failed")
    fleet.report(first[3], "rolled-back")
    wave = fleet.wait_for(state_is("halted"))
    reason = wave["rollout"]["halt_reason"]
    assert "failure rate 50.0% (2 of 4 reports: 2 failed, 0 silent)" in reason, reason
    assert "--max-failure-rate 25%" in reason
    return first, [d for d in fleet.devices if d not in first]


def test_a_breach_halts_the_wave_and_serves_no_one_new_until_resumed(
    clocked: Clocked, fleet: Fleet
) -> None:
    first, _rest = halted_fleet(clocked, fleet)
    clocked.advance(3 * 3600)  # long past the soak time
    time.sleep(TURNS)
    wave = fleet.wave()
    assert wave["rollout"]["state"] == "halted"
    assert wave["devices_served"] == 4
    # The devices that got it keep it (no version goes down); the rest never see it.
    assert fleet.served() == first
    refused = fleet.rollout(limit="100%")
    assert_error(refused, 409, "conflict", "follows a staged plan (halted)")
    scraped = clocked.server.request("GET", "/metrics", clocked.server.operator_token).text
    labels = f'factory="{fleet.factory.name}",state="halted",wave="rel-2"'
    gauge = f"tufa_wave_rollout_stage{{{labels}}} 1.0"
    assert gauge in scraped

    # The operator looks, then resumes: earlier failures are the ones looked at.
    resumed = fleet.factory.request("POST", "/waves/rel-2/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["rollout"]["state"] == "soaking"
    assert resumed.json()["rollout"]["gate"]["failures"] == 0
    again = fleet.factory.request("POST", "/waves/rel-2/resume")
    assert_error(again, 409, "conflict", "only a halted rollout resumes")
    fleet.report(first[2], "installed")  # a retry that worked
    fleet.report(first[3], "installed")
    clocked.advance(31 * MINUTE)
    fleet.wait_for(state_is("soaking", stage=2))
    assert len(fleet.served()) == 10


def test_cancel_while_halted_keeps_the_wave_for_the_devices_that_got_it(
    clocked: Clocked, fleet: Fleet
) -> None:
    first, _rest = halted_fleet(clocked, fleet)
    cancelled = fleet.factory.request("POST", "/waves/rel-2/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["rollout"]["state"] == "cancelled"
    clocked.advance(3 * 3600)
    time.sleep(TURNS)
    assert fleet.wave()["rollout"]["state"] == "cancelled"
    assert fleet.served() == first
    resumed = fleet.factory.request("POST", "/waves/rel-2/resume")
    assert_error(resumed, 409, "conflict", "is cancelled; only a halted rollout resumes")


def test_devices_that_stay_silent_count_as_failed(clocked: Clocked, fleet: Fleet) -> None:
    plan: dict[str, Any] = {"plan": ["3", "100%"], "min_reports": 2, "silence_seconds": 2 * 3600}
    assert fleet.rollout(**plan).status_code == 200
    first = fleet.served()
    fleet.report(first[0], "installed")
    clocked.advance(3600)
    time.sleep(TURNS)
    assert fleet.wave()["rollout"]["state"] == "advancing"  # soaked, too few reports
    fleet.report(first[1], "download-started")  # heard from: not silent
    fleet.report(first[0], "installed")  # its hourly report
    clocked.advance(3600 + MINUTE)
    wave = fleet.wait_for(state_is("halted"))
    assert "(1 of 2 reports: 0 failed, 1 silent)" in wave["rollout"]["halt_reason"]
    assert stage_counts(wave)[0] == (3, 1, 0, 1)
    assert wave["devices_served"] == 3


def test_a_stage_waits_for_its_own_devices_and_halts_when_they_and_the_others_go_silent(
    clocked: Clocked, fleet: Fleet
) -> None:
    assert fleet.rollout(plan=["2", "4", "100%"], min_reports=2).status_code == 200
    first = fleet.served()
    for device in first:
        fleet.report(device, "installed")
    clocked.advance(31 * MINUTE)
    fleet.wait_for(state_is("soaking", stage=2))
    clocked.advance(31 * MINUTE)  # soaked; stage 1's reports are enough for the count, but
    time.sleep(TURNS)  # the two devices served last have said nothing
    wave = fleet.wave()
    assert (wave["rollout"]["state"], wave["rollout"]["stage"]) == ("advancing", 2)
    assert wave["devices_served"] == 4
    clocked.advance(2 * 3600)  # nobody reported since: installed or not, all are silent
    wave = fleet.wait_for(state_is("halted"))
    assert "(4 of 4 reports: 0 failed, 4 silent)" in wave["rollout"]["halt_reason"]
    assert stage_counts(wave)[:2] == [(2, 0, 0, 2), (2, 0, 0, 2)]


def test_complete_ends_a_soaking_plan_and_shares_round_in_decimal(
    clocked: Clocked, fleet: Fleet
) -> None:
    assert fleet.rollout(plan=["2", "100%"], min_reports=2).status_code == 200
    done = fleet.factory.request("POST", "/waves/rel-2/complete")
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["rollout"]["state"]) == ("complete", "completed")
    clocked.advance(3 * 3600)
    time.sleep(TURNS)
    assert fleet.wave()["rollout"]["state"] == "completed"
    assert len(fleet.served()) == 10
    assert share_of(250, 64.4) == 161
    assert share_of(3, 100) == 3
    assert share_of(10, 0.000001) == 1


def test_one_failure_of_one_report_halts_nothing(clocked: Clocked, fleet: Fleet) -> None:
    plan: dict[str, Any] = {"plan": ["3", "100%"], "min_reports": 3}
    assert fleet.rollout(**plan).status_code == 200
    first = fleet.served()
    fleet.report(first[0], "install-failed")
    clocked.advance(31 * MINUTE)
    time.sleep(TURNS)
    wave = fleet.wave()
    assert wave["rollout"]["state"] == "advancing", wave["rollout"]
    assert wave["rollout"]["gate"] == {
        "reports": 1,
        "failures": 1,
        "failure_rate": 100.0,
        "min_reports": 3,
        "max_failure_rate": 5.0,
        "decides": False,
    }
    assert wave["devices_served"] == 3
    # Three downloads failed in a row count as a failure too; now the gate decides.
    for _ in range(3):
        fleet.report(first[1], "download-failed")
    fleet.report(first[2], "installed")
    wave = fleet.wait_for(state_is("halted"))
    assert "2 of 3 reports: 2 failed" in wave["rollout"]["halt_reason"]


# -- what the operator is refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"plan": ["5%", "25%"]}, "must end with 100%"),
        ({"plan": ["50%", "20%", "100%"]}, "stage 20% must be larger than stage 50%"),
        ({"plan": ["5%", "canaries", "100%"]}, "may only be the first stage"),
        ({"plan": []}, "1 to 20 stages"),
        ({"plan": ["2", "100%"], "min_reports": 5}, "serves 2 device(s), fewer than"),
        ({"plan": ["100%"], "soak_seconds": 0}, "'soak_seconds' must be 1 to"),
        ({"plan": ["100%"], "soak_seconds": 10**30}, "'soak_seconds' is out of range"),
        ({"plan": ["100%"], "silence_seconds": 91 * 86400}, "'silence_seconds' must be 7200 to"),
        ({"plan": ["100%"], "silence_seconds": 3600}, "an idle agent reports once an hour"),
        ({"plan": ["0", "100%"]}, "stage '0' is not a count"),
        ({"plan": ["50%", "1", "100%"]}, "stage 1 must be larger than stage 50%"),
        ({"plan": ["100%"], "max_failure_rate": "101%"}, "'max_failure_rate' must be a share"),
        ({"plan": ["100%"], "max_failure_rate": "5"}, "'max_failure_rate' must be a share"),
        ({"plan": ["100%"], "max_failure_rate": 5}, "'max_failure_rate' must be of type string"),
        ({"plan": ["100%"], "min_reports": 0}, "'min_reports' must be 1 to"),
        ({"plan": ["100%"], "limit": "10"}, "'limit' does not go with 'plan'"),
        ({"plan": ["nogroup", "100%"], "min_reports": 1}, "no device group named 'nogroup'"),
    ],
)
def test_bad_plans_are_refused_and_change_nothing(
    clocked: Clocked, tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    fleet = make_fleet(create_factory(clocked.server), tmp_path, 4)
    refused = fleet.rollout(**body)
    assert refused.status_code in (400, 404), refused.text
    assert message in refused.json()["error"]["message"]
    wave = fleet.wave()
    assert wave["rollout"] is None
    assert wave["devices_served"] == 0


def test_devices_fed_old_metadata_are_counted_stale_per_stage(
    clocked: Clocked, fleet: Fleet, tmp_path: Path
) -> None:
    assert fleet.rollout(plan=["2", "100%"], min_reports=2).status_code == 200
    first = fleet.served()
    expired = {"version": 1, "expires": "2026-01-01T00:00:00Z"}
    fleet.report(first[0], "installed", timestamp=expired, poll_interval=60)
    wave = fleet.wave()
    assert wave["devices_stale"] == 1
    assert [s["devices_stale"] for s in wave["rollout"]["stages"]] == [1, 0]
    env = cli_env(fleet.factory, tmp_path / "config.json")
    shown = run_cli("waves", "status", "rel-2", env=env).stdout
    assert "1 of them fed old metadata (stale)" in shown
    assert "  stage  target  served  installed  failed  silent  stale" in shown


def test_a_device_a_stage_moves_is_not_stale_for_what_it_reported_before(
    clocked: Clocked, fleet: Fleet
) -> None:
    """Its report from before the move speaks of its old view: the wave's view had
    published newer timestamps long before, but not to it."""
    assert fleet.rollout(plan=["2", "4", "100%"], min_reports=2).status_code == 200
    first = fleet.served()
    later = [d for d in fleet.devices if d not in first][:2]
    clocked.advance(20 * MINUTE)
    verified = {"version": 1, "expires": "2099-01-01T00:00:00Z"}
    for device in later:
        fleet.report(device, "download-started", timestamp=verified, poll_interval=60)
    for device in first:
        fleet.report(device, "installed")
    clocked.advance(11 * MINUTE)
    wave = fleet.wait_for(state_is("soaking", stage=2))
    assert {d.id for d in later} <= {d.id for d in fleet.served()}
    assert [s["devices_stale"] for s in wave["rollout"]["stages"]] == [0, 0, 0]
    assert wave["devices_stale"] == 0


def test_a_group_first_and_a_dry_run_that_changes_nothing(clocked: Clocked, fleet: Fleet) -> None:
    group = fleet.factory.request("POST", "/device-groups", json={"name": "beta"})
    assert group.status_code == 201
    members = [d.name for d in fleet.devices[-3:]]
    added = fleet.factory.request("POST", "/device-groups/beta/devices", json={"devices": members})
    assert added.status_code == 200
    plan: dict[str, Any] = {"plan": ["beta", "50%", "100%"], "min_reports": 3}
    dry = fleet.rollout(**plan, dry_run=True)
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True
    assert [(s["target"], s["devices_new"]) for s in dry.json()["stages"]] == [
        ("beta", 3),
        ("50%", 2),
        ("100%", 5),
    ]
    assert fleet.wave()["rollout"] is None
    assert fleet.served() == []
    assert fleet.rollout(**plan).status_code == 200
    assert {d.name for d in fleet.served()} == set(members)
    again = fleet.rollout(**plan)
    assert_error(again, 409, "conflict", "has a staged plan already")


def test_the_cli_starts_shows_and_resumes_a_plan(
    clocked: Clocked, fleet: Fleet, tmp_path: Path
) -> None:
    env = cli_env(fleet.factory, tmp_path / "config.json")

    def tufa(*args: str) -> str:
        done = run_cli(*args, env=env)
        assert done.returncode == 0, f"tufa {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    dry = tufa("waves", "rollout", "rel-2", "--plan", "2,100%", "--min-reports", "2", "--dry-run")
    assert "Would roll out wave rel-2 in 2 stage(s), of 10 device(s) of its tag:" in dry
    assert "stage 1 (2): 2 more, 2 in all" in dry
    assert "stage 2 (100%): 8 more, 10 in all" in dry
    both = run_cli("waves", "rollout", "rel-2", "--plan", "2,100%", "--limit", "3", env=env)
    assert both.returncode == 2
    assert "leave out GROUP, --uuids and --limit" in both.stderr
    alone = run_cli("waves", "rollout", "rel-2", "--soak", "1h", env=env)
    assert alone.returncode == 2
    assert "--soak go with --plan only" in alone.stderr
    out = tufa(
        "waves", "rollout", "rel-2", "--plan", "2,100%", "--soak", "1h",
        "--max-failure-rate", "10%", "--min-reports", "2", "--silence", "3h",
    )  # fmt: skip
    assert "Stage 1 is served now" in out
    first = fleet.served()
    fleet.report(first[0], "install-failed")
    fleet.report(first[1], "install-failed")
    fleet.wait_for(state_is("halted"))
    shown = tufa("waves", "status", "rel-2")
    assert "staged rollout: halted at stage 1 of 2" in shown
    assert "halts above 10%" in shown
    assert "failure rate 100.0% (2 of 2 reports: 2 failed, 0 silent)" in shown
    assert "tufa waves resume rel-2" in shown
    (row,) = fleet_json(tufa("waves", "status", "rel-2", "--json"))
    assert (row["state"], row["stage"]) == ("halted", 1)
    assert "failure rate 100.0%" in row["halt_reason"]
    assert row["plan"]["soak_seconds"] == 3600
    assert row["plan"]["silence_seconds"] == 3 * 3600
    assert [s["devices_failed"] for s in row["plan"]["stages"]] == [2, 0]
    resumed = tufa("waves", "resume", "rel-2")
    assert "Wave rel-2 goes on: soaking at stage 1 of 2, next stage at" in resumed
    (row,) = fleet_json(tufa("waves", "status", "rel-2", "--json"))
    assert (row["state"], row["halt_reason"]) == ("soaking", None)


def fleet_json(text: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(text)
    return found


# -- restarts and replicas ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_plan_goes_on_after_the_server_holding_it_is_killed(
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
    backend: str,
) -> None:
    """On PostgreSQL a second replica takes over; on SQLite the server is started again."""
    offset_file = tmp_path / "offset"
    set_clock_offset(offset_file, 0)
    db_url = make_db_url(backend)
    first = start_server(make_server, backend, offset_file, db_url=db_url)
    fleet = make_fleet(create_factory(first), tmp_path, 6)
    assert fleet.rollout(plan=["2", "4", "100%"], min_reports=2).status_code == 200
    for device in fleet.served():
        fleet.report(device, "installed")
    if backend == "postgres":
        shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
        second = make_server(
            backend,
            db_url=db_url,
            extra_args=(
                "--rollout-interval", f"{INTERVAL:g}s", "--clock-offset-file", str(offset_file),
                *shared_key,
            ),
        )  # fmt: skip
    assert first.local.process is not None
    first.local.process.send_signal(signal.SIGKILL)
    first.local.process.wait(timeout=10)
    if backend == "sqlite":
        second = start_server(
            make_server, backend, offset_file, db_url=db_url, data_dir=first.local.data_dir
        )
    fleet.factory.server = second
    set_clock_offset(offset_file, 31 * MINUTE)
    fleet.wait_for(state_is("soaking", stage=2))
    assert len(fleet.served()) == 4
    for device in fleet.served():
        fleet.report(device, "installed")
    set_clock_offset(offset_file, 62 * MINUTE)
    fleet.wait_for(state_is("soaking", stage=3))
    assert len(fleet.served()) == 6


# -- real agents --------------------------------------------------------------------------------


def test_real_agents_failures_halt_the_plan_a_download_after_three_tries(
    clocked: Clocked, tmp_path: Path
) -> None:
    """Three `tufa-agent`s in the first stage: one installs, one's installer fails, and
    one's downloads are cut by a proxy, at every check with the same error; the agent
    reports that error three times, and the third makes it a failure for the gate."""
    factory = create_factory(clocked.server)
    archive = OfflineArchive.from_bytes(download_archive(factory, tmp_path / "offline.tgz"))
    proxy = TamperingProxy(factory.server.url)
    try:
        good = AgentDevice.register(factory, tmp_path, "prod", name="a-good")
        # An installer that takes build 1 and fails on every other.
        only_build_1 = f'cmp -s "$TUFA_TARGET_PATH" {tmp_path / "build-1"}'
        (tmp_path / "build-1").write_bytes(build_bytes("1"))
        broken = AgentDevice.register(
            factory, tmp_path, "prod", name="b-broken",
            extra=("--installer", "command", "--install-command", only_build_1),
        )  # fmt: skip
        cut = AgentDevice.register(factory, tmp_path, "prod", name="c-cut", server_url=proxy.url)
        others = [Device.register(factory, tmp_path, f"d-{i}") for i in range(3)]
        for version in ("1", "2"):
            publish_build(factory, version)
            md = prepared(factory, version)
            for key in archive.keys_for(TARGETS):
                md.sign(key.prod.signer(), append=True)
            assert post_wave(factory, f"rel-{version}", version, md).status_code == 201
            if version == "1":
                assert factory.request("POST", "/waves/rel-1/complete").status_code == 200
                for agent in (good, broken, cut):
                    assert agent.run_once().returncode == 0, agent.name
        fleet = Fleet(factory, [*others], tmp_path)
        plan = {"plan": ["3", "100%"], "min_reports": 3, "max_failure_rate": "50%"}
        assert fleet.rollout(**plan).status_code == 200

        def cut_targets(exchange: Exchange) -> None:
            if "/targets/" in exchange.path:
                exchange.status, exchange.body = 500, b"cut"

        proxy.tamper = cut_targets
        assert good.run_once().returncode == 0
        assert good.installed_version() == "2"
        assert broken.run_once().returncode != 0
        for attempt in (1, 2):
            assert cut.run_once().returncode != 0
            time.sleep(TURNS)
            wave = fleet.wave()
            assert wave["rollout"]["state"] == "soaking", (attempt, wave["rollout"])
            assert stage_counts(wave)[0] == (3, 1, 1, 0)
        assert cut.run_once().returncode != 0
        wave = fleet.wait_for(state_is("halted"))
        assert "(2 of 3 reports: 2 failed, 0 silent)" in wave["rollout"]["halt_reason"]
        # Once the attempts the gate counts are reported, the same error is said no more.
        assert cut.run_once().returncode != 0
        shown = factory.request("GET", f"/devices/{cut.name}").json()
        assert [e["kind"] for e in shown["events"]].count("download-failed") == 3
        assert cut.installed_version() == "1"  # it keeps what it runs
        assert broken.installed_version() == "1"
        assert fleet.served() == []  # the rest of the fleet never saw it
    finally:
        proxy.close()


# -- events to the outside ----------------------------------------------------------------------


def test_a_plan_tells_its_webhooks_it_advanced_halted_and_completed(
    clocked: Clocked, fleet: Fleet
) -> None:
    secret = "s" * 32
    receiver = Receiver().start()
    try:
        events = ["wave.advanced", "wave.halted", "wave.completed"]
        add_hook(fleet.factory, receiver.url, events, secret=secret)
        plan = {"plan": ["2", "4", "100%"], "min_reports": 2, "max_failure_rate": "30%"}
        assert fleet.rollout(**plan).status_code == 200
        for device in fleet.served():
            fleet.report(device, "installed")
        clocked.advance(31 * MINUTE)
        (advanced,) = receiver.wait_for(lambda r: len(r) == 1)
        assert advanced.event == "wave.advanced"
        assert verifies(secret, advanced.body, advanced.headers["x-tufa-signature"])
        assert advanced.payload["data"] == {
            "wave": "rel-2", "tag": "main", "version": "2", "stage": 2, "target": "4",
            "devices_added": 2,
        }  # fmt: skip
        newest = [d for d in fleet.served() if fleet.reported.get(d.id) is None]
        for device in newest:
            fleet.report(device, "rolled-back")
        halted = receiver.wait_for(lambda r: len(r) == 2)[1]
        assert halted.event == "wave.halted"
        assert halted.payload["data"]["stage"] == 2
        assert "failure rate 50.0% (2 of 4 reports" in halted.payload["data"]["reason"]
        assert fleet.factory.request("POST", "/waves/rel-2/complete").status_code == 200
        completed = receiver.wait_for(lambda r: len(r) == 3)[2]
        assert completed.event == "wave.completed"
        assert completed.payload["data"] == {"wave": "rel-2", "tag": "main", "version": "2"}
        assert len({r.headers["x-tufa-delivery"] for r in receiver.received}) == 3
    finally:
        receiver.stop()
