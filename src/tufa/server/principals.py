"""Who is calling: the operator, a factory token with its scopes, or a device.

A caller is known by the secret it sends (`tufa.server.auth` reads it from the
request). Nothing here is cached: every call reads the database. The poll path keeps
what it read here in `poll_cache.py`, valid only while the factory's generation stands
still, so a revocation (of a token, a device, an operator token) still holds at once on
every server replica sharing the database.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, select

from tufa.core.metadata import Channel
from tufa.server.db import devices, factories, retired_credentials, tokens
from tufa.server.exceptions import CredentialRevoked, NotAuthenticated
from tufa.server.secrets import secret_digest

OPERATOR_SCOPE = "operator"
# Who a caller is: the server operator, a factory token, or a device credential.
PrincipalKind = Literal["operator", "token", "device"]


class Scope(StrEnum):
    """What a factory token may do."""

    ADMIN = "admin"  # everything in the factory, including keys and tokens
    CI = "ci"  # publish CI targets, read the factory
    READ = "read"  # read-only: factory, devices, metadata
    REGISTER = "register"  # register devices, nothing else


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    factory_id: int | None = None
    factory_name: str | None = None
    scopes: frozenset[str] = frozenset()
    device_id: str | None = None
    channel: Channel | None = None  # a device's
    view: str = ""
    # A device that presented the credential a rotation issued, for the first time: the
    # caller must adopt it (`credentials.settle`), which retires the old one.
    credential_pending: bool = False
    expires_at: datetime | None = None  # a token's
    token_id: str | None = None  # an operator's or a factory token's (tok_...)

    @property
    def caller_id(self) -> str | None:
        """What the access log names the caller by: never its secret."""
        return self.device_id or self.token_id


class CallerSeen:
    """Who the request being served authenticated as, once it did: what the access log
    tells. Filled in wherever the request's caller is authenticated (in a handler's
    thread, or from the poll cache), which the access log cannot see."""

    __slots__ = ("principal",)

    def __init__(self) -> None:
        self.principal: Principal | None = None


_request_caller: ContextVar[CallerSeen | None] = ContextVar("tufa_request_caller", default=None)


def watch_caller() -> CallerSeen:
    """Start noting the caller of the request this task serves; threads the request
    runs work in share what is noted (their contexts are copies of this one)."""
    seen = CallerSeen()
    _request_caller.set(seen)
    return seen


def note_caller(principal: Principal) -> None:
    seen = _request_caller.get()
    if seen is not None:
        seen.principal = principal


def _when(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _revoked_device_message(revoked_at: datetime) -> str:
    return (
        f"this device credential was revoked on {_when(revoked_at)} by a factory admin "
        "(`tufa devices revoke`)"
    )


def _retired_message(row: Any) -> str:
    when = _when(row.retired_at)
    if row.reason == "deleted":
        return (
            f"this device credential was revoked: device {row.device_name!r} was deleted from "
            f"the factory on {when}"
        )
    if row.reason == "superseded":
        return (
            "this device credential was revoked: a later rotation replaced it on "
            f"{when}, before it was ever used; use the newest credential"
        )
    return (
        f"this device credential was revoked: it was replaced on {when} by a newer one "
        "(`tufa-agent rotate-credential`). If this device did not rotate it, someone else "
        f"holds its credential: a factory admin should run `tufa devices revoke "
        f"{row.device_name}`"
    )


# Built once: every request runs one of these.
_TOKEN_BY_DIGEST = (
    select(tokens, factories.c.name.label("factory_name"))
    .select_from(tokens.outerjoin(factories, tokens.c.factory_id == factories.c.id))
    .where(tokens.c.secret_sha256 == bindparam("digest"))
)
_DEVICE_BY_DIGEST = (
    select(devices, factories.c.name.label("factory_name"))
    .join(factories, devices.c.factory_id == factories.c.id)
    .where(
        (devices.c.secret_sha256 == bindparam("digest"))
        | (devices.c.pending_secret_sha256 == bindparam("digest"))
    )
)
_RETIRED_BY_DIGEST = select(retired_credentials).where(
    retired_credentials.c.secret_sha256 == bindparam("digest")
)


def authenticate(conn: Connection, secret: str, now: datetime) -> Principal:
    """Who holds `secret`: a token, the operator or a device; refused (`NotAuthenticated`,
    `CredentialRevoked`) if it is unknown, expired or revoked."""
    principal = _holder_of(conn, secret, now)
    note_caller(principal)
    return principal


def _holder_of(conn: Connection, secret: str, now: datetime) -> Principal:
    digest = {"digest": secret_digest(secret)}
    row = conn.execute(_TOKEN_BY_DIGEST, digest).first()
    if row is not None:
        scopes = frozenset(row.scopes.split(","))
        if row.revoked_at is not None:
            if OPERATOR_SCOPE in scopes:
                raise NotAuthenticated(
                    f"this operator token was revoked on {_when(row.revoked_at)}, when a new "
                    "one replaced it (`tufa-server rotate-operator-token`); use the new one"
                )
            raise NotAuthenticated("this token was revoked; ask a factory admin for a new one")
        if row.expires_at is not None and row.expires_at <= now:
            raise NotAuthenticated(
                "this token has expired; create a new one with `tufa tokens create`"
            )
        if OPERATOR_SCOPE in scopes:
            return Principal(kind="operator", scopes=scopes, token_id=row.id)
        return Principal(
            kind="token",
            token_id=row.id,
            factory_id=row.factory_id,
            factory_name=row.factory_name,
            scopes=scopes,
            expires_at=row.expires_at,
        )
    device = conn.execute(_DEVICE_BY_DIGEST, digest).first()
    if device is not None:
        if device.revoked_at is not None:
            raise CredentialRevoked(_revoked_device_message(device.revoked_at))
        return Principal(
            kind="device",
            factory_id=device.factory_id,
            factory_name=device.factory_name,
            device_id=device.id,
            channel=Channel(device.channel),
            view=device.view,
            credential_pending=device.secret_sha256 != digest["digest"],
        )
    retired = conn.execute(_RETIRED_BY_DIGEST, digest).first()
    if retired is not None:
        raise CredentialRevoked(_retired_message(retired))
    # Which option or variable held the secret is the client's to say: the admin CLI and
    # the device agent read theirs from different places.
    raise NotAuthenticated("unknown token: no token or credential of this server has this secret")
