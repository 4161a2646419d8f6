"""What the server tells Prometheus (`GET /metrics`), in the text exposition format.

Counted as they happen, in each process: requests and their latency by route class
(never the raw path, which names factories, devices and tokens' ids), CI publishes and
their duration, and the time each metadata file takes to sign. Read from the database
at every scrape, so that every replica tells the same truth: how long each channel's
metadata has until it expires, how many devices each active wave serves, and how many
devices of each factory are stale.

With several worker processes (`tufa-server run --workers N`) the counters live in
prometheus-client's multiprocess mode: files in PROMETHEUS_MULTIPROC_DIR, summed over
the workers at each scrape, so any worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Final, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, literal, select, text, union

from tufa.core import api_paths, metadata
from tufa.core.metadata import ROOT, TOP_LEVEL_ROLES, Channel
from tufa.server.db import (
    Database,
    channels,
    devices,
    factories,
    metadata_files,
    waves,
)
from tufa.server.rollout_plans import HALTED, RUNNING, wave_plans
from tufa.server.settings import Clock
from tufa.server.sql_types import ChannelName
from tufa.server.staleness import stale_device_ids
from tufa.server.views import tag_view, wave_view
from tufa.server.waves import ACTIVE

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# The ASGI scope's key for when a request arrived, set by the first layer that times it.
STARTED: Final = "tufa.started"
# Decided when the module is first imported, as prometheus-client decides it.
MULTIPROCESS: Final = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# The metrics this process counts; with several workers each also writes its values
# to the shared directory, and a scrape reads them all from there.
_REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "tufa_http_requests",
    "HTTP requests answered, by route class, method and status code.",
    ["route_class", "method", "status"],
    registry=_REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "tufa_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route class.",
    ["route_class"],
    registry=_REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "tufa_publish_duration_seconds",
    "CI publishes (targets add, prune, delete) and their duration, by action and status.",
    ["action", "status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=_REGISTRY,
)
SIGNING_SECONDS = Histogram(
    "tufa_signing_duration_seconds",
    "Time to sign one metadata file with the keys given, by role.",
    ["role"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=_REGISTRY,
)
POLL_REFILLS = Counter(
    "tufa_poll_refills",
    "Polls of a file the poll cache did not hold: 'led' went to the database and filled "
    "it, 'waited' waited for one that did.",
    ["outcome"],
    registry=_REGISTRY,
)
WEBHOOK_DELIVERIES = Counter(
    "tufa_webhook_deliveries",
    "Webhook delivery attempts, by outcome: delivered, failed (to be retried), given-up.",
    ["outcome"],
    registry=_REGISTRY,
)
RESIGNER = Gauge(
    "tufa_resigner_active",
    "1 in the process that runs the background re-signer, 0 in those standing by.",
    multiprocess_mode="liveall",
    registry=_REGISTRY,
)
WORKER_REQUESTS = Gauge(
    "tufa_worker_requests",
    "Requests this server process answered (labelled by pid when several workers run).",
    multiprocess_mode="liveall",
    registry=_REGISTRY,
)

# The *_created series would only double a scrape's size.
disable_created_metrics()  # type: ignore[no-untyped-call]
metadata.sign_observers.append(lambda role, seconds: SIGNING_SECONDS.labels(role).observe(seconds))


def _template(path: str) -> str:
    """A route template of api_paths as a pattern: each `{field}` is one path segment."""
    parts = re.split(r"(\{[a-z_0-9]+\})", path)
    return "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)


def _classifier(classes: tuple[tuple[str, str], ...]) -> re.Pattern[str]:
    """One pattern for all `(name, route template)`: a match's `lastgroup` names the
    first alternative that matched the whole path."""
    return re.compile(
        "|".join(f"(?P<{name}_{i}>{_template(path)})" for i, (name, path) in enumerate(classes))
    )


# Route classes: a fixed, small set of label values whatever the paths requested.
_CLASSES = _classifier(
    (
        ("health", api_paths.HEALTH),
        ("health", api_paths.READY),
        ("metrics", api_paths.METRICS),
        ("metadata", api_paths.METADATA_FILE),
        ("target", api_paths.TARGET_FILE),
        ("blob", api_paths.BLOB),
    )
)
_PUBLISHES = _classifier(
    (
        ("add", api_paths.TARGETS),
        ("prune", api_paths.PRUNE_TARGETS),
        ("delete", api_paths.DELETE_TARGETS),
    )
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _matched(pattern: re.Pattern[str], path: str) -> str | None:
    match = pattern.fullmatch(path)
    return None if match is None or match.lastgroup is None else match.lastgroup.rpartition("_")[0]


def route_class(path: str) -> str:
    """`health`, `metrics`, `metadata`, `target`, `blob`, `api` or `other`."""
    return _matched(_CLASSES, path) or ("api" if path.startswith("/api/") else "other")


def publish_action(method: str, path: str) -> str | None:
    """Which CI publish a request is (`add`, `prune`, `delete`), or None."""
    return _matched(_PUBLISHES, path) if method == "POST" else None


class _Series(NamedTuple):
    requests: Counter
    seconds: Histogram
    publish_seconds: Histogram | None


@functools.cache
def _series(kind: str, method: str, status: int, action: str | None) -> _Series:
    """The labelled series one request counts into. Looking a labelled child up in
    prometheus-client takes a lock and builds its key: more than the counting itself,
    on the poll path a fifth of a request's time. The labels are few (route classes,
    methods and status codes), so each child is looked up once."""
    shown_method = method if method in _METHODS else "other"
    return _Series(
        REQUESTS.labels(kind, shown_method, str(status)),
        REQUEST_SECONDS.labels(kind),
        None if action is None else PUBLISH_SECONDS.labels(action, str(status)),
    )


def observe_request(method: str, path: str, status: int, seconds: float) -> None:
    """Count one answered request."""
    series = _series(route_class(path), method, status, publish_action(method, path))
    series.requests.inc()
    series.seconds.observe(seconds)
    WORKER_REQUESTS.inc()
    if series.publish_seconds is not None:
        series.publish_seconds.observe(seconds)


class _PollAnswers:
    """The poll path's answers since they were last added to the series above.

    Adding to a prometheus-client series takes a lock per value, four a request: on the
    poll path a tenth of its throughput, measured. So its answers are counted here in
    plain numbers, and added in one go at most a second later, and before each scrape
    of this process. Only the event loop's thread touches them."""

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.by_bucket = [0] * len(Histogram.DEFAULT_BUCKETS)
        self.seconds = 0.0
        self.flush_due = False


