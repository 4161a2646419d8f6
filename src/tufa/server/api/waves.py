"""`/api/v1/factories/{factory}/waves` and `/device-groups`: releases on demand."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypedDict, TypeVar

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tuf.api.metadata import Metadata, Targets

from tufa.core.clock import iso
from tufa.server import devices
from tufa.server.api.common import (
    caller,
    field,
    json_object,
    ok,
    signature_list,
    string_list,
    threaded,
)
from tufa.server.auth import Scope, require_factory
from tufa.server.errors import bad_request
from tufa.server.publishing import LABEL, NGCLIENT_TARGETS_MAX_LENGTH, VERSION_LABEL
from tufa.server.state import ServerState
from tufa.server.waves import WAVE_NAME, Waves

ADMIN = {Scope.ADMIN}
READERS = {Scope.ADMIN, Scope.CI, Scope.READ}
PREFIX = "/api/v1/factories/{factory}/waves"
# A signed wave (POST PREFIX) carries its production targets as JSON: room for the
# largest targets file devices accept (larger ones are refused as such), and for the
# spacing of JSON as clients send it.
CREATE_PATH = re.compile(r"^/api/v1/factories/[^/]+/waves$")
MAX_CREATE_BYTES = 2 * NGCLIENT_TARGETS_MAX_LENGTH
T = TypeVar("T")


class GroupJson(TypedDict):
    name: str
    devices: list[str]


class ListedGroupJson(TypedDict):
    name: str
    created_at: str
    devices: list[str]


async def _allowed(request: Request, scopes: set[Scope]) -> tuple[ServerState, int]:
    """Check the caller before anything of the request is read."""
    state, principal = await caller(request)
    allowed = require_factory(principal, request.path_params["factory"], scopes)
    assert allowed.factory_id is not None
    return state, allowed.factory_id


async def _in_transaction(
    state: ServerState,
    step: Callable[[Connection], T],
    *,
    write: bool = True,
) -> T:
    def work() -> T:
        with state.db.write() if write else state.db.read() as conn:
            return step(conn)

    return await threaded(work)


def _tag_and_version(data: dict[str, Any]) -> tuple[str, str]:
    """The build a wave releases: a CI target's tag and version, checked as CI's are."""
    tag, version = field(data, "tag", str), field(data, "version", str)
    if not LABEL.fullmatch(tag):
        raise bad_request(
            "field 'tag' must be up to 128 letters, digits or . _ : + - such as 'main'"
        )
    if not VERSION_LABEL.fullmatch(version):
        raise bad_request(
            "field 'version' must be up to 64 letters, digits or . _ : + - such as '42'"
        )
    return tag, version


async def prepare(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    data = await json_object(request)
    tag, version = _tag_and_version(data)
    prune = string_list(data, "prune")
    days = field(data, "expires_days", int, 365)
    waves = Waves(state)
    built = await _in_transaction(
        state, lambda c: waves.prepare(c, factory_id, tag, version, prune, days), write=False
    )
    return ok({"signed": built.to_dict()})


async def create(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    data = await json_object(request)
    name = field(data, "name", str)
    tag, version = _tag_and_version(data)
    prune = string_list(data, "prune")
    try:
        md = Metadata[Targets].from_dict(dict(field(data, "targets", dict)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad_request(f"field 'targets' is not signed targets metadata: {e}") from e
    waves = Waves(state)
    created = await _in_transaction(
        state, lambda c: waves.create(c, factory_id, name, tag, version, prune, md)
    )
    return ok(created, status=201)


async def list_all(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, READERS)
    waves = Waves(state)
    return ok(await _in_transaction(state, lambda c: waves.list(c, factory_id), write=False))


async def show(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, READERS)
    name = request.path_params["name"]
    waves = Waves(state)
    return ok(
        await _in_transaction(state, lambda c: waves.describe(c, factory_id, name), write=False)
    )


async def sign(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    name = request.path_params["name"]
    signatures = signature_list(field(await json_object(request), "signatures", list), "signatures")
    waves = Waves(state)
    return ok(
        await _in_transaction(
            state, lambda c: waves.add_signatures(c, factory_id, name, signatures)
        )
    )


async def rollout(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    name = request.path_params["name"]
    data = await json_object(request)
    group = field(data, "group", str, "") or None
    device_ids = string_list(data, "devices") if "devices" in data else None
    limit = field(data, "limit", str, "") or None
    dry_run = field(data, "dry_run", bool, False)
    waves = Waves(state)
    return ok(
        await _in_transaction(
            state,
            lambda c: waves.rollout(c, factory_id, name, group, device_ids, limit, dry_run),
        )
    )


async def complete(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    name = request.path_params["name"]
    waves = Waves(state)
    return ok(await _in_transaction(state, lambda c: waves.complete(c, factory_id, name)))


async def cancel(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    name = request.path_params["name"]
    waves = Waves(state)
    return ok(await _in_transaction(state, lambda c: waves.cancel(c, factory_id, name)))


async def create_group(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    name = field(await json_object(request), "name", str)
    if not WAVE_NAME.fullmatch(name):
        raise bad_request("group names are 1-64 letters, digits, '.', '_' or '-'")

    def insert_group(conn: Connection) -> GroupJson:
        devices.create_group(conn, factory_id, name, state.settings.clock.now())
        return {"name": name, "devices": []}

    return ok(await _in_transaction(state, insert_group), status=201)


async def add_to_group(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, ADMIN)
    group = request.path_params["group"]
    wanted = string_list(await json_object(request), "devices")
    if not wanted:
        raise bad_request("field 'devices' must name at least one device (id or name)")

    def add(conn: Connection) -> GroupJson:
        return {"name": group, "devices": devices.add_to_group(conn, factory_id, group, wanted)}

    return ok(await _in_transaction(state, add))


async def list_groups(request: Request) -> JSONResponse:
    state, factory_id = await _allowed(request, READERS)

    def groups(conn: Connection) -> list[ListedGroupJson]:
        return [
            {
                "name": r.name,
                "created_at": iso(r.created_at),
                "devices": devices.group_members(conn, factory_id, r.name),
            }
            for r in devices.groups(conn, factory_id)
        ]

    return ok(await _in_transaction(state, groups, write=False))


routes = [
    Route(f"{PREFIX}/prepare", prepare, methods=["POST"]),
    Route(PREFIX, create, methods=["POST"]),
    Route(PREFIX, list_all, methods=["GET"]),
    Route(f"{PREFIX}/{{name}}", show, methods=["GET"]),
    Route(f"{PREFIX}/{{name}}/signatures", sign, methods=["POST"]),
    Route(f"{PREFIX}/{{name}}/rollout", rollout, methods=["POST"]),
    Route(f"{PREFIX}/{{name}}/complete", complete, methods=["POST"]),
    Route(f"{PREFIX}/{{name}}/cancel", cancel, methods=["POST"]),
    Route("/api/v1/factories/{factory}/device-groups", create_group, methods=["POST"]),
    Route("/api/v1/factories/{factory}/device-groups", list_groups, methods=["GET"]),
    Route(
        "/api/v1/factories/{factory}/device-groups/{group}/devices", add_to_group, methods=["POST"]
    ),
]
