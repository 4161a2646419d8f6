"""`/api/v1/factories/{factory}/keys/updates`: root update transactions (admin only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.core import api_paths
from tufa.core.metadata import Channel
from tufa.core.root_update import RootKeyPairs, pairs_from_json
from tufa.server.api.common import factory_caller, ok, reading, resource, writing
from tufa.server.api.fields import field, json_object, signature_list, string_list
from tufa.server.errors import bad_request
from tufa.server.principals import Scope
from tufa.server.root_updates.transaction import RootUpdates
from tufa.server.state import ServerState

# Checked before the request body is read, so a caller without the right learns nothing
# from validation errors.
ADMIN = {Scope.ADMIN}


async def _run(
    state: ServerState,
    factory_id: int,
    step: Callable[[RootUpdates, Connection, int], Mapping[str, object] | None],
    *,
    write: bool = True,
) -> Mapping[str, object]:
    """Run `step` in one transaction; a step that returns nothing answers with the
    update as it stands after the step."""
    updates = RootUpdates(state)

    def work(conn: Connection) -> Mapping[str, object]:
        result = step(updates, conn, factory_id)
        return result if result is not None else updates.describe(conn, factory_id)

    return await (writing if write else reading)(state, work)


def _channels(data: dict[str, Any], name: str) -> dict[Channel, Any]:
    unknown = set(data) - set(Channel)
    if unknown:
        raise bad_request(f"field {name!r} has unknown channel(s): {', '.join(sorted(unknown))}")
    return {Channel(key): value for key, value in data.items()}


async def init(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    message = field(data, "message", str).strip()
    if not message:
        raise bad_request("field 'message' must say what the update is for")
    step = await _run(state, factory_id, lambda u, c, f: u.init(c, f, message))
    return ok(step, status=201)


async def show(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    return ok(await _run(state, factory_id, lambda u, c, f: u.describe(c, f), write=False))


async def stage(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    roots = _channels(field(data, "roots", dict), "roots")
    if set(roots) != set(Channel):
        raise bad_request("field 'roots' must hold the staged 'ci' and 'prod' roots")
    prod_targets = field(data, "prod_targets", dict, {})
    pairs: RootKeyPairs | None = None
    if data.get("root_key_pairs") is not None:
        try:
            pairs = pairs_from_json(data["root_key_pairs"])
        except ValueError as e:
            raise bad_request(f"field 'root_key_pairs': {e}") from e
    return ok(
        await _run(state, factory_id, lambda u, c, f: u.stage(c, f, roots, prod_targets, pairs))
    )


async def online_keys(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    roles = string_list(data, "roles")
    names = string_list(data, "channels") if "channels" in data else list(Channel)
    if not set(names) <= set(Channel):
        raise bad_request("field 'channels' must list 'ci', 'prod' or both")
    chosen = [Channel(name) for name in dict.fromkeys(names)]
    return ok(
        await _run(state, factory_id, lambda u, c, f: u.rotate_online_keys(c, f, roles, chosen))
    )


async def signatures(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    roots = {
        channel: signature_list(value, f"roots.{channel}")
        for channel, value in _channels(field(data, "roots", dict, {}), "roots").items()
    }
    targets = {
        view: signature_list(value, f"prod_targets.{view}")
        for view, value in field(data, "prod_targets", dict, {}).items()
    }
    return ok(await _run(state, factory_id, lambda u, c, f: u.add_signatures(c, f, roots, targets)))


async def apply(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    return ok(await _run(state, factory_id, lambda u, c, f: u.apply(c, f)))


async def cancel(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    return ok(await _run(state, factory_id, lambda u, c, f: u.cancel(c, f)))


routes = [
    *resource(api_paths.ROOT_UPDATE, POST=init, GET=show, DELETE=cancel),
    *resource(api_paths.ROOT_UPDATE_STAGED, PUT=stage),
    *resource(api_paths.ROOT_UPDATE_ONLINE_KEYS, POST=online_keys),
    *resource(api_paths.ROOT_UPDATE_SIGNATURES, POST=signatures),
    *resource(api_paths.ROOT_UPDATE_APPLY, POST=apply),
]