_poll_answers = _PollAnswers()


def observe_poll(status: int, seconds: float) -> None:
    """Count one metadata GET the poll path answered (ADR 0014)."""
    answers = _poll_answers
    answers.by_status[status] = answers.by_status.get(status, 0) + 1
    # The first bucket whose upper bound is at least `seconds`, as Histogram.observe.
    answers.by_bucket[bisect.bisect_left(Histogram.DEFAULT_BUCKETS, seconds)] += 1
    answers.seconds += seconds
    if not answers.flush_due:
        answers.flush_due = True
        asyncio.get_running_loop().call_later(1.0, flush_poll_answers)


def flush_poll_answers() -> None:
    """Add the poll path's answers counted so far to the series; on the event loop."""
    answers = _poll_answers
    answers.flush_due = False
    if not answers.by_status:
        return
    for status, count in answers.by_status.items():
        _series("metadata", "GET", status, None).requests.inc(count)
        WORKER_REQUESTS.inc(count)
    # prometheus-client observes one value at a time; its buckets and sum are added to
    # as observe() does (pinned version; test_operations checks the exposition).
    histogram = REQUEST_SECONDS.labels("metadata")
    histogram._sum.inc(answers.seconds)
    for bucket, count in zip(histogram._buckets, answers.by_bucket, strict=True):
        if count:
            bucket.inc(count)
    answers.by_status.clear()
    answers.by_bucket = [0] * len(answers.by_bucket)
    answers.seconds = 0.0


