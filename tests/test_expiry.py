"""Online metadata stays valid as time passes, and expiry is reported rather than hidden.

Time is moved, not waited for: each server here runs with `--clock-offset-file`, whose
content (seconds) the server adds to its clock, and python-tuf's ngclient is given the
same offset, so both sides agree on what "now" is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import ExpiredMetadataError
from tuf.ngclient import Updater

from tests.conftest import BACKENDS
from tests.helpers import Factory, Server, cli_env, create_factory, run_cli, set_clock_offset

DAY = 86400
CHANNELS = ("ci", "prod")
RESIGN_WAIT_SECONDS = 10.0


def _start(
    make_server: Callable[..., Server], backend: str, offset_file: Path, *extra: str
) -> Server:
    set_clock_offset(offset_file, 0)
    return make_server(backend, extra_args=("--clock-offset-file", str(offset_file), *extra))


def _versions(factory: Factory, channel: str) -> dict[str, int]:
    """The newest version of each role of a channel, as the server reports them."""
    response = factory.request("GET")
    response.raise_for_status()
    info = response.json()["channels"][channel]
    return {role: info[role]["version"] for role in ("root", "targets", "snapshot", "timestamp")}


def _timestamp_version(factory: Factory, channel: str) -> int:
    response = factory.request("GET", f"/repo/{channel}/metadata/timestamp.json")
    response.raise_for_status()
    version: int = response.json()["signed"]["version"]
    return version


def _wait_for_new_timestamps(factory: Factory, before: dict[str, int]) -> dict[str, int]:
    """Poll until the background re-signer has published a newer timestamp on both channels."""
    deadline = time.monotonic() + RESIGN_WAIT_SECONDS
    while True:
        now = {channel: _timestamp_version(factory, channel) for channel in CHANNELS}
        if all(now[channel] > before[channel] for channel in CHANNELS):
            return now
        if time.monotonic() > deadline:
            pytest.fail(
                f"no re-signed timestamp within {RESIGN_WAIT_SECONDS}s: was {before}, is {now}"
            )
        time.sleep(0.2)


def _updater_at(factory: Factory, channel: str, trust_dir: Path, offset_seconds: float) -> Updater:
    """ngclient for a channel, believing the time is now + offset_seconds."""
    updater = factory.updater(channel, trust_dir)
    # python-tuf has no public way to choose the client's "now": every expiry check of its
    # trusted metadata set compares against `reference_time`, fixed when the Updater is
    # built. Moving it is how a client living `offset_seconds` in the future is simulated.
    updater._trusted_set.reference_time = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return updater


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_resigner_keeps_both_channels_refreshable(
    backend: str, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    offset_file = tmp_path / "clock-offset"
    server = _start(make_server, backend, offset_file, "--resign-interval", "1s")
    factory = create_factory(server)
    trust = {channel: tmp_path / f"trust-{channel}" for channel in CHANNELS}
    for channel in CHANNELS:
        _updater_at(factory, channel, trust[channel], 0).refresh()
    initial = {channel: _versions(factory, channel) for channel in CHANNELS}
    assert all(v["timestamp"] == 1 and v["snapshot"] == 1 for v in initial.values())

    # 4 days on: past the timestamp's expiry (1d) and the snapshot's half-life (3.5 of 7d),
    # well within the targets' half-life. Nothing but the background task may re-sign.
    offset = 4 * DAY
    set_clock_offset(offset_file, offset)
    timestamps = _wait_for_new_timestamps(factory, {c: initial[c]["timestamp"] for c in CHANNELS})
    for channel in CHANNELS:
        versions = _versions(factory, channel)
        assert versions["snapshot"] > initial[channel]["snapshot"], channel
        assert versions["targets"] == 1, channel
        updater = _updater_at(factory, channel, trust[channel], offset)
        updater.refresh()
        trusted = updater._trusted_set
        assert trusted.timestamp.version >= timestamps[channel]
        assert trusted.snapshot.version == versions["snapshot"]
        assert trusted.timestamp.expires > datetime.now(UTC) + timedelta(seconds=offset)

    # 20 and 40 days on: CI targets (30d) pass their half-life each time and are re-signed
    # by the server; production targets are signed offline too, so the server leaves
    # them alone (they are valid for 365 days) and still refreshes fine.
    for days in (20, 40):
        offset = days * DAY
        before = {channel: _versions(factory, channel) for channel in CHANNELS}
        set_clock_offset(offset_file, offset)
        _wait_for_new_timestamps(factory, {c: before[c]["timestamp"] for c in CHANNELS})
        after = {channel: _versions(factory, channel) for channel in CHANNELS}
        assert after["ci"]["targets"] > before["ci"]["targets"], days
        assert after["prod"]["targets"] == 1, days
        moved_now = datetime.now(UTC) + timedelta(seconds=offset)
        for channel in CHANNELS:
            updater = _updater_at(factory, channel, trust[channel], offset)
            updater.refresh()
            trusted = updater._trusted_set
            assert trusted.targets.version == after[channel]["targets"], (days, channel)
            assert trusted.targets.expires > moved_now, (days, channel)
            assert trusted.snapshot.expires > moved_now, (days, channel)
            assert trusted.timestamp.expires > moved_now, (days, channel)
    assert _versions(factory, "ci")["targets"] >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_server_back_from_downtime_serves_fresh_metadata_from_its_first_answer(
    backend: str, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    # An hour between passes: only the start-up pass can have re-signed anything here.
    offset_file = tmp_path / "clock-offset"
    server = _start(make_server, backend, offset_file, "--resign-interval", "1h")
    factory = create_factory(server)
    assert all(_timestamp_version(factory, channel) == 1 for channel in CHANNELS)

    server.local.stop()
    offset = 2 * DAY  # down for two days: every timestamp it served has expired
    set_clock_offset(offset_file, offset)
    logged_before = len(server.local.log())
    server.local.start()
    # The pass is done before the server takes requests, not racing the first of them.
    restart_log = server.local.log()[logged_before:]
    assert "re-signed online metadata of 2 channel(s)" in restart_log, restart_log
    assert restart_log.index("re-signed online metadata") < restart_log.index(
        "startup complete: serving requests"
    ), restart_log
    for channel in CHANNELS:
        assert _timestamp_version(factory, channel) == 2, channel
        updater = _updater_at(factory, channel, tmp_path / f"after-{channel}", offset)
        updater.refresh()
        assert updater._trusted_set.timestamp.expires > datetime.now(UTC) + timedelta(
            seconds=offset
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_resigning_a_client_refuses_the_expired_timestamp(
    backend: str, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    offset_file = tmp_path / "clock-offset"
    server = _start(make_server, backend, offset_file, "--resign-interval", "1s", "--no-resign")
    factory = create_factory(server)
    for channel in CHANNELS:
        _updater_at(factory, channel, tmp_path / f"now-{channel}", 0).refresh()

    offset = 2 * DAY  # past the timestamp's 1-day expiry
    set_clock_offset(offset_file, offset)
    time.sleep(1.5)  # more than a re-sign interval: a re-signer, if one ran, would act
    for channel in CHANNELS:
        assert _timestamp_version(factory, channel) == 1, channel
        updater = _updater_at(factory, channel, tmp_path / f"later-{channel}", offset)
        with pytest.raises(ExpiredMetadataError, match="timestamp"):
            updater.refresh()


@pytest.mark.parametrize("backend", BACKENDS)
def test_offline_metadata_near_expiry_is_reported(
    backend: str, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(backend, extra_args=("--root-expiry", "20d"))
    factory = create_factory(server)
    env = cli_env(factory, tmp_path / "config.json")

    done = run_cli("factory", "show", "--json", env=env)
    assert done.returncode == 0, done.stderr
    warnings = expiry_warnings(json.loads(done.stdout))
    for channel in CHANNELS:
        assert any(f"{channel} root" in w for w in warnings), warnings
    response = factory.request("GET")
    assert response.status_code == 200
    api_warnings = expiry_warnings(response.json())
    assert len(api_warnings) == len(warnings) == 2, api_warnings
    for channel in CHANNELS:
        assert any(f"{channel} root" in w for w in api_warnings), api_warnings
    # Production targets are offline-signed but valid for 365 days: no warning for them.
    assert not any("targets" in w for w in warnings), warnings

    for args in (("keys", "show-root"), ("keys", "show-root", "--prod", "--json")):
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert "WARNING" in done.stderr, args
        assert "root" in done.stderr, args
        assert "WARNING" not in done.stdout, args
    # The warning goes to stderr, so the JSON on stdout stays usable by scripts.
    assert json.loads(done.stdout)["signed"]["_type"] == "root"


def expiry_warnings(shown: dict[str, Any]) -> list[str]:
    """The warnings of `tufa factory show --json` about metadata near expiry."""
    return [w for w in shown["warnings"] if "expire" in w]
