"""The fleet as the database holds it: devices, their reports, and which view of the
production channel each device is served (device groups: device_groups.py).

Every device query of the server lives here; the API (api/devices.py, api/waves.py),
the waves (waves.py) and staged rollouts (rollouts.py) call these, and the credential
life cycle (credentials.py) builds on `find_device` and `device_row`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import Connection, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tufa.core.device_events import EventKind
from tufa.core.metadata import Channel
from tufa.server.db import device_events, device_group_members, devices
from tufa.server.device_groups import find_group
from tufa.server.exceptions import Conflict, NotFound
from tufa.server.staleness import Verified
from tufa.server.views import ci_view, tag_view
from tufa.server.webhooks import emit

# Device report events that say a version did not stay installed.
FAILED_KINDS: tuple[EventKind, ...] = ("install-failed", "rolled-back")


class NewDevice(TypedDict):
    """A device as it registers."""

    name: str
    hardware_id: str
    tag: str
    channel: Channel


class Installed(TypedDict):
    """What a device reports it runs (all None before its first install)."""

    installed_version: str | None
    installed_target: str | None
    installed_sha256: str | None


class DeviceEvent(TypedDict):
    id: str
    at: datetime
    kind: EventKind
    version: str | None
    target: str | None
    detail: str


class ReleaseProgress(TypedDict):
    """How far a release of one tag reached the production devices of that tag."""

    devices_served: int
    devices_of_tag: int
    devices_installed: int
    devices_failed: int


# -- devices --------------------------------------------------------------------------


def find_device(conn: Connection, factory_id: int, ident: str, *, lock: bool = False) -> Any:
    """The device of the factory with id `ident`, or else named `ident`; NotFound if none.
    An id wins over a name, so a device named like another's id cannot stand in for it.
    `lock` holds its row until the transaction ends (PostgreSQL; SQLite writers are
    serialised anyway)."""
    missing = NotFound(f"no device {ident!r} in this factory; `tufa devices list` shows them")
    if not ident.isprintable():  # no name has a NUL or another control (PostgreSQL: no NUL)
        raise missing
    for column in (devices.c.id, devices.c.name):
        query = select(devices).where(devices.c.factory_id == factory_id, column == ident)
        found = conn.execute(query.with_for_update() if lock else query).first()
        if found is not None:
            return found
    raise missing


def device_row(conn: Connection, device_id: str | None, *, lock: bool = False) -> Any:
    """The device with this id, or None once it is deleted."""
    query = select(devices).where(devices.c.id == device_id)
    return conn.execute(query.with_for_update() if lock else query).first()


def add_device(
    conn: Connection, factory_id: int, device: NewDevice, secret_sha256: str, now: datetime
) -> Any:
    """Store a new device under a new id; its name is unique in the factory."""
    device_id = str(uuid.uuid4())
    # A production device is served its tag's releases until a wave takes it; a CI device
    # the CI targets of its hardware id and tag.
    if device["channel"] == Channel.PROD:
        view = tag_view(device["tag"])
    else:
        view = ci_view(device["hardware_id"], device["tag"])
    row = {"id": device_id, "factory_id": factory_id, "view": view, **device}
    try:
        conn.execute(
            insert(devices).values(
                **row, secret_sha256=secret_sha256, created_at=now, credential_since=now
            )
        )
    except IntegrityError as e:
        raise Conflict(f"a device named {device['name']!r} is already registered") from e
    return device_row(conn, device_id)


def list_devices(conn: Connection, factory_id: int) -> Sequence[Any]:
    return conn.execute(
        select(devices).where(devices.c.factory_id == factory_id).order_by(devices.c.name)
    ).all()


def recent_events(conn: Connection, device_id: str, limit: int) -> Sequence[Any]:
    """The device's newest events by its own clock, which counts whole seconds; within a
    second, the later received first, then the higher id (the agent's ids sort by the
    nanosecond they were made at)."""
    return conn.execute(
        select(device_events)
        .where(device_events.c.device_id == device_id)
        .order_by(
            device_events.c.at.desc(),
            device_events.c.received_at.desc(),
            device_events.c.id.desc(),
        )
        .limit(limit)
    ).all()


def record_report(
    conn: Connection,
    factory_id: int,
    device_id: str,
    installed: Installed,
    verified: Verified,
    events: list[DeviceEvent],
    now: datetime,
) -> int | None:
    """Store what the device runs and last verified, and the events not stored yet; how
    many were new, or None when the device is revoked or deleted (nothing is stored)."""
    # The update comes first: on PostgreSQL it locks the device's row, so two reports of
    # one device (a resend racing the original) take turns, and the second sees the
    # events the first stored.
    updated = conn.execute(
        update(devices)
        .where(devices.c.id == device_id, devices.c.revoked_at.is_(None))
        .values(**installed, **verified, last_report_at=now)
    )
    if updated.rowcount == 0:
        return None
    if not events:
        return 0
    known = set(
        conn.execute(
            select(device_events.c.id).where(
                device_events.c.device_id == device_id,
                device_events.c.id.in_([e["id"] for e in events]),
            )
        ).scalars()
    )
    new = [e for e in events if e["id"] not in known]
    if new:
        conn.execute(
            insert(device_events),
            [
                {**e, "device_id": device_id, "factory_id": factory_id, "received_at": now}
                for e in new
            ],
        )
        _tell_failures(conn, factory_id, device_id, new)
    return len(new)


def _tell_failures(
    conn: Connection, factory_id: int, device_id: str, events: list[DeviceEvent]
) -> None:
    """`device.install-failed` to the factory's webhooks, once per event stored."""
    failed = [e for e in events if e["kind"] in FAILED_KINDS]
    if not failed:
        return
    name = conn.execute(select(devices.c.name).where(devices.c.id == device_id)).scalar()
    for e in failed:
        data = {"device": device_id, "name": name, "version": e["version"], "kind": e["kind"]}
        emit(conn, factory_id, "device.install-failed", {**data, "detail": e["detail"]})


