"""What operators and load balancers call: readiness, Prometheus metrics, and the
middleware that counts every request.

`/healthz` (app.py) says the process serves; `/readyz` says it can do its work, so a
load balancer sends nothing to a replica whose database is gone. `/metrics` names
factories and waves, so it needs a credential: the operator token, or the metrics
token (`tufa-server run --metrics-token`), which can do nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tufa.core import api_paths
from tufa.server import metrics
from tufa.server.api.common import caller, resource, state_of
from tufa.server.auth import bearer_secret, require_operator
from tufa.server.errors import error_body

log = logging.getLogger("tufa.server")
# How long /readyz waits for the database before it says the database does not answer.
READY_TIMEOUT_SECONDS = 5.0


class RequestMetrics:
    """Count each request and its latency by route class, and CI publishes by action."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = scope.get(metrics.STARTED) or time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            metrics.observe_request(
                scope["method"], scope["path"], status, time.perf_counter() - started
            )


def not_ready(message: str) -> JSONResponse:
    return JSONResponse(error_body(503, "not_ready", message), status_code=503)


async def ready(request: Request) -> Response:
    state = state_of(request)
    try:
        await asyncio.wait_for(
            run_in_threadpool(metrics.check_database, state.db), READY_TIMEOUT_SECONDS
        )
    except TimeoutError:
        log.warning("readiness: the database did not answer within %ss", READY_TIMEOUT_SECONDS)
        return not_ready(f"the database did not answer within {READY_TIMEOUT_SECONDS:g}s")
    except Exception as e:
        # The detail (host, port, database) is for the operator's log, not the public.
        log.warning("readiness: the database is unreachable: %s", e)
        return not_ready(
            f"the database is unreachable ({type(e).__name__}); the server log has the detail"
        )
    return JSONResponse({"status": "ready"})


def _is_metrics_token(request: Request, secret: str | None) -> bool:
    expected = state_of(request).settings.metrics_token_sha256
    if secret is None or expected is None:
        return False
    given = hashlib.sha256(secret.encode()).hexdigest()
    return hmac.compare_digest(given, expected)


async def show_metrics(request: Request) -> Response:
    if not _is_metrics_token(request, bearer_secret(request.headers)):
        _state, principal = await caller(request)
        require_operator(principal)
    state = state_of(request)
    # On the event loop, where the poll path counts: the series are read whole, with
    # every answer counted so far.
    metrics.flush_poll_answers()
    counted = metrics.counted_exposition()
    from_db = await run_in_threadpool(metrics.database_exposition, state.db, state.settings.clock)
    return Response(counted + from_db, media_type=metrics.CONTENT_TYPE)


routes = [
    *resource(api_paths.READY, GET=ready),
    *resource(api_paths.METRICS, GET=show_metrics),
]
