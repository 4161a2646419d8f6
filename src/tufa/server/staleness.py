"""Devices fed stale metadata, as their own reports show them (ADR 0018).

Each report of the agent carries the version and expiry of the timestamp the device
last verified, and its poll interval. A device is stale when, at its last report:

- the timestamp it verified had expired (by the server's clock), or
- the view it is served had published a timestamp of a higher version longer ago than
  its allowance: 2 x its poll interval + 60 s (a device that did not say how often it
  polls is allowed as much as the agent's default interval of 300 s gives).

"Published" is the `created_at` of the first timestamp row of the device's view with a
higher version than the one it verified: every version of a view stays in
`metadata_files`, and all views of a channel draw versions from one counter, so the
version a device verified under another view (before a wave moved it) compares too. A
view that has published nothing yet is served the channel's default view, and so is
judged by that one. A device that never sent the fields (an older agent, or before its
first refresh) is not stale: unknown. Nor is a revoked one: it is served nothing.

A device polling normally reports within one poll of verifying a new timestamp; one
behind a proxy that replays old metadata (or a fake server with the genuine keys'
old files) keeps reporting the version it verified, and becomes stale once its
allowance has passed since the server superseded that version.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypedDict

from sqlalchemy import Connection, select

from tufa.core.metadata import TIMESTAMP, Channel
from tufa.server.db import devices, metadata_files

# The agent's default --interval, for a device that reports no poll interval.
DEFAULT_POLL_INTERVAL = 300
GRACE = timedelta(seconds=60)
# The longest poll interval a report may name (a device checking once a year at most).
MAX_POLL_INTERVAL = 366 * 24 * 3600
DEFAULT_VIEW = ""
# Device ids per statement: far below any database's limit of bound parameters.
_CHUNK = 500


class Verified(TypedDict):
    """What a device's report says it verified, as the `devices` row stores it."""

    verified_timestamp_version: int | None
    verified_timestamp_expires: datetime | None
    poll_interval: int | None


class Freshness(NamedTuple):
    """A device's staleness, and the timestamp of the view it is served."""

    stale: bool
    served_timestamp_version: int | None  # None: the view has no timestamp yet
    superseded_at: datetime | None  # when its verified version was superseded, if it was


def allowance(poll_interval: int | None) -> timedelta:
    """How long after a new timestamp a device may still report the one before."""
    seconds = DEFAULT_POLL_INTERVAL if poll_interval is None else poll_interval
    return 2 * timedelta(seconds=seconds) + GRACE


class _Timestamps:
    """The timestamp rows of one factory's views, each looked up once (index probes:
    the primary key of metadata_files leads with factory, channel, view, role, version)."""

    def __init__(self, conn: Connection, factory_id: int) -> None:
        self.conn = conn
        self.factory_id = factory_id
        self._newest: dict[tuple[Channel, str], Any] = {}
        self._above: dict[tuple[Channel, str, int], Any] = {}

    def _query(self, channel: Channel, view: str) -> Any:
        return select(metadata_files.c.version, metadata_files.c.created_at).where(
            metadata_files.c.factory_id == self.factory_id,
            metadata_files.c.channel == channel,
            metadata_files.c.view == view,
            metadata_files.c.role == TIMESTAMP,
        )

    def newest(self, channel: Channel, view: str) -> Any:
        """The newest timestamp row of the view; None if it has published none."""
        key = (channel, view)
        if key not in self._newest:
            query = self._query(channel, view).order_by(metadata_files.c.version.desc())
            self._newest[key] = self.conn.execute(query.limit(1)).first()
        return self._newest[key]

    def served_view(self, channel: Channel, view: str) -> str:
        """The view whose files a device of `view` is served."""
        return view if self.newest(channel, view) is not None else DEFAULT_VIEW

    def superseded_at(self, channel: Channel, view: str, version: int) -> datetime | None:
        """When the view published its first timestamp of a higher version than
        `version`; None if it has none (the device verified the newest)."""
        key = (channel, view, version)
        if key not in self._above:
            query = self._query(channel, view).where(metadata_files.c.version > version)
            found = self.conn.execute(
                query.order_by(metadata_files.c.version.asc()).limit(1)
            ).first()
            self._above[key] = None if found is None else found.created_at
        found_at: datetime | None = self._above[key]
        return found_at


def _device_rows(
    conn: Connection, factory_id: int, device_ids: Collection[str] | None
) -> Iterator[Any]:
    query = select(
        devices.c.id,
        devices.c.channel,
        devices.c.view,
        devices.c.revoked_at,
        devices.c.last_report_at,
        devices.c.verified_timestamp_version,
        devices.c.verified_timestamp_expires,
        devices.c.poll_interval,
        devices.c.view_since,
    ).where(devices.c.factory_id == factory_id)
    if device_ids is None:
        yield from conn.execute(query)
        return
    wanted = sorted(set(device_ids))
    for start in range(0, len(wanted), _CHUNK):
        yield from conn.execute(query.where(devices.c.id.in_(wanted[start : start + _CHUNK])))


def freshness(
    conn: Connection, factory_id: int, device_ids: Collection[str] | None = None
) -> dict[str, Freshness]:
    """Each device's freshness by id: those of `device_ids` (ids of the factory's
    devices; others are left out), or with None every device of the factory."""
    timestamps = _Timestamps(conn, factory_id)
    found: dict[str, Freshness] = {}
    for row in _device_rows(conn, factory_id, device_ids):
        view = timestamps.served_view(row.channel, row.view)
        newest = timestamps.newest(row.channel, view)
        served = None if newest is None else newest.version
        version = row.verified_timestamp_version
        if version is None or row.last_report_at is None or row.revoked_at is not None:
            found[row.id] = Freshness(False, served, None)
            continue
        at = row.last_report_at
        superseded = timestamps.superseded_at(row.channel, view, version)
        expired = row.verified_timestamp_expires is not None and (
            row.verified_timestamp_expires <= at
        )
        # The device can have seen its view's files only since it was moved to it.
        since = (
            superseded
            if row.view_since is None or superseded is None
            else max(superseded, row.view_since)
        )
        lagging = since is not None and at - since > allowance(row.poll_interval)
        found[row.id] = Freshness(expired or lagging, served, superseded)
    return found


def stale_device_ids(
    conn: Connection, factory_id: int, device_ids: Collection[str] | None = None
) -> set[str]:
    """The ids of the stale devices among `device_ids` (None: all of the factory's)."""
    found = freshness(conn, factory_id, device_ids)
    return {ident for ident, fresh in found.items() if fresh.stale}
