"""Operating the server: /metrics, /readyz, and `tufa-server run --workers N`."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from tuf.api.metadata import Metadata, Timestamp

from tests.conftest import BACKENDS, PG_ADMIN_URL
from tests.helpers import Factory, Server, assert_error, create_factory, set_clock_offset
from tests.test_waves import post_wave, prepared, publish, sign_offline, start_owner
from tufa.core.keys import KeyType
from tufa.demo.local_server import LocalServer
from tufa.server import metrics
from tufa.server.metrics import publish_action, route_class
from tufa.server.settings import OffsetClock, Settings
from tufa.server.workers import settings_from_json, settings_to_json

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.postgres) if b == "postgres" else b for b in BACKENDS
]


def scrape(server: Server, token: str | None = None) -> Samples:
    response = server.request("GET", "/metrics", token or server.operator_token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of `name`, by the value of their `label`."""
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


def test_poll_answers_counted_in_one_go_equal_observing_each(tmp_path: Path) -> None:
    """The poll path's counts, added at flush time, are what prometheus-client's own
    observe() would have made of the same answers: count, sum and every bucket."""
    durations = [0.0001, 0.004, 0.005, 0.02, 0.3, 7.0, 12.0]

    def histogram_samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
        return {
            f"{sample.name}{sorted(sample.labels.items())}": sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name.startswith(name) and sample.labels.get("route_class") == "metadata"
        }

    reference_registry = CollectorRegistry()
    reference = Histogram("ref", "", ["route_class"], registry=reference_registry)
    for seconds in durations:
        reference.labels("metadata").observe(seconds)
    before = histogram_samples(metrics._REGISTRY, "tufa_http_request_duration_seconds")

    async def answer_polls() -> None:
        for seconds in durations:
            metrics.observe_poll(200, seconds)
        metrics.flush_poll_answers()

    asyncio.run(answer_polls())
    after = histogram_samples(metrics._REGISTRY, "tufa_http_request_duration_seconds")
    added = {
        key.removeprefix("tufa_http_request_duration_seconds"): after[key] - before.get(key, 0)
        for key in after
    }
    expected = {
        key.removeprefix("ref"): v
        for key, v in histogram_samples(reference_registry, "ref").items()
    }
    assert added == pytest.approx(expected)
    assert expected["_count[('route_class', 'metadata')]"] == len(durations)


def test_route_classes_are_a_few_names_never_a_path() -> None:
    f = "/api/v1/factories/acme"
    assert route_class(f"{f}/repo/ci/metadata/timestamp.json") == "metadata"
    assert route_class(f"{f}/repo/prod/targets/{'a' * 64}.image-1") == "target"
    assert route_class(f"{f}/blobs/{'b' * 64}") == "blob"
    assert route_class(f"{f}/devices/d-1/revoke") == "api"
    assert route_class("/healthz") == route_class("/readyz") == "health"
    assert route_class("/metrics") == "metrics"
    assert route_class("/tufa_secret_pasted_as_a_path") == "other"
    assert publish_action("POST", f"{f}/targets") == "add"
    assert publish_action("POST", f"{f}/targets/prune") == "prune"
    assert publish_action("POST", f"{f}/targets/delete") == "delete"
    assert publish_action("GET", f"{f}/targets") is None
    assert publish_action("POST", f"{f}/waves") is None


def test_workers_get_the_settings_with_their_types(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        db_url="postgresql+psycopg://tufa@db/tufa",
        port=9000,
        public_url="https://tufa.example",
        timestamp_expiry=timedelta(hours=6),
        resign_interval=timedelta(seconds=5),
        resign_enabled=False,
        blob_dir=tmp_path / "blobs",
        clock=OffsetClock(tmp_path / "offset"),
        online_key_type=KeyType.ECDSA,
        metrics_token_sha256="ab" * 32,
    )
    handed = settings_from_json(settings_to_json(settings))
    for name, expected in vars(settings).items():
        got = getattr(handed, name)
        assert type(got) is type(expected), name
        if name == "clock":
            assert isinstance(got, OffsetClock)
            assert got.offset_file == tmp_path / "offset"
        else:
            assert got == expected, name


