"""Webhooks: a factory's subscriptions to its events, and the outbox of their deliveries.

`emit` is how the server tells the world that something happened: it inserts one
delivery per hook of the factory subscribed to the event, in the caller's transaction,
so a delivery exists exactly when what it reports was committed (ADR 0017). Nothing is
sent there: the deliverer (webhook_delivery.py) sends what is due from the outbox, in
one process, and retries until the receiver answers 2xx or a day has passed.

Each hook has a secret that signs its deliveries (HMAC-SHA256 of the body). The server
must keep it to sign, so it is stored encrypted under the master key, as online keys
are, and shown once: when the server generated it, in the answer that created the hook.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import (
    Column,
    Connection,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from tufa.server.db import factories, schema
from tufa.server.exceptions import InvalidInput, NotFound
from tufa.server.secrets import MasterKey, new_secret
from tufa.server.settings import Clock
from tufa.server.sql_types import UTCDateTime

# The events a hook may subscribe to. The wave events are emitted by staged rollouts.
EVENTS: tuple[str, ...] = (
    "wave.halted",
    "wave.advanced",
    "wave.completed",
    "device.first-seen",
    "device.install-failed",
    "keys.expiring",
)
# What `tufa webhooks test` sends; every hook receives it, whatever it subscribed to.
TEST_EVENT = "webhook.test"
HOOK_ID_PREFIX = "wh_"
SECRET_PREFIX = "whsec"  # noqa: S105 (a label, not a secret)
MIN_SECRET = 16
MAX_SECRET = 200
MAX_URL = 2000
MAX_KEY = 200

webhooks = Table(
    "webhooks",
    schema,
    Column("id", String(32), primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    # Comma-separated, in the order of EVENTS.
    Column("events", String(400), nullable=False),
    Column("secret_encrypted", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# The outbox and the delivery log in one: a row is due while `next_attempt_at` is set
# and has passed; delivered or given up, it stays as the log's entry.
webhook_deliveries = Table(
    "webhook_deliveries",
    schema,
    Column("id", String(32), primary_key=True),  # uuid4 hex, sent as X-Tufa-Delivery
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False),
    Column("hook_id", String(32), ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("event", String(64), nullable=False),
    # What `emit(key=...)` de-duplicates on: at most one delivery per hook and key.
    Column("dedupe_key", String(MAX_KEY)),
    Column("body", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    Column("delivered_at", UTCDateTime),
    Column("given_up_at", UTCDateTime),
    Column("last_status", Integer),
    Column("last_error", Text),
    UniqueConstraint("hook_id", "dedupe_key", name="uq_webhook_deliveries_hook_id_dedupe_key"),
    Index("ix_webhook_deliveries_next_attempt_at", "next_attempt_at"),
    Index("ix_webhook_deliveries_hook_id_created_at", "hook_id", "created_at"),
)

# Whose clock stamps a delivery: the server's (settings.clock), set as the application
# starts (app.create_app), so that due-ness and the payload's time follow tests that
# move it. `emit` is called deep in domain code that is given no settings.
_clock: Clock = Clock()


def use_clock(clock: Clock) -> None:
    global _clock
    _clock = clock


def signature(secret: bytes, body: bytes) -> str:
    """The X-Tufa-Signature header of `body`: `sha256=` and the HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _secret_purpose(hook_id: str) -> str:
    return f"webhook-secret:{hook_id}"


def hook_secret(master_key: MasterKey, hook_id: str, encrypted: bytes) -> bytes:
    return master_key.decrypt(encrypted, _secret_purpose(hook_id))


# -- checking what a caller asks for ----------------------------------------------------


