"""API tokens: factory tokens (created with scopes and an optional expiry, listed,
revoked) and the operator token (created on first start, rotated)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from tufa.core.api_paths import REVOKE_BY_ID_HINT, TOKEN_ID_PREFIX
from tufa.server.db import tokens
from tufa.server.exceptions import NotFound
from tufa.server.principals import OPERATOR_SCOPE
from tufa.server.secrets import new_secret, secret_digest

TOKEN_PREFIX = "tufa"  # noqa: S105 (a label, not a secret)


@dataclass(frozen=True)
class NewToken:
    id: str
    secret: str


def create_token(
    conn: Connection,
    factory_id: int | None,
    scopes: list[str],
    description: str,
    now: datetime,
    expires_at: datetime | None = None,
    secret: str | None = None,
) -> NewToken:
    """Store a token (only its digest is kept) and return its one-time secret."""
    token = NewToken(
        id=f"{TOKEN_ID_PREFIX}{secrets.token_hex(8)}", secret=secret or new_secret(TOKEN_PREFIX)
    )
    conn.execute(
        insert(tokens).values(
            id=token.id,
            factory_id=factory_id,
            secret_sha256=secret_digest(token.secret),
            scopes=",".join(scopes),
            description=description,
            created_at=now,
            expires_at=expires_at,
        )
    )
    return token


def create_operator_token(conn: Connection, now: datetime, secret: str | None) -> NewToken:
    return create_token(conn, None, [OPERATOR_SCOPE], "server operator", now, secret=secret)


def rotate_operator_token(conn: Connection, now: datetime) -> NewToken:
    """Replace the operator token in one transaction: the old one is refused from the
    moment this commits, on every replica (revoked, so its holder is told why)."""
    conn.execute(
        update(tokens)
        .where(tokens.c.scopes == OPERATOR_SCOPE, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return create_operator_token(conn, now, None)


def token_row(conn: Connection, token_id: str) -> Row[Any]:
    return conn.execute(select(tokens).where(tokens.c.id == token_id)).one()


def factory_tokens(conn: Connection, factory_id: int) -> list[Row[Any]]:
    """The factory's tokens, oldest first (revoked and expired ones too)."""
    return list(
        conn.execute(
            select(tokens)
            .where(tokens.c.factory_id == factory_id)
            .order_by(tokens.c.created_at, tokens.c.id)
        ).all()
    )


def revoke_token(conn: Connection, factory_id: int, token_id: str, now: datetime) -> Row[Any]:
    """Refuse the token from now on, on every replica; revoking it again changes nothing."""
    if not token_id.startswith(TOKEN_ID_PREFIX):
        raise NotFound(REVOKE_BY_ID_HINT)
    where = (tokens.c.id == token_id, tokens.c.factory_id == factory_id)
    row = conn.execute(select(tokens).where(*where)).first()
    if row is None:
        raise NotFound(f"no token {token_id!r} in this factory")
    if row.revoked_at is None:
        conn.execute(update(tokens).where(*where).values(revoked_at=now))
    return conn.execute(select(tokens).where(*where)).one()