def check_database(db: Database) -> None:
    """Raise unless the database answers a query."""
    with db.read() as conn:
        conn.execute(text("SELECT 1"))


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape.

    The cost is bounded by the number of channels and waves, not by history: the
    newest file of each role is one index probe (metadata_files' primary key leads
    with factory, channel, view, role, version) per channel and per view a wave made.
    Stale devices take one pass over the devices' rows, and a probe per view and
    timestamp version the devices reported.
    """

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "tufa_database_up", "1 if the scrape could read the database, 0 if it could not."
        )
        try:
            with self.db.read() as conn:
                expiry = _expiry_family(conn, self.clock.now())
                wave_devices = _wave_family(conn)
                stale = _stale_family(conn)
                rollouts = _rollout_family(conn)
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield expiry
        yield wave_devices
        yield stale
        yield rollouts


def _expiry_family(conn: Connection, now: datetime) -> GaugeMetricFamily:
    """Seconds until the soonest expiry among the newest files of each channel's views."""
    channel = literal(Channel.PROD, ChannelName)
    views = union(
        select(channels.c.factory_id, channels.c.channel, literal("").label("view")),
        select(waves.c.factory_id, channel, literal(wave_view("")) + waves.c.name),
        select(waves.c.factory_id, channel, literal(tag_view("")) + waves.c.tag),
    ).subquery("views")

    def newest_expiry(role: str) -> object:
        newest = metadata_files.alias(f"newest_{role}")
        view = literal("") if role == ROOT else views.c.view
        return (
            select(newest.c.expires)
            .where(
                newest.c.factory_id == views.c.factory_id,
                newest.c.channel == views.c.channel,
                newest.c.view == view,
                newest.c.role == role,
            )
            .order_by(newest.c.version.desc())
            .limit(1)
            .scalar_subquery()
            .label(role)
        )

    query = select(
        factories.c.name, views.c.channel, *(newest_expiry(r) for r in TOP_LEVEL_ROLES)
    ).join_from(views, factories, factories.c.id == views.c.factory_id)
    soonest: dict[tuple[str, str, str], datetime] = {}
    for row in conn.execute(query):
        for role in TOP_LEVEL_ROLES:
            expires = row._mapping[role]
            key = (row.name, str(row.channel), role)
            if expires is not None and (key not in soonest or expires < soonest[key]):
                soonest[key] = expires
    family = GaugeMetricFamily(
        "tufa_metadata_expires_in_seconds",
        "Seconds until a role's metadata of a factory's channel expires (the soonest of "
        "the channel's views); negative once expired.",
        labels=["factory", "channel", "role"],
    )
    for (factory, channel_name, role), expires in sorted(soonest.items()):
        family.add_metric([factory, channel_name, role], (expires - now).total_seconds())
    return family


def _wave_family(conn: Connection) -> GaugeMetricFamily:
    """How many devices each active wave serves, and how many reported it installed."""
    served = (
        select(func.count())
        .select_from(devices)
        .where(
            devices.c.factory_id == waves.c.factory_id,
            devices.c.view == literal(wave_view("")) + waves.c.name,
            devices.c.revoked_at.is_(None),
        )
    )
    installed = served.where(devices.c.installed_version == waves.c.version)
    query = (
        select(
            factories.c.name.label("factory"),
            waves.c.name.label("wave"),
            served.scalar_subquery().label("served"),
            installed.scalar_subquery().label("installed"),
        )
        .join_from(waves, factories, factories.c.id == waves.c.factory_id)
        .where(waves.c.status == ACTIVE)
    )
    family = GaugeMetricFamily(
        "tufa_wave_devices",
        "Devices an active wave serves (state=served), and those of them that reported "
        "its version installed (state=installed).",
        labels=["factory", "wave", "state"],
    )
    for row in conn.execute(query):
        family.add_metric([row.factory, row.wave, "served"], row.served)
        family.add_metric([row.factory, row.wave, "installed"], row.installed)
    return family


def _stale_family(conn: Connection) -> GaugeMetricFamily:
    """How many devices of each factory are stale (staleness.py, ADR 0018)."""
    family = GaugeMetricFamily(
        "tufa_stale_devices",
        "Devices whose last report shows metadata the server superseded longer ago than "
        "their poll interval allows, or expired (a proxy or fake server feeding it old files).",
        labels=["factory"],
    )
    for factory_id, name in conn.execute(select(factories.c.id, factories.c.name)):
        family.add_metric([name], len(stale_device_ids(conn, factory_id)))
    return family


def _rollout_family(conn: Connection) -> GaugeMetricFamily:
    """The stage each staged rollout of an active wave is at, by state: an alert on
    state="halted" is one on every halt."""
    query = (
        select(factories.c.name, wave_plans.c.wave, wave_plans.c.state, wave_plans.c.stage)
        .join_from(wave_plans, factories, factories.c.id == wave_plans.c.factory_id)
        .where(wave_plans.c.state.in_([*RUNNING, HALTED]))
    )
    family = GaugeMetricFamily(
        "tufa_wave_rollout_stage",
        "The stage (1-based) a running or halted staged rollout is at, by its state.",
        labels=["factory", "wave", "state"],
    )
    for row in conn.execute(query):
        family.add_metric([row.name, row.wave, row.state], row.stage + 1)
    return family


def counted_exposition() -> bytes:
    """The first part of a scrape's text: this process's (or every worker's) counters."""
    if MULTIPROCESS:
        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)  # type: ignore[no-untyped-call]
    else:
        counted = _REGISTRY
    return generate_latest(counted)


def database_exposition(db: Database, clock: Clock) -> bytes:
    """The rest of a scrape's text: the gauges read from the database."""
    from_db = CollectorRegistry()
    from_db.register(DatabaseCollector(db, clock))
    return generate_latest(from_db)
