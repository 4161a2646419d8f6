"""`/openapi.json`: the API as an OpenAPI 3.1 document, built from the route table the
server serves (paths, methods, path parameters), the endpoints' docstrings (summaries)
and `operations.py` (callers, bodies, answers). Built at the first request, once.

It needs no credential: it describes the routes, which are the same on every server,
and names no factory, device or secret.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.convertors import IntegerConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

import tufa
from tufa.core.api_paths import FACTORY_NAME
from tufa.server.api.json_schema import Components, Schema
from tufa.server.api.operation_kinds import Content, Operation
from tufa.server.api.operations import OPERATIONS
from tufa.server.errors import ErrorBody

SECURITY_SCHEMES = {
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's operator token, printed once when the server first "
        "starts (`tufa-server rotate-operator-token` replaces it).",
    },
    "factoryToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A factory token (`tufa tokens create`); an operation names the "
        "scopes it accepts, any one of which will do.",
    },
    "deviceCredential": {
        "type": "http",
        "scheme": "bearer",
        "description": "A device's credential, issued when it registers (`tufa-agent register`).",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The token of `tufa-server run --metrics-token`: it reads /metrics only.",
    },
}
ERRORS = {
    400: "the request is invalid; the message names the field and the fix",
    401: "no credential, or one that is unknown, expired or revoked",
    403: "the credential may not do this (scope, factory or kind of caller)",
    404: "the factory, or what the path names in it, does not exist",
    409: "the request conflicts with the current state, which it leaves unchanged",
    410: "gone for good",
    413: "the request body is larger than the server's limit",
    503: "not ready: the message says why",
}
PARAMETERS = {
    "factory": "the factory's name",
    "device": "a device's id or name",
    "name": "the name of the wave or target",
    "token_id": "a token's id (tok_...), not its secret",
    "group": "a device group's name",
    "sha256": "the blob's SHA-256, in hex",
    "channel": "ci or prod",
    "filename": "a metadata file name, or a target's consistent-snapshot name",
}
DESCRIPTION = (
    "The API of a tufa server. Every refusal is JSON (the Error schema) that names the "
    "problem and, where there is one, the fix. Every GET also answers HEAD."
)


def document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of `routes`: a LookupError for a route `operations.py` lacks."""
    components = Components()
    error = {"application/json": {"schema": components.schema_of(ErrorBody)}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise TypeError(f"{route!r} is not an HTTP route")
        item = paths.setdefault(route.path, {})
        if route.param_convertors:
            item["parameters"] = _path_parameters(route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = OPERATIONS.get((method, route.path))
            if operation is None:
                raise LookupError(f"{method} {route.path} has no entry in operations.OPERATIONS")
            item[method.lower()] = _operation(route, method, operation, components, error)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tufa", "version": tufa.__version__, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": components.schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def _path_parameters(route: Route) -> list[dict[str, Any]]:
    parameters = []
    for name, convertor in route.param_convertors.items():
        schema: Schema = {
            "type": "integer" if isinstance(convertor, IntegerConvertor) else "string"
        }
        if name == "factory":
            schema["pattern"] = f"^{FACTORY_NAME.pattern}$"
        parameter = {"name": name, "in": "path", "required": True, "schema": schema}
        if name in PARAMETERS:
            parameter["description"] = PARAMETERS[name]
        parameters.append(parameter)
    return parameters


def _operation(
    route: Route,
    method: str,
    operation: Operation,
    components: Components,
    error: dict[str, Any],
) -> dict[str, Any]:
    summary, description = _summary(route, operation)
    answer = _content(operation.answer, components)
    described = operation.answer.description if isinstance(operation.answer, Content) else ""
    responses: dict[str, Any] = {
        str(status): {"description": described or "success", "content": answer}
        for status in operation.statuses
    }
    for status, text in operation.bodiless.items():
        responses[str(status)] = {"description": text}
    refusals = {400, *operation.errors}
    if operation.security:
        refusals |= {401, 403}
    if route.param_convertors:
        refusals.add(404)
    if operation.body is not None:
        refusals.add(413)
    for status in sorted(refusals):
        responses[str(status)] = {"description": ERRORS[status], "content": error}
    found: dict[str, Any] = {
        "operationId": _operation_id(method, route.path),
        "summary": summary,
        "security": operation.security,
        "responses": responses,
    }
    if description:
        found["description"] = description
    if operation.query:
        found["parameters"] = [
            {"name": q.name, "in": "query", "description": q.description, "schema": q.schema}
            for q in operation.query
        ]
    if operation.body is not None:
        found["requestBody"] = _request_body(operation.body)
    return found


def _summary(route: Route, operation: Operation) -> tuple[str, str]:
    """The summary and description: the endpoint's docstring (its first sentence, and
    the whole of it), or else the summary `operations.py` gives."""
    doc = inspect.getdoc(route.endpoint)
    if doc and operation.summary:
        raise ValueError(f"{route.path}: the endpoint's docstring is its summary; drop the other")
    if doc:
        text = " ".join(doc.split())
        return text.split(". ")[0].removesuffix("."), text
    if not operation.summary:
        raise ValueError(f"{route.path}: give the endpoint a docstring or operations.py a summary")
    return operation.summary.removesuffix("."), ""


def _request_body(body: Schema | Content) -> dict[str, Any]:
    if isinstance(body, Content):
        content = {body.media_type: {"schema": body.schema}}
        return {"required": True, "description": body.description, "content": content}
    # A JSON body whose fields are all optional may be left out: it counts as {}.
    return {"required": bool(body["required"]), "content": {"application/json": {"schema": body}}}


def _content(answer: object, components: Components) -> dict[str, Any]:
    if isinstance(answer, Content):
        return {answer.media_type: {"schema": answer.schema}}
    return {"application/json": {"schema": components.schema_of(answer)}}


def _operation_id(method: str, path: str) -> str:
    """`post_factories_factory_waves_name_cancel` for POST
    /api/v1/factories/{factory}/waves/{name}/cancel."""
    words = [w for w in re.split(r"[^a-z0-9]+", path.removeprefix("/api/v1")) if w]
    return "_".join([method.lower(), *words])


async def serve(request: Request) -> Response:
    """This document: the API as OpenAPI 3.1."""
    # A body sent along is read (and dropped) first: a connection closed with unread input
    # is reset, and the reset can cut this large answer short on its way to the client.
    await request.body()
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_document", None)
    if body is None:
        body = json.dumps(document(request.app.routes), indent=1).encode()
        state.openapi_document = body
    return Response(body, media_type="application/json")
