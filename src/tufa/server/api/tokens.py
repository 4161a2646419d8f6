"""`/api/v1/factories/{factory}/tokens`: admin-only token management;
`/api/v1/operator-token`: the operator replacing their own token."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypedDict

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.server.api.common import caller, factory_caller, ok, reading, resource, threaded, writing
from tufa.server.api.fields import field, json_object, text_field
from tufa.server.auth import require_factory, require_operator
from tufa.server.errors import bad_request
from tufa.server.principals import Scope
from tufa.server.tokens import (
    create_token,
    factory_tokens,
    revoke_token,
    rotate_operator_token,
    token_row,
)

MAX_TOKEN_LIFETIME = timedelta(days=3650)
MAX_DESCRIPTION = 200


class TokenJson(TypedDict):
    """A token as listed: never its secret, which only its creation shows."""

    id: str
    scopes: list[str]
    description: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class CreatedTokenJson(TokenJson):
    token: str


class OperatorTokenJson(TypedDict):
    id: str
    created_at: str
    token: str


def _token_json(row: Any) -> TokenJson:
    return {
        "id": row.id,
        "scopes": row.scopes.split(","),
        "description": row.description,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
    }


async def create(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    name = request.path_params["factory"]
    admin = require_factory(principal, name, {Scope.ADMIN})
    data = await json_object(request)
    scopes = field(data, "scopes", list)
    valid = {s.value for s in Scope}
    if not scopes or not all(isinstance(s, str) and s in valid for s in scopes):
        raise bad_request(f"field 'scopes' must be a non-empty list of: {', '.join(sorted(valid))}")
    description = text_field(data, "description", MAX_DESCRIPTION, required=False)
    lifetime = field(data, "expires_in_seconds", int, 0)
    if not 0 <= lifetime <= MAX_TOKEN_LIFETIME.total_seconds():
        raise bad_request(
            "field 'expires_in_seconds' must be at most ten years (0 or absent: never expires)"
        )

    def make(conn: Connection) -> CreatedTokenJson:
        now = state.settings.clock.now()
        expires = now + timedelta(seconds=lifetime) if lifetime else None
        assert admin.factory_id is not None
        token = create_token(conn, admin.factory_id, sorted(set(scopes)), description, now, expires)
        return {**_token_json(token_row(conn, token.id)), "token": token.secret}

    return ok(await writing(state, make), status=201)


async def list_all(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, {Scope.ADMIN})

    def rows(conn: Connection) -> list[TokenJson]:
        return [_token_json(r) for r in factory_tokens(conn, factory_id)]

    return ok(await reading(state, rows))


async def revoke(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, {Scope.ADMIN})
    token_id = request.path_params["token_id"]

    def apply(conn: Connection) -> TokenJson:
        now = state.settings.clock.now()
        return _token_json(revoke_token(conn, factory_id, token_id, now))

    return ok(await writing(state, apply))


async def rotate_operator(request: Request) -> JSONResponse:
    """A new operator token, shown once; the one this request used stops working now."""
    state, principal = await caller(request)
    require_operator(principal)

    def rotate() -> OperatorTokenJson:
        with state.db.startup() as conn:
            token = rotate_operator_token(conn, state.settings.clock.now())
            row = token_row(conn, token.id)
        return {"id": row.id, "created_at": iso(row.created_at), "token": token.secret}

    return ok(await threaded(rotate), status=201)


routes = [
    *resource(api_paths.OPERATOR_TOKEN, POST=rotate_operator),
    *resource(api_paths.TOKENS, POST=create, GET=list_all),
    *resource(api_paths.TOKEN, DELETE=revoke),
]
