"""Helpers every handler uses: the server state, the caller's identity, routes, the
transactions a handler runs in the thread pool, and the JSON answer. Reading a request
body's fields is `fields.py`."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tufa.server.auth import bearer_secret, require_factory
from tufa.server.credentials import settle
from tufa.server.errors import bad_request
from tufa.server.inputs import text_problem
from tufa.server.principals import Principal, Scope, authenticate
from tufa.server.state import ServerState

T = TypeVar("T")


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
    secret = bearer_secret(request.headers)
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


Endpoint = Callable[[Request], Awaitable[Response]]


def resource(path: str, **endpoints: Endpoint) -> list[Route]:
    """The routes of one URL, an endpoint per HTTP method:
    `resource(api_paths.DEVICES, POST=register, GET=list_all)`. GET answers HEAD too."""
    return [Route(path, endpoint, methods=[method]) for method, endpoint in endpoints.items()]


async def threaded(fn: Callable[[], T]) -> T:
    return await run_in_threadpool(fn)


async def writing(state: ServerState, work: Callable[[Connection], T]) -> T:
    """`work` in one write transaction, in the thread pool (database calls block)."""
    return await threaded(functools.partial(_within, state.db.write, work))


async def reading(state: ServerState, work: Callable[[Connection], T]) -> T:
    """`work` in one read-only transaction, in the thread pool."""
    return await threaded(functools.partial(_within, state.db.read, work))


def _within(
    transaction: Callable[[], AbstractContextManager[Connection]], work: Callable[[Connection], T]
) -> T:
    with transaction() as conn:
        return work(conn)


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)
