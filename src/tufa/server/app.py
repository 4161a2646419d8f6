"""The ASGI application: routes, JSON errors, request size limits, request metrics, and
its background jobs (background.py: the re-signer, staged rollouts, webhook deliveries)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tufa.core import api_paths
from tufa.server.api import (
    devices,
    factories,
    keys,
    openapi,
    ops,
    repo,
    root_updates,
    targets,
    tokens,
    waves,
    webhooks,
)
from tufa.server.api.access_log import AccessLog
from tufa.server.api.common import Endpoint, refuse_unstorable_params
from tufa.server.api.poll import PollPath
from tufa.server.background import background
from tufa.server.errors import ApiError, api_error_handler, error_body, refused_handler
from tufa.server.exceptions import Refused
from tufa.server.metrics import flush_poll_answers
from tufa.server.poll_notify import stamps_for
from tufa.server.publishing import MAX_PUBLISH_BYTES
from tufa.server.state import ServerState
from tufa.server.webhooks import use_clock

log = logging.getLogger("tufa.server")
_BLOB_PATH = compile_path(api_paths.BLOB)[0]
_WAVE_CREATE_PATH = compile_path(api_paths.WAVES)[0]
_PUBLISH_PATHS = (compile_path(api_paths.TARGETS)[0], compile_path(api_paths.CHECK_TARGETS)[0])
# An oversized request body up to this size is read (and dropped) before the refusal.
_DRAINED_BYTES = 8 * 1024 * 1024
# How long an answer given before its request's body was read waits for the rest of the
# body: a client that sends it slowly holds a connection, not the answer.
DRAIN_SECONDS = 1.0


class BodySizeLimit:
    """Refuse request bodies over a limit before they are read into memory.

    Blob uploads stream to disk and have their own, much larger, limit; a signed wave
    carries a whole production targets file and may be as large as devices accept; a
    publish may describe MAX_TARGETS_PER_PUBLISH targets.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_blob_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_blob_bytes = max_blob_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _BLOB_PATH.match(scope["path"]):
            limit = self.max_blob_bytes
        elif _WAVE_CREATE_PATH.match(scope["path"]):
            limit = max(self.max_bytes, waves.MAX_CREATE_BYTES)
        elif any(path.match(scope["path"]) for path in _PUBLISH_PATHS):
            limit = max(self.max_bytes, MAX_PUBLISH_BYTES)
        else:
            limit = self.max_bytes
        message = f"request body is larger than the limit of {limit} bytes"
        request_headers = dict(scope["headers"])
        declared = request_headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            headers = {"Connection": "close"}
            if declared.isdigit() and int(declared) <= _DRAINED_BYTES:
                # Read and dropped, so that the client's connection stays usable for its
                # next request; a larger body is not read, and the connection is closed.
                while (await receive()).get("more_body", False):
                    pass
                headers = {}
            response = JSONResponse(
                error_body(413, "too_large", message), status_code=413, headers=headers
            )
            await response(scope, receive, send)
            return
        received = 0
        # A request without a body has nothing left to read; one with a body has until
        # its last part (or the client's disconnect) has been received.
        finished = declared in (None, b"0") and b"transfer-encoding" not in request_headers

        async def limited_receive() -> Message:
            nonlocal received, finished
            received_message = await receive()
            received += len(received_message.get("body", b""))
            if received > limit:
                raise ApiError(413, "too_large", message)
            finished = not received_message.get("more_body", False)
            return received_message

        async def send_after_the_body(response_message: Message) -> None:
            # An answer given before the body was read (a refused token, an unknown
            # route) would leave the rest unread: granian then drops the connection,
            # and a client still sending its body sees it reset instead of the answer.
            # Read it first, up to _DRAINED_BYTES (a blob upload may be far larger) and
            # DRAIN_SECONDS; past either, the answer says the connection closes.
            if response_message["type"] == "http.response.start" and not finished:
                with contextlib.suppress(ApiError, TimeoutError):
                    async with asyncio.timeout(DRAIN_SECONDS):
                        while not finished and received <= _DRAINED_BYTES:
                            await limited_receive()
                if not finished:
                    headers = [*response_message.get("headers", []), (b"connection", b"close")]
                    response_message = {**response_message, "headers": headers}
            await send(response_message)

        await self.app(scope, limited_receive, send_after_the_body)


async def health(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _checked(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, behind the input rules for path and query parameters (inputs.py)."""

    @functools.wraps(endpoint)
    async def checked(request: Request) -> Response:
        refuse_unstorable_params(request)
        return await endpoint(request)

    return checked


# Every route the server serves, each behind the same input rules; the fuzz test
# (tests/test_fuzz_routes.py) sends hostile input to each one.
ROUTES = [
    Route(route.path, _checked(route.endpoint), methods=route.methods)
    for route in (
        Route(api_paths.HEALTH, health),
        Route(api_paths.OPENAPI, openapi.serve),
        *ops.routes,
        *factories.routes,
        *keys.routes,
        *root_updates.routes,
        *targets.routes,
        *waves.routes,
        *tokens.routes,
        *devices.routes,
        *webhooks.routes,
        *repo.routes,
    )
]


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals: no route matched the path, or not with this method."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail
    if exc.status_code == 404:
        # The path is the caller's own text, never a secret: tokens go in headers.
        message = (
            f"no API route matches {request.url.path!r}: check the URL against the API "
            "paths in the README (a factory's routes start with /api/v1/factories/NAME/)"
        )
    return JSONResponse(error_body(exc.status_code, code, message), status_code=exc.status_code)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body(500, "internal", "internal server error; see the server log"), status_code=500
    )


def create_app(state: ServerState, *, first_resign_pass: bool = True) -> ASGIApp:
    """The application. `first_resign_pass=False` for workers whose parent process
    already ran the start-up pass before starting them."""
    stamps = stamps_for(state.db.url, state.settings.poll_invalidation)
    use_clock(state.settings.clock)  # the clock webhook deliveries are stamped by

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            async with background(state, first_resign_pass=first_resign_pass):
                log.info("startup complete: serving requests")
                yield
        finally:
            flush_poll_answers()  # with several workers, the others still scrape its files
            await stamps.close()
            state.db.dispose()

    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            ApiError: api_error_handler,
            Refused: refused_handler,
            HTTPException: http_error,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.state.tufa = state
    app.add_middleware(
        BodySizeLimit,
        max_bytes=state.settings.max_body_bytes,
        max_blob_bytes=state.settings.max_blob_bytes,
    )
    # Outermost, the access log, which sees every answer; then the poll path: a cached
    # poll skips routing and every other layer, and counts itself (ADR 0014); behind it
    # the request metrics count everything else, refusals of the other layers included.
    polls = PollPath(
        ops.RequestMetrics(app), state.poll, state.repo, stamps, state.settings.clock.now
    )
    return AccessLog(polls, every_request=state.settings.access_log)
