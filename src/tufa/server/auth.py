"""Who is calling: bearer tokens (operator, factory-scoped) and device credentials.

Every request authenticates with `Authorization: Bearer SECRET`. The operator token
creates factories and nothing else; factory tokens carry scopes; a device credential
reads its own factory's metadata and targets for its own channel, nothing more.

Nothing here is cached: every request reads the database, so a revocation (of a token,
a device, an operator token) holds at once on every server replica sharing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, select

from tufa.core.metadata import Channel
from tufa.server.db import devices, factories, retired_credentials, tokens
from tufa.server.errors import ApiError
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


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def credential_revoked(message: str) -> ApiError:
    """A device credential that worked once and never will again; its own code, so an
    agent can tell it from a typo'd or unknown credential."""
    return ApiError(401, "credential_revoked", message)


def _when(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def revoked_device_message(revoked_at: datetime) -> str:
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


def bearer_secret(headers: Mapping[str, str]) -> str | None:
    """The secret of the request's `Authorization: Bearer` header; None if it has none."""
    header = headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized("the Authorization header must be 'Bearer TOKEN'")
    return secret.strip()


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
    digest = {"digest": secret_digest(secret)}
    row = conn.execute(_TOKEN_BY_DIGEST, digest).first()
    if row is not None:
        scopes = frozenset(row.scopes.split(","))
        if row.revoked_at is not None:
            if OPERATOR_SCOPE in scopes:
                raise unauthorized(
                    f"this operator token was revoked on {_when(row.revoked_at)}, when a new "
                    "one replaced it (`tufa-server rotate-operator-token`); use the new one"
                )
            raise unauthorized("this token was revoked; ask a factory admin for a new one")
        if row.expires_at is not None and row.expires_at <= now:
            raise unauthorized("this token has expired; create a new one with `tufa tokens create`")
        if OPERATOR_SCOPE in scopes:
            return Principal(kind="operator", scopes=scopes)
        return Principal(
            kind="token", factory_id=row.factory_id, factory_name=row.factory_name, scopes=scopes
        )
    device = conn.execute(_DEVICE_BY_DIGEST, digest).first()
    if device is not None:
        if device.revoked_at is not None:
            raise credential_revoked(revoked_device_message(device.revoked_at))
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
        raise credential_revoked(_retired_message(retired))
    raise unauthorized("unknown token; check --token, TUFA_TOKEN or `tufa login`")


def require_operator(principal: Principal | None) -> Principal:
    if principal is None:
        raise unauthorized("this request needs the operator token")
    if principal.kind != "operator":
        raise forbidden("only the server operator token may do this")
    return principal


def require_factory(
    principal: Principal | None, factory: str, scopes: set[Scope], *, device_reads: bool = False
) -> Principal:
    """The caller, if it may act on `factory` with one of `scopes` (or as a device)."""
    if principal is None:
        raise unauthorized(f"this request needs a token for factory {factory!r}")
    if principal.kind == "operator":
        raise forbidden("the operator token only creates and lists factories; use a factory token")
    if principal.factory_name != factory:
        raise forbidden(f"this credential is not valid for factory {factory!r}")
    if principal.kind == "device":
        if device_reads:
            return principal
        raise forbidden("device credentials may only read their own channel's metadata")
    if principal.scopes & {s.value for s in scopes}:
        return principal
    needed = " or ".join(sorted(s.value for s in scopes))
    raise forbidden(f"this token lacks the scope for this request (needs {needed})")
