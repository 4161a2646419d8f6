"""API tokens: factory tokens (created with scopes and an optional expiry, listed,
revoked) and the operator token (created on first start, rotated)."""

from __future__ import annotations

import os
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


# A chosen operator token must carry enough to be a secret; at most what a header holds.
MIN_OPERATOR_TOKEN = 32
MAX_OPERATOR_TOKEN = 256


def chosen_operator_token() -> str | None:
    """TUFA_OPERATOR_TOKEN, if set: refused unless it is long enough to be a secret
    (the server stores a fast SHA-256 of it, ADR 0005) and fits an HTTP header."""
    chosen = os.environ.get("TUFA_OPERATOR_TOKEN") or None
    if chosen is None:
        return None
    if not secret_shaped(chosen):
        raise RuntimeError(
            f"TUFA_OPERATOR_TOKEN must be {MIN_OPERATOR_TOKEN} to {MAX_OPERATOR_TOKEN} "
            f"printable ASCII characters without spaces; it has {len(chosen)} characters. "
            "Choose a random one, e.g. tufa_$(openssl rand -base64 32 | tr '+/' '-_' | "
            "tr -d '='), or unset it to have the server generate one (if the server's "
            "operator token is this short one, replace it: `tufa-server "
            "rotate-operator-token`)"
        )
    return chosen


def secret_shaped(chosen: str) -> bool:
    """Long enough to be a secret (stored as a fast SHA-256, ADR 0005), fits a header."""
    return (
        MIN_OPERATOR_TOKEN <= len(chosen) <= MAX_OPERATOR_TOKEN
        and chosen.isascii()
        and chosen.isprintable()
        and " " not in chosen
    )


def has_operator_token(conn: Connection) -> bool:
    live = select(tokens.c.id).where(
        tokens.c.scopes == OPERATOR_SCOPE, tokens.c.revoked_at.is_(None)
    )
    return conn.execute(live.limit(1)).first() is not None


def ensure_operator_token(conn: Connection, now: datetime, chosen: str | None) -> str | None:
    """Create the operator token on first start; return its secret if it must be shown."""
    if has_operator_token(conn):
        return None
    token = create_operator_token(conn, now, chosen)
    return None if chosen else token.secret
