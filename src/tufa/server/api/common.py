"""Helpers every handler uses: the server state, the caller's identity, the input rules
(tufa.server.inputs) applied to parameters and JSON bodies, field checks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from securesystemslib.signer import Signature
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.server.auth import Principal, Scope, authenticate, bearer_secret, require_factory
from tufa.server.credentials import settle
from tufa.server.errors import bad_request
from tufa.server.inputs import refuse_unsignable_json, text_problem
from tufa.server.state import ServerState

T = TypeVar("T")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{1,62}")


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.tufa
    return state


def base_url(request: Request) -> str:
    """The server's URL as devices reach it: the configured public URL, if the server
    sits behind a proxy, or else the one this request came to."""
    public_url = state_of(request).settings.public_url
    return (public_url or str(request.base_url)).rstrip("/")


def refuse_unstorable_params(request: Request) -> None:
    """Refuse a request whose path or query parameters hold text no database stores."""
    for kind, params in (
        ("path parameter", request.path_params.items()),
        ("query parameter", request.query_params.multi_items()),
    ):
        for name, value in params:
            problem = text_problem(name) or text_problem(str(value))
            if problem is not None:
                raise bad_request(f"{kind} '{json.dumps(name)[1:-1]}' {problem}; remove it")


async def caller(request: Request) -> tuple[ServerState, Principal | None]:
    """The server state and the authenticated caller (None when no token was sent)."""
    state = state_of(request)
    secret = bearer_secret(request.headers.get("authorization"))
    if secret is None:
        return state, None

    def lookup() -> Principal:
        now = state.settings.clock.now()
        with state.db.read() as conn:
            principal = authenticate(conn, secret, now)
        return settle(state.db, principal, secret, now)

    return state, await run_in_threadpool(lookup)


async def factory_caller(request: Request, scopes: set[Scope]) -> tuple[ServerState, int]:
    """The server state and the id of the factory the path names, once the caller may act
    on it with one of `scopes` (a 401 or 403 otherwise)."""
    state, principal = await caller(request)
    allowed = require_factory(principal, request.path_params["factory"], scopes)
    assert allowed.factory_id is not None  # only operators have none, and they are refused
    return state, allowed.factory_id


async def json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise bad_request("the request body is not valid JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    # Before any handler sees it: no field anywhere holds what cannot be signed or stored.
    refuse_unsignable_json(data)
    return data


def field(data: dict[str, Any], name: str, kind: type[T], default: T | None = None) -> T:
    """`data[name]` checked to be of `kind`; missing fields take `default` or are refused."""
    if name not in data or data[name] is None:
        if default is None:
            raise bad_request(f"field {name!r} is required")
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"field {name!r} must be of type {_json_type(kind)}")
    return value


def string_list(data: dict[str, Any], name: str) -> list[str]:
    """`data[name]`: a list of strings, empty if left out."""
    value = field(data, name, list, [])
    if not all(isinstance(v, str) for v in value):
        raise bad_request(f"field {name!r} must be a list of strings")
    return value


def signature_list(value: Any, label: str) -> list[Signature]:
    """`value` (the field at JSON path `label`) as signatures: {keyid, sig} objects."""
    if not isinstance(value, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("keyid"), str)
        and isinstance(item.get("sig"), str)
        for item in value
    ):
        raise bad_request(f"field {label!r} must be a list of {{keyid, sig}} objects of strings")
    return [Signature.from_dict(dict(item)) for item in value]


def name_field(data: dict[str, Any], name: str) -> str:
    value = field(data, name, str)
    if not NAME_PATTERN.fullmatch(value):
        raise bad_request(
            f"field {name!r} must be 2-63 lowercase letters, digits or '-', starting with a "
            "letter or digit"
        )
    return value


def text_field(data: dict[str, Any], name: str, max_length: int, *, required: bool = True) -> str:
    """A short printable text: stripped, no control characters, at most `max_length`."""
    value = field(data, name, str, None if required else "").strip()
    if (required and not value) or len(value) > max_length or not value.isprintable():
        least = 1 if required else 0
        raise bad_request(f"field {name!r} must be {least}-{max_length} printable characters")
    return value


def _json_type(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}.get(
        kind, kind.__name__
    )


async def threaded(fn: Callable[[], T]) -> T:
    return await run_in_threadpool(fn)


async def writing(state: ServerState, work: Callable[[Connection], T]) -> T:
    """`work` in one write transaction, in the thread pool (database calls block)."""

    def run() -> T:
        with state.db.write() as conn:
            return work(conn)

    return await threaded(run)


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)
