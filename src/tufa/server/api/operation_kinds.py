"""The vocabulary of operations.py: who may call a route (security schemes), what an
entry says of it (`Operation`), and the schema pieces the entries share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from tufa.server.api.json_schema import Schema
from tufa.server.principals import Scope

# Each alternative names schemes that must all hold; an empty one means "no credential".
Security = list[dict[str, list[str]]]


def tokens_with(*scopes: Scope) -> Security:
    return [{"factoryToken": sorted(scopes)}]


OPERATOR: Security = [{"operatorToken": []}]
ADMIN = tokens_with(Scope.ADMIN)
PUBLISHERS = tokens_with(Scope.ADMIN, Scope.CI)
READERS = tokens_with(Scope.ADMIN, Scope.CI, Scope.READ)
DEVICE: Security = [{"deviceCredential": []}]
# TUF clients: a device of the channel, a reading token, or anyone where the factory
# allows anonymous reads (PATCH /factories/{factory}).
REPO_READERS: Security = [*DEVICE, *READERS, {}]
PUBLIC: Security = []


@dataclass(frozen=True)
class Content:
    """A body that is not one of the endpoints' answer types: a file, or raw JSON."""

    media_type: str
    schema: Schema
    description: str = ""


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    schema: Schema = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    answer: object  # the endpoint's answer type, or its Content
    security: Security
    # The first is the usual success; any other answers with the same type.
    statuses: tuple[int, ...] = (200,)
    body: Schema | Content | None = None
    query: tuple[Query, ...] = ()
    # Refusals beyond those of every route (see openapi.py), and bodiless answers.
    errors: tuple[int, ...] = ()
    bodiless: dict[int, str] = field(default_factory=dict)
    # For an endpoint without a docstring, whose first sentence is the summary otherwise.
    summary: str | None = None


class StatusJson(TypedDict):
    status: str


def pattern_schema(regex: str) -> Schema:
    return {"type": "string", "pattern": f"^(?:{regex})$"}


def object_schema(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required)}


STRING: Schema = {"type": "string"}
STRINGS: Schema = {"type": "array", "items": STRING}
FILE: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
BOOLEAN: Schema = {"type": "string", "enum": ["true", "false"]}
CONFLICT = (409,)
CREATED = (201,)
