"""Bad input: every refusal is a JSON error naming the problem, and writes nothing.

Each case is one request by an allowed caller that the server must refuse with the
right status (400, 404, 409, 413, ...), the JSON error body {"error": {status, code,
message}} whose message names the problem (a field, a name, the limit), and a
database left row-for-row as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import Factory, Server, assert_error, create_factory, dump_database, send

LIMIT = 1024 * 1024  # the server's request body limit
FACTORY = "<factory>"  # stands for the test factory's name in paths, bodies and messages
DEVICE = {"name": "dev-1", "hardware_id": "rpi4", "tag": "main", "channel": "ci"}
TAKEN_DEVICE = "taken"  # a device of the test factory that already exists
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str  # "<factory>" is replaced by the test factory's name
    status: int
    message: str  # a substring the error message must contain
    json: Any = None  # a JSON body...
    content: bytes | Callable[[], Iterator[bytes]] | None = None  # ...or raw bytes, or chunks
    caller: str = "admin"  # "admin" (of the test factory), "operator" or "anonymous"
    headers: dict[str, str] = field(default_factory=dict)


def _chunks(total: int, size: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A body sent chunked (no Content-Length), `total` bytes in all."""

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            chunk = b" " * min(size, total - sent)
            sent += len(chunk)
            yield chunk

    return chunks


def _padded_to(size: int, body: bytes) -> bytes:
    """`body` (a JSON object) with whitespace up to exactly `size` bytes: still valid JSON."""
    return body[:-1] + b" " * (size - len(body)) + b"}"


FACTORIES = "/api/v1/factories"
F = f"/api/v1/factories/{FACTORY}"


def _create(case_id: str, status: int, message: str, body: Any = None, **kw: Any) -> Case:
    """POST /factories by the operator."""
    return Case(
        f"factory-{case_id}", "POST", FACTORIES, status, message, body, caller="operator", **kw
    )


def _name(name: str) -> Case:
    return _create(f"name-{name!r}", 400, "'name'", {"name": name})


def _patch(case_id: str, message: str, body: Any = None, **kw: Any) -> Case:
    return Case(f"patch-{case_id}", "PATCH", F, 400, message, body, **kw)


def _token(case_id: str, body: Any, message: str, status: int = 400, **kw: Any) -> Case:
    return Case(f"token-{case_id}", "POST", f"{F}/tokens", status, message, body, **kw)


def _expiry(case_id: str, value: Any) -> Case:
    body = {"scopes": ["read"], "expires_in_seconds": value}
    return _token(f"expiry-{case_id}", body, "'expires_in_seconds'")


def _device(case_id: str, changes: Any, message: str, status: int = 400) -> Case:
    """POST /devices: a valid registration with `changes` (a field set to ... is left out)."""
    body = {k: v for k, v in {**DEVICE, **changes}.items() if v is not ...}
    return Case(f"device-{case_id}", "POST", f"{F}/devices", status, message, body)


def _confirm(case_id: str, body: Any, message: str) -> Case:
    return Case(f"confirm-{case_id}", "POST", f"{F}/keys/archive/confirm", 400, message, body)


def _get(case_id: str, path: str, status: int, message: str, **kw: Any) -> Case:
    return Case(case_id, "GET", path, status, message, **kw)


NUL_DEVICE = "path parameter 'device' contains a NUL character"
NESTED = b"[" * 100_000 + b"]" * 100_000
AT_LIMIT = _padded_to(LIMIT, b'{"name": 5}')
TIMESTAMP = "repo/ci/metadata/timestamp.json"

