"""`/api/v1/factories/{factory}/webhooks`: a factory's webhooks, for admin tokens only
(a hook's URL may hold the receiver's token; no answer holds a hook's secret but the
one `add` generated)."""

from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.server import webhooks
from tufa.server.api.common import factory_caller, ok, reading, resource, writing
from tufa.server.api.fields import field, json_object
from tufa.server.errors import bad_request
from tufa.server.principals import Scope

# Only admins: a hook's URL may hold the receiver's own token, and a delivery's log
# holds what the receiver answered.
ADMIN = {Scope.ADMIN}
# The delivery log shows a hook's newest deliveries.
SHOWN_DELIVERIES = 100


class HookJson(TypedDict):
    """A webhook as listed: never its secret."""

    id: str
    url: str
    events: list[str]
    created_at: str


class CreatedHookJson(HookJson):
    # The secret the server generated, shown this once; None when the caller chose it.
    secret: str | None


class DeliveryJson(TypedDict):
    id: str
    event: str
    created_at: str
    attempts: int
    # "queued" (not tried yet), "retrying", "delivered" or "given-up".
    status: str
    last_status: int | None
    last_error: str | None
    delivered_at: str | None
    given_up_at: str | None
    next_attempt_at: str | None


class QueuedTestJson(TypedDict):
    delivery: str
    event: str


def _hook_json(row: Any) -> HookJson:
    return {
        "id": row.id,
        "url": row.url,
        "events": webhooks.hook_events(row),
        "created_at": iso(row.created_at),
    }


def _status(row: Any) -> str:
    if row.delivered_at is not None:
        return "delivered"
    if row.given_up_at is not None:
        return "given-up"
    return "retrying" if row.last_error is not None else "queued"


def _delivery_json(row: Any) -> DeliveryJson:
    return {
        "id": row.id,
        "event": row.event,
        "created_at": iso(row.created_at),
        "attempts": row.attempts,
        "status": _status(row),
        "last_status": row.last_status,
        "last_error": row.last_error,
        "delivered_at": iso(row.delivered_at),
        "given_up_at": iso(row.given_up_at),
        "next_attempt_at": iso(row.next_attempt_at),
    }


async def add(request: Request) -> JSONResponse:
    """Add a webhook; a secret the server generates is shown this once."""
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    url = field(data, "url", str)
    events = field(data, "events", list)
    if not all(isinstance(e, str) for e in events):
        raise bad_request(f"field 'events' must be a list of: {', '.join(webhooks.EVENTS)}")
    secret = None
    if data.get("secret") is not None:
        secret = webhooks.checked_secret(field(data, "secret", str))

    def store(conn: Connection) -> CreatedHookJson:
        now = state.settings.clock.now()
        row, generated = webhooks.add_hook(
            conn, state.master_key, factory_id, url, events, secret, now
        )
        return {**_hook_json(row), "secret": generated}

    return ok(await writing(state, store), status=201)


async def list_all(request: Request) -> JSONResponse:
    """The factory's webhooks, without their secrets."""
    state, factory_id = await factory_caller(request, ADMIN)
    rows = await reading(state, lambda conn: webhooks.list_hooks(conn, factory_id))
    return ok([_hook_json(row) for row in rows])


async def remove(request: Request) -> JSONResponse:
    """Remove a webhook; its queued deliveries are dropped, and its log with them."""
    state, factory_id = await factory_caller(request, ADMIN)
    hook_id = request.path_params["hook_id"]
    row = await writing(state, lambda conn: webhooks.remove_hook(conn, factory_id, hook_id))
    return ok(_hook_json(row))


async def test(request: Request) -> JSONResponse:
    """Queue a `webhook.test` delivery to the webhook, whatever events it subscribed to."""
    state, factory_id = await factory_caller(request, ADMIN)
    hook_id = request.path_params["hook_id"]
    delivery = await writing(state, lambda conn: webhooks.queue_test(conn, factory_id, hook_id))
    answer: QueuedTestJson = {"delivery": delivery, "event": webhooks.TEST_EVENT}
    return ok(answer, status=201)


async def deliveries(request: Request) -> JSONResponse:
    """The webhook's newest deliveries (at most 100), newest first: the delivery log."""
    state, factory_id = await factory_caller(request, ADMIN)
    hook_id = request.path_params["hook_id"]
    rows = await reading(
        state, lambda conn: webhooks.deliveries(conn, factory_id, hook_id, SHOWN_DELIVERIES)
    )
    return ok([_delivery_json(row) for row in rows])


routes = [
    *resource(api_paths.WEBHOOKS, POST=add, GET=list_all),
    *resource(api_paths.WEBHOOK, DELETE=remove),
    *resource(api_paths.WEBHOOK_TEST, POST=test),
    *resource(api_paths.WEBHOOK_DELIVERIES, GET=deliveries),
]
