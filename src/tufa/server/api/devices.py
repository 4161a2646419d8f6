"""`/api/v1/factories/{factory}/devices`: registration (register scope), inventory,
revocation and deletion (admin); `/device-credential`: a device rotating its own
credential; `/device-reports`: what a device says it runs and what happened (device
credentials)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn, TypedDict

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.core.device_events import EventKind
from tufa.core.metadata import Channel
from tufa.server import credentials, devices, staleness
from tufa.server.api import report_fields
from tufa.server.api.common import caller, factory_caller, ok, reading, resource, threaded, writing
from tufa.server.api.fields import field, json_object, text_field
from tufa.server.auth import bearer_secret, forbidden, require_factory, unauthorized
from tufa.server.devices import NewDevice
from tufa.server.errors import bad_request
from tufa.server.principals import Principal, Scope, authenticate
from tufa.server.state import ServerState

MAX_LABEL = 128
SHOWN_EVENTS = 20


class DeviceJson(TypedDict):
    """A device as every device endpoint shows it."""

    id: str
    name: str
    hardware_id: str
    tag: str
    channel: Channel
    created_at: str
    credential_since: str | None  # always set, but the column is nullable (db.py)
    credential_rotation_pending: bool
    revoked_at: str | None


class IssuedDeviceJson(DeviceJson):
    """Registration and rotation: the only answers that carry the secret itself."""

    credential: str


class ListedDeviceJson(DeviceJson):
    installed_version: str | None
    last_report_at: str | None
    # What its last report said it verified (null if it did not say), the newest
    # timestamp of the view it is served, and whether it is stale (ADR 0018).
    verified_timestamp_version: int | None
    verified_timestamp_expires: str | None
    poll_interval: int | None
    served_timestamp_version: int | None
    stale: bool


class EventJson(TypedDict):
    id: str
    at: str
    received_at: str
    kind: EventKind
    version: str | None
    target: str | None
    detail: str


class EarlierDeviceJson(TypedDict):
    id: str
    deleted_at: str


class DeviceDetailJson(ListedDeviceJson):
    installed_target: str | None
    installed_sha256: str | None
    events: list[EventJson]
    earlier_devices: list[EarlierDeviceJson]


class DeletedDeviceJson(TypedDict):
    deleted: DeviceJson
    events_deleted: int
    groups_left: list[str]


class AcceptedReportJson(TypedDict):
    # How many of the report's events were new (an event sent again counts once).
    accepted: int


def _device_json(row: Any) -> DeviceJson:
    return {
        "id": row.id,
        "name": row.name,
        "hardware_id": row.hardware_id,
        "tag": row.tag,
        "channel": row.channel,
        "created_at": iso(row.created_at),
        "credential_since": iso(row.credential_since),
        "credential_rotation_pending": row.pending_secret_sha256 is not None,
        "revoked_at": iso(row.revoked_at),
    }


def _event_json(row: Any) -> EventJson:
    return {
        "id": row.id,
        "at": iso(row.at),
        "received_at": iso(row.received_at),
        "kind": row.kind,
        "version": row.version,
        "target": row.target,
        "detail": row.detail,
    }


async def register(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    caller_token = require_factory(
        principal, request.path_params["factory"], {Scope.REGISTER, Scope.ADMIN}
    )
    data = await json_object(request)
    channel = field(data, "channel", str)
    if channel not in set(Channel):
        raise bad_request("field 'channel' must be 'ci' or 'prod'")
    new: NewDevice = {
        "name": text_field(data, "name", MAX_LABEL),
        "hardware_id": text_field(data, "hardware_id", MAX_LABEL),
        "tag": text_field(data, "tag", MAX_LABEL),
        "channel": Channel(channel),
    }
    factory_id = caller_token.factory_id
    assert factory_id is not None

    def insert_device(conn: Connection) -> IssuedDeviceJson:
        row, secret = credentials.register(conn, factory_id, new, state.settings.clock.now())
        return {**_device_json(row), "credential": secret}

    return ok(await writing(state, insert_device), status=201)


def _listed_json(row: Any, fresh: staleness.Freshness) -> ListedDeviceJson:
    return {
        **_device_json(row),
        "installed_version": row.installed_version,
        "last_report_at": iso(row.last_report_at),
        "verified_timestamp_version": row.verified_timestamp_version,
        "verified_timestamp_expires": iso(row.verified_timestamp_expires),
        "poll_interval": row.poll_interval,
        "served_timestamp_version": fresh.served_timestamp_version,
        "stale": fresh.stale,
    }


async def list_all(request: Request) -> JSONResponse:
    """The factory's devices; with `?stale=true` only the stale ones (`false`: the others)."""
    state, factory_id = await factory_caller(request, {Scope.ADMIN, Scope.READ})
    wanted = request.query_params.get("stale")
    if wanted not in (None, "true", "false"):
        raise bad_request("query parameter 'stale' must be true or false (or left out for all)")

    def rows(conn: Connection) -> list[ListedDeviceJson]:
        found = devices.list_devices(conn, factory_id)
        fresh = staleness.freshness(conn, factory_id)
        listed = [_listed_json(r, fresh[r.id]) for r in found]
        return [d for d in listed if wanted is None or d["stale"] == (wanted == "true")]

    return ok(await reading(state, rows))