def checked_url(url: str) -> str:
    if len(url) > MAX_URL or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidInput(
            f"field 'url' must be at most {MAX_URL} printable characters without spaces"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as e:
        raise InvalidInput(f"field 'url' is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            "field 'url' must be an http:// or https:// URL with a host, "
            "e.g. https://hooks.example.com/tufa"
        )
    try:  # what the deliverer's HTTP client will make of it (IDNA host names, say)
        httpx.URL(url)
    except Exception as e:
        raise InvalidInput(f"field 'url' is not a URL that can be sent to: {e}") from e
    return url


def checked_events(events: list[str]) -> list[str]:
    if not events:
        raise InvalidInput(f"field 'events' must name at least one of: {', '.join(EVENTS)}")
    for event in events:
        if event not in EVENTS:
            raise InvalidInput(
                f"field 'events' names an unknown event {event!r}; valid events: "
                f"{', '.join(EVENTS)}"
            )
    return [e for e in EVENTS if e in events]


def checked_secret(secret: str) -> str:
    if not MIN_SECRET <= len(secret) <= MAX_SECRET or not secret.isprintable():
        raise InvalidInput(
            f"field 'secret' must be {MIN_SECRET}-{MAX_SECRET} printable characters "
            "(or leave it out, and the server generates one)"
        )
    return secret


# -- hooks ------------------------------------------------------------------------------


def add_hook(
    conn: Connection,
    master_key: MasterKey,
    factory_id: int,
    url: str,
    events: list[str],
    secret: str | None,
    now: datetime,
) -> tuple[Row[Any], str | None]:
    """Store a hook; returns its row and the secret the server generated (None when the
    caller chose it)."""
    hook_id = f"{HOOK_ID_PREFIX}{secrets.token_hex(8)}"
    generated = None if secret is not None else new_secret(SECRET_PREFIX)
    chosen = secret if secret is not None else generated
    assert chosen is not None
    conn.execute(
        insert(webhooks).values(
            id=hook_id,
            factory_id=factory_id,
            url=checked_url(url),
            events=",".join(checked_events(events)),
            secret_encrypted=master_key.encrypt(chosen.encode(), _secret_purpose(hook_id)),
            created_at=now,
        )
    )
    return find_hook(conn, factory_id, hook_id), generated


def list_hooks(conn: Connection, factory_id: int) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(webhooks)
            .where(webhooks.c.factory_id == factory_id)
            .order_by(webhooks.c.created_at, webhooks.c.id)
        ).all()
    )


def find_hook(conn: Connection, factory_id: int, hook_id: str) -> Row[Any]:
    row = conn.execute(
        select(webhooks).where(webhooks.c.factory_id == factory_id, webhooks.c.id == hook_id)
    ).first()
    if row is None:
        raise NotFound(f"no webhook {hook_id!r} in this factory; `tufa webhooks list` shows them")
    return row


def remove_hook(conn: Connection, factory_id: int, hook_id: str) -> Row[Any]:
    """Delete a hook; its deliveries, queued or done, go with it."""
    row = find_hook(conn, factory_id, hook_id)
    conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.hook_id == hook_id))
    conn.execute(delete(webhooks).where(webhooks.c.id == hook_id))
    return row


def hook_events(hook: Row[Any]) -> list[str]:
    return [e for e in hook.events.split(",") if e]


# -- the outbox -------------------------------------------------------------------------


def emit(
    conn: Connection,
    factory_id: int,
    event: str,
    data: dict[str, Any],
    *,
    key: str | None = None,
) -> None:
    """Queue a delivery of `event` to every hook of the factory subscribed to it, in the
    caller's transaction. With `key`, a hook that already has a delivery of that key
    (queued, delivered or given up) gets none."""
    assert event in EVENTS, f"unknown webhook event {event!r}"
    assert key is None or len(key) <= MAX_KEY, key
    hooks = [h for h in list_hooks(conn, factory_id) if event in hook_events(h)]
    if hooks:
        _queue(conn, factory_id, hooks, event, data, key)


def queue_test(conn: Connection, factory_id: int, hook_id: str) -> str:
    """Queue a `webhook.test` delivery to one hook; returns the delivery's id."""
    hook = find_hook(conn, factory_id, hook_id)
    data = {"hook": hook.id, "message": "a test delivery, sent by `tufa webhooks test`"}
    return _queue(conn, factory_id, [hook], TEST_EVENT, data, None)[0]


def _queue(
    conn: Connection,
    factory_id: int,
    hooks: list[Row[Any]],
    event: str,
    data: dict[str, Any],
    key: str | None,
) -> list[str]:
    now = _clock.now()
    factory = conn.execute(select(factories.c.name).where(factories.c.id == factory_id)).scalar()
    rows = []
    for hook in hooks:
        delivery_id = uuid.uuid4().hex
        payload = {
            "id": delivery_id,
            "event": event,
            "factory": factory,
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "data": data,
        }
        rows.append(
            {
                "id": delivery_id,
                "factory_id": factory_id,
                "hook_id": hook.id,
                "event": event,
                "dedupe_key": key,
                "body": json.dumps(payload, separators=(",", ":"), sort_keys=True),
                "created_at": now,
                "attempts": 0,
                "next_attempt_at": now,
            }
        )
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # A key queued before inserts nothing, even when two transactions race to queue it.
    conn.execute(dialect.insert(webhook_deliveries).on_conflict_do_nothing(), rows)
    return [row["id"] for row in rows]


def deliveries(conn: Connection, factory_id: int, hook_id: str, limit: int) -> list[Row[Any]]:
    """The hook's delivery log, newest first."""
    find_hook(conn, factory_id, hook_id)
    return list(
        conn.execute(
            select(webhook_deliveries)
            .where(webhook_deliveries.c.hook_id == hook_id)
            .order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id)
            .limit(limit)
        ).all()
    )