def test_metrics_need_the_operator_token(factory: Factory) -> None:
    server = factory.server
    assert_error(server.request("GET", "/metrics"), 401, "unauthorized", "operator token")
    refused = server.request("GET", "/metrics", factory.admin_token)
    assert_error(refused, 403, "forbidden", "operator token")
    assert factory.name not in refused.text


def test_metrics_count_requests_and_show_expiry(factory: Factory) -> None:
    server = factory.server
    before = scrape(server)
    for _ in range(3):
        read = factory.request("GET", "/repo/ci/metadata/timestamp.json")
        assert read.status_code == 200
    missing = factory.request("GET", "/repo/ci/metadata/99.snapshot.json")
    assert missing.status_code == 404
    publish(factory, "1")
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    metadata_ok = {"route_class": "metadata", "method": "GET", "status": "200"}
    assert grew("tufa_http_requests_total", **metadata_ok) >= 3
    assert grew("tufa_http_requests_total", **{**metadata_ok, "status": "404"}) >= 1
    assert grew("tufa_http_request_duration_seconds_count", route_class="metadata") >= 4
    assert grew("tufa_publish_duration_seconds_count", action="add", status="201") >= 1
    # A publish signs the CI targets, snapshot and timestamp.
    for role in ("targets", "snapshot", "timestamp"):
        assert grew("tufa_signing_duration_seconds_count", role=role) >= 1
    assert value(after, "tufa_database_up") == 1

    # Route labels are classes: no path, so no factory name, device or token in them.
    for (name, labels), _ in after.items():
        if name.startswith("tufa_http_"):
            assert not any("/" in v or factory.name in v for _, v in labels), (name, labels)

    expiry = {
        (channel, role): value(
            after, "tufa_metadata_expires_in_seconds", factory=factory.name, channel=channel,
            role=role,
        )
        for channel in ("ci", "prod")
        for role in ("root", "targets", "snapshot", "timestamp")
    }  # fmt: skip
    for (channel, role), seconds in expiry.items():
        assert seconds > 0, (channel, role)
    # Defaults: timestamps for a day, CI targets 30 days, roots a year.
    assert 80000 < expiry["ci", "timestamp"] <= 86400
    assert 29 * 86400 < expiry["ci", "targets"] <= 30 * 86400
    assert 364 * 86400 < expiry["prod", "root"] <= 365 * 86400


def test_metrics_show_how_many_devices_a_wave_serves(factory: Factory, tmp_path: Path) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    for _ in range(3):
        factory.register_device("prod")
    publish(factory, "2")
    md = prepared(factory, "2")
    sign_offline(owner, md)
    assert post_wave(factory, "main-2", "2", md).status_code == 201
    rolled = factory.request("POST", "/waves/main-2/rollout", json={"limit": "2"})
    assert rolled.status_code == 200, rolled.text

    samples = scrape(factory.server)
    wave = {"factory": factory.name, "wave": "main-2"}
    assert value(samples, "tufa_wave_devices", **wave, state="served") == 2
    assert value(samples, "tufa_wave_devices", **wave, state="installed") == 0
    # The wave's own view counts among the production channel's views.
    timestamp = value(
        samples, "tufa_metadata_expires_in_seconds", factory=factory.name, channel="prod",
        role="timestamp",
    )  # fmt: skip
    assert 0 < timestamp <= 86400


def test_a_metrics_token_reads_metrics_and_nothing_else(
    make_server: Callable[..., Server],
) -> None:
    token = secrets.token_hex(32)
    server = make_server("sqlite", extra_args=("--metrics-token", token))
    factory = create_factory(server)
    samples = scrape(server, token)
    assert value(samples, "tufa_database_up") == 1
    assert factory.name in labelled(samples, "tufa_metadata_expires_in_seconds", "factory")
    assert_error(server.request("GET", "/metrics", token[:-1] + "x"), 401, "unauthorized")
    assert_error(server.request("GET", "/api/v1/factories", token), 401, "unauthorized")
    with pytest.raises(RuntimeError, match="--metrics-token"):
        make_server("sqlite", extra_args=("--metrics-token", "short"))


