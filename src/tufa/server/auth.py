"""Who is calling, over HTTP: the bearer secret of a request, and what its caller may do.

Every request authenticates with `Authorization: Bearer SECRET`; `principals.py`
tells who holds the secret. The operator token creates factories and nothing else;
factory tokens carry scopes; a device credential reads its own factory's metadata and
targets for its own channel, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping

from tufa.server.errors import ApiError
from tufa.server.principals import Principal, Scope


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def bearer_secret(headers: Mapping[str, str]) -> str | None:
    """The secret of the request's `Authorization: Bearer` header; None if it has none."""
    header = headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized("the Authorization header must be 'Bearer TOKEN'")
    return secret.strip()


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