async def show(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, {Scope.ADMIN, Scope.READ})
    ident = request.path_params["device"]

    def row(conn: Connection) -> DeviceDetailJson:
        found = devices.find_device(conn, factory_id, ident)
        earlier = credentials.earlier_devices(conn, factory_id, found.name)
        events = devices.recent_events(conn, found.id, SHOWN_EVENTS)
        fresh = staleness.freshness(conn, factory_id, [found.id])[found.id]
        return {
            **_listed_json(found, fresh),
            "installed_target": found.installed_target,
            "installed_sha256": found.installed_sha256,
            "events": [_event_json(e) for e in events],
            "earlier_devices": [
                {"id": e["id"], "deleted_at": iso(e["deleted_at"])} for e in earlier
            ],
        }

    return ok(await reading(state, row))


async def revoke(request: Request) -> JSONResponse:
    """Refuse the device's credentials from now on, on every replica (no cache)."""
    state, factory_id = await factory_caller(request, {Scope.ADMIN})
    ident = request.path_params["device"]

    now = state.settings.clock.now()
    row = await writing(state, lambda conn: credentials.revoke(conn, factory_id, ident, now))
    return ok(_device_json(row))


async def remove(request: Request) -> JSONResponse:
    """Delete the device for good: credentials, events and group memberships."""
    state, factory_id = await factory_caller(request, {Scope.ADMIN})
    ident = request.path_params["device"]

    now = state.settings.clock.now()
    row, events, groups = await writing(
        state, lambda conn: credentials.delete_device(conn, factory_id, ident, now)
    )
    deleted: DeletedDeviceJson = {
        "deleted": _device_json(row),
        "events_deleted": events,
        "groups_left": groups,
    }
    return ok(deleted)


async def credential_show(request: Request) -> JSONResponse:
    """The calling device and the state of its credential. After a rotation, the first
    request with the new credential (this one, say) makes it the only valid one."""
    state, device, secret = await _device_caller(request, "read its credential")

    def row(conn: Connection) -> DeviceJson:
        found = devices.device_row(conn, device.device_id)
        if found is None:
            _refuse_dead(conn, secret, state.settings.clock.now())
        return _device_json(found)

    return ok(await reading(state, row))


async def credential_rotate(request: Request) -> JSONResponse:
    """Issue the calling device a new credential. The one it called with keeps working
    until the new one is used once; from then on only the new one does (ADR 0011)."""
    state, device, secret = await _device_caller(request, "rotate a credential")

    def apply() -> IssuedDeviceJson:
        now = state.settings.clock.now()
        row, new = credentials.rotate(state.db, device, secret, now)
        return {**_device_json(row), "credential": new}

    return ok(await threaded(apply), status=201)


def _refuse_dead(conn: Connection, secret: str, now: datetime) -> NoReturn:
    """Refuse a device revoked or deleted since its credential was checked, saying which."""
    authenticate(conn, secret, now)
    raise unauthorized("this device credential is no longer valid")


# -- device reports ---------------------------------------------------------------------


async def _device_caller(request: Request, action: str) -> tuple[ServerState, Principal, str]:
    """The server state, and the caller and its credential if the caller is a device of
    the path's factory: reports and credentials are the caller's own, so no token,
    whatever its scopes, may send or rotate them."""
    state, principal = await caller(request)
    factory = request.path_params["factory"]
    if principal is None:
        raise unauthorized(f"this request needs a device credential of factory {factory!r}")
    if principal.kind != "device":
        raise forbidden(f"only a device credential may {action}")
    if principal.factory_name != factory:
        raise forbidden(f"this credential is not valid for factory {factory!r}")
    secret = bearer_secret(request.headers)
    assert secret is not None  # the device was authenticated by it
    return state, principal, secret


async def report(request: Request) -> JSONResponse:
    """A device says what it runs now and what happened since its last report."""
    state, device, secret = await _device_caller(request, "send device reports")
    device_id, factory_id = device.device_id, device.factory_id
    data = await json_object(request)
    installed = report_fields.installed(data)
    verified = report_fields.verified(data)
    events = report_fields.events(data)

    def store(conn: Connection) -> int:
        now = state.settings.clock.now()
        assert factory_id is not None
        assert device_id is not None
        accepted = devices.record_report(
            conn, factory_id, device_id, installed, verified, events, now
        )
        if accepted is None:
            _refuse_dead(conn, secret, now)
        return accepted

    answer: AcceptedReportJson = {"accepted": await writing(state, store)}
    return ok(answer)


routes = [
    *resource(api_paths.DEVICES, POST=register, GET=list_all),
    *resource(api_paths.DEVICE, GET=show, DELETE=remove),
    *resource(api_paths.DEVICE_REVOKE, POST=revoke),
    *resource(api_paths.DEVICE_CREDENTIAL, GET=credential_show, POST=credential_rotate),
    *resource(api_paths.DEVICE_REPORTS, POST=report),
]