@pytest.mark.postgres
def test_readyz_says_when_the_database_is_gone(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None]
) -> None:
    db_url = make_db_url("postgres")
    assert db_url is not None
    name = db_url.rpartition("/")[2]
    server = make_server("postgres", db_url=db_url)
    ready = server.request("GET", "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready"}

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        gone = server.request("GET", "/readyz")
        assert_error(gone, 503, "not_ready", "the database is unreachable")
        assert "127.0.0.1" not in gone.text
        assert name not in gone.text
        # Liveness is not readiness: the process itself is fine.
        assert server.request("GET", "/healthz").status_code == 200
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    assert server.request("GET", "/readyz").status_code == 200
    assert re.search(r"readiness: the database is unreachable: .*" + name, server.local.log())


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _timestamp(factory: Factory) -> Metadata[Timestamp]:
    response = factory.request("GET", "/repo/ci/metadata/timestamp.json")
    assert response.status_code == 200, response.text
    return Metadata[Timestamp].from_bytes(response.content)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_workers_serve_one_port_and_one_of_them_resigns(
    backend: str, make_db_url: Callable[[str], str | None], tmp_path: Path
) -> None:
    clock = tmp_path / "clock-offset"
    set_clock_offset(clock, 0)
    args = ("--workers", "2", "--resign-interval", "1s", "--clock-offset-file", str(clock))
    local = LocalServer(
        tmp_path / "data", operator_token="", db_url=make_db_url(backend), extra_args=args
    )
    del local._env["TUFA_OPERATOR_TOKEN"]  # the first start makes one and prints it
    try:
        local.start(timeout=60)
        # Made once, by the parent, not once per worker.
        printed = re.findall(r"Operator token \(shown once.*\n\s+(\S+)", local.log())
        assert len(printed) == 1, local.log()
        local.operator_token = printed[0]
        server = Server(local, backend)
        factory = create_factory(server)

        # Fresh connections until each worker has answered some.
        served: dict[str, float] = {}
        deadline = time.monotonic() + 30
        # (A worker's series appears at 0 before it answers anything.)
        while not (len(served) == 2 and all(served.values())) and time.monotonic() < deadline:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda _: httpx.get(f"{local.url}/readyz", timeout=10), range(40)))
            served = labelled(scrape(server), "tufa_worker_requests", "pid")
        assert len(served) == 2, served
        assert all(v > 0 for v in served.values()), served
        assert local.process is not None
        assert {_parent_of(int(pid)) for pid in served} == {local.process.pid}

        # Whichever worker answers the scrape, it tells every worker's counts.
        samples = scrape(server)
        resigners = labelled(samples, "tufa_resigner_active", "pid")
        assert set(resigners) == set(served)
        assert sorted(resigners.values()) == [0, 1], resigners
        log = local.log()
        assert log.count("runs the background re-signer") == 1, log
        assert log.count("this one stands by") == 1, log

        # The one re-signer keeps metadata fresh.
        first = _timestamp(factory).signed.version
        set_clock_offset(clock, 2 * 86400)
        deadline = time.monotonic() + 30
        while _timestamp(factory).signed.version == first:
            assert time.monotonic() < deadline, "no worker re-signed"
            time.sleep(0.3)

        # Down for two more days: the start-up pass re-signs before any worker serves.
        local.stop()
        set_clock_offset(clock, 4 * 86400)
        local.start(timeout=60)
        served_now = datetime.now(UTC) + timedelta(days=4)
        assert _timestamp(factory).signed.expires > served_now
        assert not re.search(r"Traceback|ERROR", local.log()), local.log()
    finally:
        local.stop()


@pytest.mark.postgres
def test_a_replica_standing_by_takes_over_the_resigner(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None]
) -> None:
    db_url = make_db_url("postgres")
    args = ("--resign-interval", "1s")
    first = make_server("postgres", extra_args=args, db_url=db_url)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", extra_args=(*args, *shared_key), db_url=db_url)
    second.local.operator_token = first.operator_token  # the first start chose it
    deadline = time.monotonic() + 10
    while "runs the background re-signer" not in first.local.log():
        assert time.monotonic() < deadline, first.local.log()
        time.sleep(0.2)
    assert value(scrape(first), "tufa_resigner_active") == 1
    assert value(scrape(second), "tufa_resigner_active") == 0
    assert "this one stands by" in second.local.log()

    first.local.stop()
    deadline = time.monotonic() + 15
    while "runs the background re-signer" not in second.local.log():
        assert time.monotonic() < deadline, second.local.log()
        time.sleep(0.2)
    assert value(scrape(second), "tufa_resigner_active") == 1