# -- views of the production channel --------------------------------------------------


def production_devices(
    conn: Connection,
    factory_id: int,
    tag: str,
    *,
    not_in_view: str,
    group: str | None,
    idents: list[str] | None,
) -> Sequence[Any]:
    """Ids and names of the production devices of `tag` not served `not_in_view`, by
    name, of `group` and among `idents` (ids or names) if given. A revoked device is
    served nothing, so it is never among them."""
    query = select(devices.c.id, devices.c.name).where(
        devices.c.factory_id == factory_id,
        devices.c.channel == Channel.PROD,
        devices.c.tag == tag,
        devices.c.view != not_in_view,
        devices.c.revoked_at.is_(None),
    )
    if group is not None:
        find_group(conn, factory_id, group)
        members = select(device_group_members.c.device_id).where(
            device_group_members.c.factory_id == factory_id,
            device_group_members.c.group_name == group,
        )
        query = query.where(devices.c.id.in_(members))
    if idents is not None:
        query = query.where(devices.c.id.in_(idents) | devices.c.name.in_(idents))
    return conn.execute(query.order_by(devices.c.name)).all()


def served(conn: Connection, factory_id: int, view: str) -> set[str]:
    """Ids and names of the devices served `view`."""
    rows = conn.execute(
        select(devices.c.id, devices.c.name).where(
            devices.c.factory_id == factory_id, devices.c.view == view
        )
    ).all()
    return {r.id for r in rows} | {r.name for r in rows}


def served_ids(conn: Connection, factory_id: int, view: str) -> set[str]:
    """Ids of the devices in the fleet (not revoked) served `view`."""
    query = select(devices.c.id).where(
        devices.c.factory_id == factory_id, devices.c.view == view, devices.c.revoked_at.is_(None)
    )
    return set(conn.execute(query).scalars())


def production_count(conn: Connection, factory_id: int, tag: str) -> int:
    """How many production devices of `tag` are in the fleet (not revoked)."""
    query = select(func.count()).where(
        devices.c.factory_id == factory_id,
        devices.c.channel == Channel.PROD,
        devices.c.tag == tag,
        devices.c.revoked_at.is_(None),
    )
    return int(conn.execute(query).scalar_one())


def serve(conn: Connection, device_ids: list[str], view: str, now: datetime) -> list[str]:
    """Serve `view` to these devices; the ids of those still there (one deleted meanwhile
    is not, and must not be recorded as served)."""
    if not device_ids:
        return []
    changed = conn.execute(
        update(devices)
        .where(devices.c.id.in_(device_ids))
        .values(view=view, view_since=now)
        .returning(devices.c.id)
    )
    return list(changed.scalars())


def serve_tag(conn: Connection, factory_id: int, tag: str, view: str, now: datetime) -> None:
    """Serve `view` to every production device of `tag`."""
    conn.execute(
        update(devices)
        .where(
            devices.c.factory_id == factory_id,
            devices.c.channel == Channel.PROD,
            devices.c.tag == tag,
            devices.c.view != view,
        )
        .values(view=view, view_since=now)
    )


def release_progress(
    conn: Connection, factory_id: int, tag: str, version: str, view: str | None
) -> ReleaseProgress:
    """How many production devices of `tag` are served the release of `version` (those
    served `view`, or with None every one of the tag), and how many of those reported it
    installed or failed."""
    # Revoked devices are out of the fleet (served nothing), deleted ones are gone with
    # their events: neither counts.
    fleet = (devices.c.factory_id == factory_id) & devices.c.revoked_at.is_(None)
    of_tag = (devices.c.channel == Channel.PROD) & (devices.c.tag == tag)
    tag_devices = select(func.count()).select_from(devices).where(fleet, of_tag)
    reached = of_tag if view is None else devices.c.view == view
    served_query = select(func.count()).select_from(devices).where(fleet, reached)
    installed = served_query.where(devices.c.installed_version == version)
    # A failure counts until the device reports the version installed after all (a retry
    # that worked); a device that never reported the version installed counts too
    # (installed_version is NULL, hence IS DISTINCT FROM rather than !=).
    failed = served_query.where(
        devices.c.installed_version.is_distinct_from(version),
        exists().where(
            device_events.c.factory_id == factory_id,
            device_events.c.version == version,
            device_events.c.device_id == devices.c.id,
            device_events.c.kind.in_(FAILED_KINDS),
        ),
    )
    return {
        "devices_served": conn.execute(served_query).scalar_one(),
        "devices_of_tag": conn.execute(tag_devices).scalar_one(),
        "devices_installed": conn.execute(installed).scalar_one(),
        "devices_failed": conn.execute(failed).scalar_one(),
    }
