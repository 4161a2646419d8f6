"""Device credentials over their life (ADR 0011): issued at registration, rotated by the
device itself, revoked or deleted by a factory admin.

A rotation has two phases, so that a power cut on the device between the server's
answer and the device's write loses no working credential: the new credential is
*pending* and the old one stays valid until the new one is used for the first time;
that first use adopts it and retires the old one in one transaction. A credential that
no longer works is kept as a digest in `retired_credentials`, so whoever presents it
is told why (replaced, or its device deleted) rather than "unknown token".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypedDict

from sqlalchemy import Connection, delete, func, insert, select, update

from tufa.server.db import (
    Database,
    device_events,
    device_group_members,
    devices,
    retired_credentials,
)
from tufa.server.devices import NewDevice, add_device, device_row, find_device
from tufa.server.principals import Principal, authenticate
from tufa.server.rollout_plans import wave_devices
from tufa.server.secrets import new_secret, secret_digest
from tufa.server.webhooks import emit

DEVICE_SECRET_PREFIX = "tufad"  # noqa: S105 (a label, not a secret)
# Why a credential was retired (revoked devices keep their row: `devices.revoked_at`);
# principals.py words its refusal by these.
RetireReason = Literal["replaced", "superseded", "deleted"]
REPLACED: RetireReason = "replaced"  # the device adopted the credential a rotation issued
SUPERSEDED: RetireReason = "superseded"  # issued by a rotation, never used, then replaced
DELETED: RetireReason = "deleted"  # its device was deleted


class EarlierDevice(TypedDict):
    id: str
    deleted_at: datetime


def register(
    conn: Connection, factory_id: int, device: NewDevice, now: datetime
) -> tuple[Any, str]:
    """Register a device with its first credential. Returns the device row and the
    credential's secret, which only its digest is kept of. The factory's webhooks are
    told (`device.first-seen`) once the registration commits."""
    secret = new_secret(DEVICE_SECRET_PREFIX)
    row = add_device(conn, factory_id, device, secret_digest(secret), now)
    seen = {"device": row.id, "name": row.name, "hardware_id": row.hardware_id, "tag": row.tag}
    emit(conn, factory_id, "device.first-seen", {**seen, "channel": str(row.channel)})
    return row, secret


def _retire(
    conn: Connection, digest: str, device: Any, reason: RetireReason, now: datetime
) -> None:
    conn.execute(
        insert(retired_credentials).values(
            secret_sha256=digest,
            factory_id=device.factory_id,
            device_id=device.id,
            device_name=device.name,
            reason=reason,
            retired_at=now,
        )
    )


def _adopt_if_pending(conn: Connection, device: Any, digest: str, now: datetime) -> None:
    """The first use of a rotated credential: it becomes the device's only credential."""
    if device is None or device.revoked_at is not None or device.pending_secret_sha256 != digest:
        return
    _retire(conn, device.secret_sha256, device, REPLACED, now)
    conn.execute(
        update(devices)
        .where(devices.c.id == device.id)
        .values(secret_sha256=digest, pending_secret_sha256=None, credential_since=now)
    )


def settle(db: Database, principal: Principal, secret: str, now: datetime) -> Principal:
    """The caller as it may act now. A device using the credential a rotation issued for
    the first time adopts it here, which retires the old one; whatever happened to the
    device meanwhile (a revocation, a later rotation, a deletion) decides the outcome."""
    if not principal.credential_pending:
        return principal
    with db.write() as conn:
        device = device_row(conn, principal.device_id, lock=True)
        _adopt_if_pending(conn, device, secret_digest(secret), now)
        return authenticate(conn, secret, now)


def rotate(db: Database, principal: Principal, secret: str, now: datetime) -> tuple[Any, str]:
    """Issue the calling device a new credential, pending until its first use; a pending
    one issued earlier and never used is retired. Returns the device row and the secret."""
    new = new_secret(DEVICE_SECRET_PREFIX)
    with db.write() as conn:
        device = device_row(conn, principal.device_id, lock=True)
        _adopt_if_pending(conn, device, secret_digest(secret), now)
        # Under the row lock: refuses a credential that died since the request began.
        authenticate(conn, secret, now)
        device = device_row(conn, principal.device_id, lock=True)
        if device.pending_secret_sha256 is not None:
            _retire(conn, device.pending_secret_sha256, device, SUPERSEDED, now)
        conn.execute(
            update(devices)
            .where(devices.c.id == device.id)
            .values(pending_secret_sha256=secret_digest(new))
        )
        return device_row(conn, device.id, lock=True), new


def revoke(conn: Connection, factory_id: int, ident: str, now: datetime) -> Any:
    """Refuse every credential of the device from now on; revoking twice changes nothing."""
    device = find_device(conn, factory_id, ident, lock=True)
    if device.revoked_at is None:
        conn.execute(update(devices).where(devices.c.id == device.id).values(revoked_at=now))
    return device_row(conn, device.id, lock=True)


def delete_device(
    conn: Connection, factory_id: int, ident: str, now: datetime
) -> tuple[Any, int, list[str]]:
    """Remove the device for good: its credentials die, its events and group memberships
    go. Returns the deleted row, the number of events and the groups it left."""
    device = find_device(conn, factory_id, ident, lock=True)
    for digest in (device.secret_sha256, device.pending_secret_sha256):
        if digest is not None:
            _retire(conn, digest, device, DELETED, now)
    groups = list(
        conn.execute(
            select(device_group_members.c.group_name)
            .where(device_group_members.c.device_id == device.id)
            .order_by(device_group_members.c.group_name)
        ).scalars()
    )
    events = conn.execute(
        select(func.count())
        .select_from(device_events)
        .where(device_events.c.device_id == device.id)
    ).scalar_one()
    conn.execute(delete(device_group_members).where(device_group_members.c.device_id == device.id))
    conn.execute(delete(device_events).where(device_events.c.device_id == device.id))
    conn.execute(delete(wave_devices).where(wave_devices.c.device_id == device.id))
    conn.execute(delete(devices).where(devices.c.id == device.id))
    return device, int(events), groups


def earlier_devices(conn: Connection, factory_id: int, name: str) -> list[EarlierDevice]:
    """Deleted devices that had this name: a re-registration is a new device, and says so."""
    rows = conn.execute(
        select(retired_credentials.c.device_id, func.min(retired_credentials.c.retired_at))
        .where(
            retired_credentials.c.factory_id == factory_id,
            retired_credentials.c.device_name == name,
            retired_credentials.c.reason == DELETED,
        )
        .group_by(retired_credentials.c.device_id)
        .order_by(func.min(retired_credentials.c.retired_at))
    ).all()
    return [{"id": device_id, "deleted_at": deleted_at} for device_id, deleted_at in rows]
