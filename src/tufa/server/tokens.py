"""API tokens: factory tokens (created with scopes and an optional expiry, listed,
revoked) and the operator token (created on first start, rotated)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, insert, update

from tufa.server.db import tokens
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
    token = NewToken(id=f"tok_{secrets.token_hex(8)}", secret=secret or new_secret(TOKEN_PREFIX))
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
