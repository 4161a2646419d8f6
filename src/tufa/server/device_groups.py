"""Device groups: named sets of a factory's production devices, which waves roll out
to (`tufa device-groups`, a staged rollout's first stage)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.exc import IntegrityError

from tufa.core.metadata import Channel
from tufa.server.db import device_group_members, device_groups, devices
from tufa.server.exceptions import Conflict, NotFound


def create_group(conn: Connection, factory_id: int, name: str, now: datetime) -> None:
    try:
        conn.execute(insert(device_groups).values(factory_id=factory_id, name=name, created_at=now))
    except IntegrityError as e:
        raise Conflict(f"a device group named {name!r} exists already") from e


def groups(conn: Connection, factory_id: int) -> Sequence[Any]:
    return conn.execute(
        select(device_groups)
        .where(device_groups.c.factory_id == factory_id)
        .order_by(device_groups.c.name)
    ).all()


def find_group(conn: Connection, factory_id: int, group: str, *, lock: bool = False) -> Any:
    """The group's row; NotFound if there is none. `lock` holds the row until the
    transaction ends (PostgreSQL), so that no member joins a group being deleted."""
    query = select(device_groups).where(
        device_groups.c.factory_id == factory_id, device_groups.c.name == group
    )
    known = conn.execute(query.with_for_update() if lock else query).first()
    if known is None:
        raise NotFound(f"no device group named {group!r}; `tufa device-groups list` shows them")
    return known


def group_members(conn: Connection, factory_id: int, group: str) -> list[str]:
    """The ids of the group's devices, in order."""
    return list(
        conn.execute(
            select(device_group_members.c.device_id)
            .where(
                device_group_members.c.factory_id == factory_id,
                device_group_members.c.group_name == group,
            )
            .order_by(device_group_members.c.device_id)
        ).scalars()
    )


def group_member_devices(conn: Connection, factory_id: int, group: str) -> Sequence[Any]:
    """The group's devices, by name."""
    return conn.execute(
        select(devices)
        .join(device_group_members, device_group_members.c.device_id == devices.c.id)
        .where(
            device_group_members.c.factory_id == factory_id,
            device_group_members.c.group_name == group,
        )
        .order_by(devices.c.name)
    ).all()


def _wanted_devices(conn: Connection, factory_id: int, wanted: list[str]) -> Sequence[Any]:
    """The devices named by `wanted` (ids or names); NotFound naming the unknown ones.
    Locked: a device deleted meanwhile must not gain a membership (PostgreSQL)."""
    found = conn.execute(
        select(devices.c.id, devices.c.name, devices.c.channel)
        .where(
            devices.c.factory_id == factory_id,
            devices.c.id.in_(wanted) | devices.c.name.in_(wanted),
        )
        .with_for_update()
    ).all()
    missing = set(wanted) - {d.id for d in found} - {d.name for d in found}
    if missing:
        raise NotFound(
            f"no such device(s): {', '.join(sorted(missing))}; `tufa devices list` shows them"
        )
    return found


def add_to_group(conn: Connection, factory_id: int, group: str, wanted: list[str]) -> list[str]:
    """Add the devices `wanted` (ids or names, all of them or none) to the group; returns
    its members. Waves roll out to production devices only, so a CI device in a group
    would make the group's count differ from what a rollout to it takes: refused."""
    find_group(conn, factory_id, group, lock=True)
    found = _wanted_devices(conn, factory_id, wanted)
    ci = sorted(f"{d.name!r} ({d.id})" for d in found if d.channel != Channel.PROD)
    if ci:
        raise Conflict(
            f"device(s) {', '.join(ci)} follow the CI channel: device groups are for "
            "rolling waves out to production devices, which a CI device never gets; "
            "nothing was added"
        )
    members = set(group_members(conn, factory_id, group))
    for device in found:
        if device.id not in members:
            conn.execute(
                insert(device_group_members).values(
                    factory_id=factory_id, group_name=group, device_id=device.id
                )
            )
    return group_members(conn, factory_id, group)


def remove_from_group(
    conn: Connection, factory_id: int, group: str, wanted: list[str]
) -> list[str]:
    """Take the devices `wanted` (ids or names, all of them members, or none is taken)
    out of the group; returns its members."""
    find_group(conn, factory_id, group, lock=True)
    found = _wanted_devices(conn, factory_id, wanted)
    members = set(group_members(conn, factory_id, group))
    outside = sorted(f"{d.name!r} ({d.id})" for d in found if d.id not in members)
    if outside:
        raise NotFound(
            f"device(s) {', '.join(outside)} are not in group {group!r}; nothing was removed"
        )
    conn.execute(
        delete(device_group_members).where(
            device_group_members.c.factory_id == factory_id,
            device_group_members.c.group_name == group,
            device_group_members.c.device_id.in_([d.id for d in found]),
        )
    )
    return group_members(conn, factory_id, group)


def delete_group(conn: Connection, factory_id: int, group: str) -> list[str]:
    """Delete the group (its devices stay, and keep what waves served them); returns
    the ids of the members it had."""
    find_group(conn, factory_id, group, lock=True)
    members = group_members(conn, factory_id, group)
    conn.execute(
        delete(device_group_members).where(
            device_group_members.c.factory_id == factory_id,
            device_group_members.c.group_name == group,
        )
    )
    conn.execute(
        delete(device_groups).where(
            device_groups.c.factory_id == factory_id, device_groups.c.name == group
        )
    )
    return members
