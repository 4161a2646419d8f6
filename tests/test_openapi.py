"""GET /openapi.json: the server's routes as OpenAPI 3.1, and real answers as it says.

The document is read from a real server; its paths and methods are the route table's
(`served_routes`), so a route added or removed without its description fails here, and
the answers of real requests (the main workflows, and refusals) are validated against
the schemas the document gives them.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from starlette.routing import Route

from tests.helpers import Factory, Server, create_factory, path_params, send, served_routes
from tests.test_waves import post_wave, prepared, publish, sign_offline, start_owner
from tufa.server.api.openapi import document
from tufa.server.api.operations import OPERATIONS
from tufa.server.app import ROUTES

F = "/api/v1/factories/{factory}"
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@pytest.fixture(scope="module")
def spec(server: Server) -> dict[str, Any]:
    """The document as the server serves it, to anyone: no credential is sent."""
    response = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def documented_routes(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in set(item) & METHODS
    )


def test_a_route_without_an_entry_in_operations_is_named() -> None:
    """What the server would answer with a 500 (see its log), said here in the test."""
    new = Route("/new", ROUTES[0].endpoint)
    with pytest.raises(LookupError, match=r"GET /new has no entry in operations.OPERATIONS"):
        document([*ROUTES, new])


def test_every_route_is_documented_and_nothing_else(spec: dict[str, Any]) -> None:
    assert documented_routes(spec) == served_routes()
    assert set(OPERATIONS) == set(served_routes()), "entries of operations.py without a route"
    for path, item in spec["paths"].items():
        assert [p["name"] for p in item.get("parameters", [])] == path_params(path), path
        assert all(p["in"] == "path" and p["required"] for p in item.get("parameters", []))
    operations = [op for item in spec["paths"].values() for m, op in item.items() if m in METHODS]
    assert len({op["operationId"] for op in operations}) == len(operations)
    for op in operations:
        assert op["summary"], op["operationId"]
        assert "400" in op["responses"], op["operationId"]


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(spec).validate()


def test_the_document_says_who_may_call_and_how_refusals_look(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert set(schemes) == {"operatorToken", "factoryToken", "deviceCredential", "metricsToken"}
    paths = spec["paths"]
    assert paths["/api/v1/factories"]["post"]["security"] == [{"operatorToken": []}]
    assert paths[f"{F}/devices"]["post"]["security"] == [{"factoryToken": ["admin", "register"]}]
    assert paths[f"{F}/device-reports"]["post"]["security"] == [{"deviceCredential": []}]
    assert {} in paths[f"{F}/repo/{{channel}}/metadata/{{filename}}"]["get"]["security"]
    assert paths["/openapi.json"]["get"]["security"] == []
    refused = paths[f"{F}/waves"]["post"]["responses"]["409"]
    assert refused["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    # Summaries are the endpoints' docstrings where they have one.
    revoke = paths[f"{F}/devices/{{device}}/revoke"]["post"]
    assert revoke["summary"] == (
        "Refuse the device's credentials from now on, on every replica (no cache)"
    )


def assert_documented(
    spec: dict[str, Any], method: str, template: str, response: httpx.Response
) -> Any:
    """`response` (to `method template`) has a documented status, and its JSON body is
    valid against the schema the document gives that status; returns the body."""
    operation = spec["paths"][template][method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {template}: {response.status_code} undocumented"
    schema = documented["content"][response.headers["content-type"]]["schema"]
    # The whole document is the root the references (#/components/...) resolve against.
    validator = Draft202012Validator({**schema, "components": spec["components"]})
    body = response.json()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{method} {template} {response.status_code}: {errors}"
    return body


def call(
    spec: dict[str, Any],
    factory: Factory,
    method: str,
    template: str,
    token: str | None = None,
    json: Any = None,
    **fields: str,
) -> Any:
    """`method template` (its fields filled in) with `json` as the body, by `token` (the
    admin token if None); the answer's body, checked against the document."""
    path = template.format(factory=factory.name, **fields)
    response = send(factory.server, method, path, token or factory.admin_token, json=json)
    return assert_documented(spec, method, template, response)