CASES = [
    # Bodies that are not a JSON object.
    _create("malformed-json", 400, "not valid JSON", content=b'{"name": '),
    _create("not-utf8", 400, "not valid JSON", content=b'{"name": "\xff"}'),
    _create("json-array", 400, "JSON object", ["acme"]),
    _create("json-string", 400, "JSON object", "acme"),
    _create("json-nested-too-deep", 400, "JSON", content=NESTED),
    _patch("malformed-json", "not valid JSON", content=b"{anonymous_read: true}"),
    _patch("json-array", "JSON object", [{"anonymous_read": True}]),
    _token("json-array", ["read"], "JSON object"),
    _token("malformed-json", None, "not valid JSON", content=b'{"scopes": ["read"],}'),
    Case("device-json-array", "POST", f"{F}/devices", 400, "JSON object", [DEVICE]),
    _confirm("json-array", ["0" * 64], "JSON object"),
    # Factory names.
    _create("name-number", 400, "'name'", {"name": 5}),
    _create("name-missing", 400, "'name'", {}),
    _create("name-null", 400, "'name'", {"name": None}),
    *(_name(n) for n in ("", "x", "Acme", "-acme", "acme_1", "ac me", "acmé", "a/b", "a" * 64)),
    _name("acme\n"),
    _name("\nacme"),
    _create("duplicate", 409, FACTORY, {"name": FACTORY}),
    # Factory settings.
    _patch("anonymous-read-string", "'anonymous_read'", {"anonymous_read": "yes"}),
    _patch("anonymous-read-number", "'anonymous_read'", {"anonymous_read": 1}),
    _patch("anonymous-read-missing", "'anonymous_read'", {}),
    _patch("unknown-field", "public", {"anonymous_read": True, "public": True}),
    # Tokens.
    _token("scopes-string", {"scopes": "admin"}, "'scopes'"),
    _token("scopes-missing", {}, "'scopes'"),
    _token("scopes-empty", {"scopes": []}, "'scopes'"),
    _token("scopes-number", {"scopes": [5]}, "'scopes'"),
    _token("scope-unknown", {"scopes": ["superuser"]}, "'scopes'"),
    _token("scope-operator", {"scopes": ["operator"]}, "'scopes'"),
    _token("scope-wrong-case", {"scopes": ["read", "Admin"]}, "'scopes'"),
    _expiry("bool", True),
    _expiry("string", "60"),
    _expiry("float", 1.5),
    _expiry("negative", -1),
    _expiry("over-ten-years", 3651 * 86400),
    _expiry("huge", 10**20),
    _token("description-number", {"scopes": ["read"], "description": 5}, "'description'"),
    _token(
        "description-too-long", {"scopes": ["read"], "description": "d" * 1000}, "'description'"
    ),
    _token("description-nul", {"scopes": ["read"], "description": "a\x00b"}, "'description'"),
    Case(
        "token-revoke-unknown",
        "DELETE",
        f"{F}/tokens/tok_0000000000000000",
        404,
        "tok_0000000000000000",
    ),
    # Devices.
    _device("name-number", {"name": 5}, "'name'"),
    _device("name-blank", {"name": "   "}, "'name'"),
    _device("name-too-long", {"name": "n" * 129}, "'name'"),
    _device("name-control-char", {"name": "a\nb"}, "'name'"),
    _device("hardware-id-missing", {"hardware_id": ...}, "'hardware_id'"),
    _device("hardware-id-list", {"hardware_id": ["rpi4"]}, "'hardware_id'"),
    _device("tag-empty", {"tag": ""}, "'tag'"),
    _device("channel-unknown", {"channel": "beta"}, "'channel'"),
    _device("channel-wrong-case", {"channel": "CI"}, "'channel'"),
    _device("channel-number", {"channel": 1}, "'channel'"),
    _device("channel-missing", {"channel": ...}, "'channel'"),
    _device("duplicate-name", {"name": TAKEN_DEVICE}, TAKEN_DEVICE, 409),
    _device("duplicate-name-padded", {"name": f"  {TAKEN_DEVICE} "}, TAKEN_DEVICE, 409),
    _get("device-unknown", f"{F}/devices/no-such-device", 404, "no-such-device"),
    # Revoking or deleting a device that is not there (names have no NUL: none matches).
    Case("revoke-unknown", "POST", f"{F}/devices/no-such-device/revoke", 404, "no-such-device"),
    Case("revoke-nul", "POST", f"{F}/devices/{TAKEN_DEVICE}%00/revoke", 400, NUL_DEVICE),
    Case("delete-unknown", "DELETE", f"{F}/devices/no-such-device", 404, "no-such-device"),
    Case("delete-nul", "DELETE", f"{F}/devices/a%00b", 400, NUL_DEVICE),
    _get("device-nul", f"{F}/devices/a%00b", 400, NUL_DEVICE),
    # Keys archive: a wrong digest must not delete the only copy.
    _confirm("wrong-sha256", {"sha256": "0" * 64}, "sha256 does not match"),
    _confirm("sha256-number", {"sha256": 5}, "'sha256'"),
    _confirm("sha256-missing", {}, "'sha256'"),
    # Unknown factory: refused without revealing whether it exists, as for any factory
    # the credential is not for (403 to a token of another factory, 401 anonymously).
    _get("unknown-factory", f"{FACTORIES}/no-such-factory", 403, "'no-such-factory'"),
    _get(
        "unknown-factory-operator",
        f"{FACTORIES}/no-such-factory",
        403,
        "operator",
        caller="operator",
    ),
    _get(
        "unknown-factory-metadata",
        f"{FACTORIES}/no-such-factory/{TIMESTAMP}",
        401,
        "'no-such-factory'",
        caller="anonymous",
    ),
    # Unknown channels and metadata files.
    _get("metadata-unknown-channel", f"{F}/repo/beta/metadata/timestamp.json", 404, "'beta'"),
    _get("metadata-unknown-version", f"{F}/repo/ci/metadata/9.root.json", 404, "9.root.json"),
    _get("metadata-not-tuf", f"{F}/repo/prod/metadata/secrets.json", 404, "secrets.json"),
    _get("metadata-version-zero", f"{F}/repo/ci/metadata/0.targets.json", 404, "0.targets.json"),
    # Unknown routes and methods.
    _get("unknown-route", "/api/v1/nothing-here", 404, "no API route matches '/api/v1/nothing"),
    Case(
        "wrong-method",
        "PUT",
        FACTORIES,
        405,
        "Method Not Allowed",
        {"name": "acme"},
        caller="operator",
    ),
    # Malformed credentials.
    _get(
        "auth-basic", F, 401, "Bearer", caller="anonymous", headers={"Authorization": "Basic YTpi"}
    ),
    _get(
        "auth-empty-bearer",
        F,
        401,
        "Bearer",
        caller="anonymous",
        headers={"Authorization": "Bearer"},
    ),
    # Oversized bodies: 1 MiB is the limit, with or without a Content-Length.
    _create("oversized-content-length", 413, str(LIMIT), content=b" " * (LIMIT + 1)),
    _create("oversized-chunked", 413, str(LIMIT), content=_chunks(LIMIT + 1)),
    _token("oversized-chunked", None, str(LIMIT), content=_chunks(4 * LIMIT), status=413),
    _token("oversized-content-length", None, str(LIMIT), content=b" " * (2 * LIMIT), status=413),
    # Exactly at the limit is not too large: the body is read, and its name refused.
    _create("at-limit-content-length", 400, "'name'", content=AT_LIMIT),
    _create("at-limit-chunked", 400, "'name'", content=lambda: iter([AT_LIMIT])),
]


@pytest.fixture(scope="module")
def target(server: Server) -> Factory:
    """A factory on the shared server with one device already registered."""
    factory = create_factory(server)
    factory.register_device("ci", name=TAKEN_DEVICE)
    return factory


def _fill(value: Any, name: str) -> Any:
    if isinstance(value, str):
        return value.replace(FACTORY, name)
    if isinstance(value, dict):
        return {k: _fill(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, name) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_writes_nothing(
    server: Server, target: Factory, case: Case
) -> None:
    token = {"admin": target.admin_token, "operator": server.operator_token}.get(case.caller)
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.json is not None:
        kwargs["json"] = _fill(case.json, target.name)
    elif callable(case.content):
        kwargs["content"] = case.content()
    elif case.content is not None:
        kwargs["content"] = case.content
    before = dump_database(server)

    response = send(server, case.method, _fill(case.path, target.name), token, **kwargs)

    assert_error(response, case.status, CODES[case.status], _fill(case.message, target.name))
    assert dump_database(server) == before


def test_cases_have_unique_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
