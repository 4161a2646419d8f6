"""`/api/v1/factories/{factory}/devices`: registration (register scope) and inventory."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tufa.core.metadata import Channel
from tufa.server.api.common import caller, field, iso, json_object, ok, text_field, threaded
from tufa.server.auth import Scope, require_factory
from tufa.server.db import devices
from tufa.server.errors import bad_request, conflict, not_found
from tufa.server.secrets import new_secret, secret_digest
from tufa.server.views import tag_view

DEVICE_SECRET_PREFIX = "tufad"  # noqa: S105 (a label, not a secret)
MAX_LABEL = 128


def _device_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "hardware_id": row.hardware_id,
        "tag": row.tag,
        "channel": row.channel,
        "created_at": iso(row.created_at),
    }


async def register(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    caller_token = require_factory(
        principal, request.path_params["factory"], {Scope.REGISTER, Scope.ADMIN}
    )
    data = await json_object(request)
    channel = field(data, "channel", str)
    if channel not in {c.value for c in Channel}:
        raise bad_request("field 'channel' must be 'ci' or 'prod'")
    values = {
        "name": text_field(data, "name", MAX_LABEL),
        "hardware_id": text_field(data, "hardware_id", MAX_LABEL),
        "tag": text_field(data, "tag", MAX_LABEL),
        "channel": channel,
    }
    # A production device is served its tag's releases until a wave takes it.
    values["view"] = tag_view(values["tag"]) if channel == Channel.PROD.value else ""
    secret = new_secret(DEVICE_SECRET_PREFIX)

    def insert_device() -> dict[str, Any]:
        device_id = str(uuid.uuid4())
        try:
            with state.db.write() as conn:
                conn.execute(
                    insert(devices).values(
                        id=device_id,
                        factory_id=caller_token.factory_id,
                        secret_sha256=secret_digest(secret),
                        created_at=state.settings.clock.now(),
                        **values,
                    )
                )
                row = conn.execute(select(devices).where(devices.c.id == device_id)).one()
        except IntegrityError as e:
            raise conflict(f"a device named {values['name']!r} is already registered") from e
        return {**_device_json(row), "credential": secret}

    return ok(await threaded(insert_device), status=201)


async def list_all(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    reader = require_factory(principal, request.path_params["factory"], {Scope.ADMIN, Scope.READ})

    def rows() -> list[dict[str, Any]]:
        with state.db.read() as conn:
            found = conn.execute(
                select(devices)
                .where(devices.c.factory_id == reader.factory_id)
                .order_by(devices.c.name)
            ).all()
        return [_device_json(r) for r in found]

    return ok(await threaded(rows))


async def show(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    reader = require_factory(principal, request.path_params["factory"], {Scope.ADMIN, Scope.READ})
    ident = request.path_params["device"]

    def row() -> dict[str, Any]:
        with state.db.read() as conn:
            found = conn.execute(
                select(devices).where(
                    devices.c.factory_id == reader.factory_id,
                    (devices.c.id == ident) | (devices.c.name == ident),
                )
            ).first()
        if found is None:
            raise not_found(f"no device {ident!r} in this factory")
        return _device_json(found)

    return ok(await threaded(row))


routes = [
    Route("/api/v1/factories/{factory}/devices", register, methods=["POST"]),
    Route("/api/v1/factories/{factory}/devices", list_all, methods=["GET"]),
    Route("/api/v1/factories/{factory}/devices/{device}", show, methods=["GET"]),
]