def test_factory_and_device_answers_are_as_documented(spec: dict[str, Any], server: Server) -> None:
    name = f"oa-{secrets.token_hex(4)}"
    created = send(server, "POST", "/api/v1/factories", server.operator_token, json={"name": name})
    body = assert_documented(spec, "POST", "/api/v1/factories", created)
    factory = Factory(server, body["name"], body["admin_token"])
    listed = send(server, "GET", "/api/v1/factories", server.operator_token)
    assert_documented(spec, "GET", "/api/v1/factories", listed)
    call(spec, factory, "GET", F)
    call(spec, factory, "PATCH", F, json={"anonymous_read": False})
    token = call(spec, factory, "POST", f"{F}/tokens", json={"scopes": ["register"]})
    call(spec, factory, "GET", f"{F}/tokens")
    device_body = {"name": "d-1", "hardware_id": "rpi4", "tag": "main", "channel": "prod"}
    device = call(spec, factory, "POST", f"{F}/devices", token["token"], json=device_body)
    credential = device["credential"]
    call(spec, factory, "GET", f"{F}/devices")
    call(spec, factory, "GET", f"{F}/device-credential", credential)
    report = {"installed": None, "events": [{"id": "e-1", "at": "2026-12-01T10:00:00Z",
              "kind": "download-started", "detail": ""}]}  # fmt: skip
    call(spec, factory, "POST", f"{F}/device-reports", credential, json=report)
    call(spec, factory, "GET", f"{F}/devices/{{device}}", device="d-1")
    # A poll, as a device makes it: TUF metadata.
    metadata = f"{F}/repo/{{channel}}/metadata/{{filename}}"
    call(spec, factory, "GET", metadata, credential, channel="prod", filename="timestamp.json")
    call(spec, factory, "DELETE", f"{F}/tokens/{{token_id}}", token_id=token["id"])
    call(spec, factory, "POST", f"{F}/keys/updates", json={"message": "try"})
    call(spec, factory, "DELETE", f"{F}/keys/updates")


def test_refusals_are_as_documented(spec: dict[str, Any], factory: Factory) -> None:
    server = factory.server
    for response, template, status in (
        (send(server, "GET", factory.path("/devices/nope"), factory.admin_token),
         f"{F}/devices/{{device}}", 404),
        (send(server, "POST", factory.path("/devices"), factory.admin_token, json={}),
         f"{F}/devices", 400),
        (send(server, "GET", factory.path("/tokens")), f"{F}/tokens", 401),
        (send(server, "POST", "/api/v1/factories", factory.admin_token, json={"name": "x1"}),
         "/api/v1/factories", 403),
    ):  # fmt: skip
        assert response.status_code == status, response.text
        method = response.request.method
        assert assert_documented(spec, method, template, response)["error"]["status"] == status


def test_publish_and_wave_answers_are_as_documented(
    spec: dict[str, Any], server: Server, tmp_path: Path
) -> None:
    factory = create_factory(server)
    data = b"firmware\n" * 100
    sha256 = hashlib.sha256(data).hexdigest()
    blob = send(server, "PUT", factory.path(f"/blobs/{sha256}"), factory.admin_token, content=data)
    assert_documented(spec, "PUT", f"{F}/blobs/{{sha256}}", blob)
    publish(factory, "1")
    call(spec, factory, "GET", f"{F}/targets")
    call(spec, factory, "GET", f"{F}/targets/{{name}}", name="image-1")
    call(spec, factory, "POST", f"{F}/targets/prune", json={"keep": 5})
    owner = start_owner(factory, tmp_path / "owner")
    md = prepared(factory, "1")
    sign_offline(owner, md)
    assert_documented(spec, "POST", f"{F}/waves", post_wave(factory, "w-1", "1", md))
    call(spec, factory, "GET", f"{F}/waves")
    call(spec, factory, "GET", f"{F}/waves/{{name}}", name="w-1")
    call(spec, factory, "POST", f"{F}/device-groups", json={"name": "g"})
    factory.register_device("prod", "p-1")
    added = {"devices": ["p-1"]}
    call(spec, factory, "POST", f"{F}/device-groups/{{group}}/devices", group="g", json=added)
    call(spec, factory, "GET", f"{F}/device-groups")
    rollout = {"group": "g", "dry_run": True}
    call(spec, factory, "POST", f"{F}/waves/{{name}}/rollout", name="w-1", json=rollout)
    call(spec, factory, "POST", f"{F}/waves/{{name}}/complete", name="w-1")
