"""The webhook deliverer: sends what is due from the outbox (webhooks.py), at least once.

It runs in the one process holding the webhooks lock (resigner.WEBHOOKS), and looks
for due deliveries every second; a process standing by tries to take the lock every
5 s, so it takes over within seconds of the holder's end. A delivery is claimed before
it is sent: in one short transaction its attempt is counted and its next attempt moved
a lease ahead, so that a process that dies while sending leaves it due again once the
lease ends, and on PostgreSQL rows another transaction claims are skipped
(`FOR UPDATE SKIP LOCKED`).
A 2xx answer delivers it; any other answer, a timeout or a connection error is a failed
attempt, retried after a back-off that doubles from 10 s up to an hour, until a day has
passed since the event: the attempt after that which fails gives it up. Every time is
the server's clock (settings.clock), which tests move instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Row, select, update

from tufa.server.metrics import WEBHOOK_DELIVERIES
from tufa.server.offline_expiry import check_expiring_keys
from tufa.server.resigner import WEBHOOKS, ResignerLock
from tufa.server.state import ServerState
from tufa.server.webhooks import hook_secret, signature, webhook_deliveries, webhooks

log = logging.getLogger("tufa.server")

CADENCE_SECONDS = 1.0
LOCK_RETRY_SECONDS = 5.0
TIMEOUT_SECONDS = 10.0
FIRST_BACKOFF = timedelta(seconds=10)
MAX_BACKOFF = timedelta(hours=1)
RETRY_FOR = timedelta(days=1)
# Longer than an attempt can take: a claimed delivery is not due again before.
LEASE = timedelta(seconds=60)
BATCH = 20
MAX_ERROR = 500
USER_AGENT = "tufa-webhooks"


def backoff(attempts: int) -> timedelta:
    """How long after its `attempts`-th failed attempt a delivery is tried again."""
    return min(FIRST_BACKOFF * (1 << min(max(attempts - 1, 0), 20)), MAX_BACKOFF)


@dataclass(frozen=True)
class Claimed:
    id: str
    event: str
    url: str
    body: bytes
    secret: bytes
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def claim_due(state: ServerState, limit: int = BATCH) -> list[Claimed]:
    now = state.settings.clock.now()
    due = webhook_deliveries.c.next_attempt_at <= now
    # Most passes find nothing: a read says so without taking SQLite's write lock.
    with state.db.read() as conn:
        if conn.execute(select(webhook_deliveries.c.id).where(due).limit(1)).first() is None:
            return []
    query = (
        select(webhook_deliveries, webhooks.c.url, webhooks.c.secret_encrypted)
        .join(webhooks, webhooks.c.id == webhook_deliveries.c.hook_id)
        .where(due)
        .order_by(webhook_deliveries.c.next_attempt_at)
        .limit(limit)
    )
    if not state.db.is_sqlite:
        query = query.with_for_update(of=webhook_deliveries, skip_locked=True)
    with state.db.write() as conn:
        rows = conn.execute(query).all()
        for row in rows:
            conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == row.id)
                .values(attempts=row.attempts + 1, next_attempt_at=now + LEASE)
            )
    return [_claimed(state, row) for row in rows]


def _claimed(state: ServerState, row: Row[Any]) -> Claimed:
    secret = hook_secret(state.master_key, row.hook_id, row.secret_encrypted)
    return Claimed(
        id=row.id,
        event=row.event,
        url=row.url,
        body=row.body.encode(),
        secret=secret,
        attempts=row.attempts + 1,
        created_at=row.created_at,
    )


async def send(client: httpx.AsyncClient, delivery: Claimed) -> Outcome:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Tufa-Delivery": delivery.id,
        "X-Tufa-Event": delivery.event,
        "X-Tufa-Signature": signature(delivery.secret, delivery.body),
    }
    try:
        # A whole-answer deadline: httpx's timeout is per phase, and a receiver that
        # trickles its answer would hold the batch, and every other factory's, for ever.
        response = await asyncio.wait_for(
            client.post(delivery.url, content=delivery.body, headers=headers), TIMEOUT_SECONDS
        )
    except TimeoutError:
        return Outcome(None, f"no answer within {TIMEOUT_SECONDS:g} s")
    except Exception as e:  # any failure to send is a failed attempt, never a stuck one
        return Outcome(None, _storable(f"{type(e).__name__}: {e}"))
    if 200 <= response.status_code < 300:
        return Outcome(response.status_code, None)
    return Outcome(response.status_code, _storable(f"HTTP {response.status_code}: {response.text}"))


def _storable(error: str) -> str:
    """A receiver's words, short and printable (PostgreSQL's text holds no NUL)."""
    return "".join(c if c.isprintable() else " " for c in error[:MAX_ERROR])


def record(state: ServerState, delivery: Claimed, outcome: Outcome) -> str:
    """Store an attempt's outcome; returns it as the metrics count it."""
    now = state.settings.clock.now()
    values: dict[str, Any] = {"last_status": outcome.status, "last_error": outcome.error}
    if outcome.delivered:
        kind = "delivered"
        values |= {"delivered_at": now, "next_attempt_at": None}
    elif now - delivery.created_at >= RETRY_FOR:
        kind = "given-up"
        values |= {"given_up_at": now, "next_attempt_at": None}
        log.warning(
            "gave up webhook delivery %s to %s after %d attempts: %s",
            delivery.id,
            delivery.url,
            delivery.attempts,
            outcome.error,
        )
    else:
        kind = "failed"
        values["next_attempt_at"] = now + backoff(delivery.attempts)
    with state.db.write() as conn:
        # A hook removed meanwhile took its deliveries with it: nothing to update then.
        conn.execute(
            update(webhook_deliveries).where(webhook_deliveries.c.id == delivery.id).values(values)
        )
    WEBHOOK_DELIVERIES.labels(kind).inc()
    return kind


async def _attempt(state: ServerState, client: httpx.AsyncClient, delivery: Claimed) -> None:
    outcome = await send(client, delivery)
    await asyncio.to_thread(record, state, delivery, outcome)


async def delivery_pass(state: ServerState, client: httpx.AsyncClient) -> int:
    """Send every delivery due now (in batches); how many were attempted."""
    attempted = 0
    while True:
        claimed = await asyncio.to_thread(claim_due, state)
        if not claimed:
            return attempted
        await asyncio.gather(*(_attempt(state, client, d) for d in claimed))
        attempted += len(claimed)
        if len(claimed) < BATCH:
            return attempted


async def deliver_forever(state: ServerState) -> None:
    """Every second, in the process holding the webhooks lock: deliver what is due; every
    re-signing interval, queue the `keys.expiring` events that are due."""
    lock = ResignerLock(state.db, WEBHOOKS)
    loop = asyncio.get_running_loop()
    next_expiry_check = next_lock_try = 0.0
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            while True:
                # The holder checks its lock every pass (on PostgreSQL a query on the
                # connection holding it); a process standing by tries to take it less
                # often, each try being a new connection.
                turn = lock.held or loop.time() >= next_lock_try
                if turn and not await asyncio.to_thread(lock.take):
                    next_lock_try = loop.time() + LOCK_RETRY_SECONDS
                if lock.held:
                    try:
                        if loop.time() >= next_expiry_check:
                            next_expiry_check = (
                                loop.time() + state.settings.resign_interval.total_seconds()
                            )
                            await asyncio.to_thread(check_expiring_keys, state)
                        await delivery_pass(state, client)
                    except Exception:
                        log.exception("webhook delivery pass failed; trying again in 1 s")
                await asyncio.sleep(CADENCE_SECONDS)
    finally:
        await asyncio.to_thread(lock.release)
