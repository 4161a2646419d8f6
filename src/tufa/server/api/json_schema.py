"""JSON Schema (draft 2020-12, the dialect of OpenAPI 3.1) of the Python types the API
answers with, so that the published schemas are the types the endpoints are checked
against (mypy) rather than a second description of them."""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

Schema = dict[str, Any]
_SCALARS: dict[object, Schema] = {
    str: {"type": "string"},
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    type(None): {"type": "null"},
    object: {},
    Any: {},
}


class Components:
    """The named schemas (`#/components/schemas/...`) of a document, one per TypedDict or
    dataclass met while converting types: each is converted once and referred to after."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}
        self._types: dict[str, type] = {}

    def schema_of(self, kind: object) -> Schema:
        """The schema of `kind`; a TypeError for a type with no JSON form."""
        if kind in _SCALARS:
            return dict(_SCALARS[kind])
        origin, args = get_origin(kind), get_args(kind)
        if origin in (Union, types.UnionType):
            return {"anyOf": [self.schema_of(arg) for arg in args]}
        if origin is Literal:
            return {"enum": [arg.value if isinstance(arg, enum.Enum) else arg for arg in args]}
        if origin is list:
            return {"type": "array", "items": self.schema_of(args[0])}
        if origin in (dict, Mapping):
            return self._mapping(args[0], args[1])
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return {"type": "string", "enum": [member.value for member in kind]}
        if isinstance(kind, type) and (is_typeddict(kind) or dataclasses.is_dataclass(kind)):
            return self._named(kind)
        raise TypeError(f"no JSON schema for {kind!r}: give the endpoint's answer a TypedDict")

    def _mapping(self, key: object, value: object) -> Schema:
        schema: Schema = {"type": "object", "additionalProperties": self.schema_of(value)}
        if key is not str:
            schema["propertyNames"] = self.schema_of(key)
        return schema

    def _named(self, kind: type) -> Schema:
        name = kind.__name__
        reference = {"$ref": f"#/components/schemas/{name}"}
        known = self._types.get(name)
        if known is kind:
            return reference
        if known is not None:
            raise TypeError(f"two answer types are named {name}: {known!r} and {kind!r}")
        self._types[name] = kind
        hints = get_type_hints(kind)
        # A dataclass's fields are all set; a TypedDict says which of its keys are.
        required = sorted(getattr(kind, "__required_keys__", hints))
        schema: Schema = {
            "type": "object",
            "properties": {field: self.schema_of(hint) for field, hint in hints.items()},
            "required": required,
            "additionalProperties": False,
        }
        # A dataclass without a docstring is given one listing its fields: not a description.
        doc = kind.__dict__.get("__doc__")
        if doc and not doc.startswith(f"{name}("):
            schema["description"] = " ".join(doc.split())
        self.schemas[name] = schema
        return reference
