"""Reading a request's JSON body: each field checked for its type and form, and a 400
that names the field when it is wrong (never a 500 from bad input)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from securesystemslib.signer import Signature
from starlette.requests import Request

from tufa.core.api_paths import FACTORY_NAME
from tufa.server.errors import bad_request
from tufa.server.inputs import refuse_unsignable_json

T = TypeVar("T")


async def json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise bad_request("the request body is not valid JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    # Before any handler sees it: no field anywhere holds what cannot be signed or stored.
    refuse_unsignable_json(data)
    return data


def field(data: dict[str, Any], name: str, kind: type[T], default: T | None = None) -> T:
    """`data[name]` checked to be of `kind`; missing fields take `default` or are refused."""
    if name not in data or data[name] is None:
        if default is None:
            raise bad_request(f"field {name!r} is required")
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"field {name!r} must be of type {_json_type(kind)}")
    return value


def string_list(data: dict[str, Any], name: str) -> list[str]:
    """`data[name]`: a list of strings, empty if left out."""
    value = field(data, name, list, [])
    if not all(isinstance(v, str) for v in value):
        raise bad_request(f"field {name!r} must be a list of strings")
    return value


def signature_list(value: Any, label: str) -> list[Signature]:
    """`value` (the field at JSON path `label`) as signatures: {keyid, sig} objects."""
    if not isinstance(value, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("keyid"), str)
        and isinstance(item.get("sig"), str)
        for item in value
    ):
        raise bad_request(f"field {label!r} must be a list of {{keyid, sig}} objects of strings")
    return [Signature.from_dict(dict(item)) for item in value]


def name_field(data: dict[str, Any], name: str) -> str:
    value = field(data, name, str)
    if not FACTORY_NAME.fullmatch(value):
        raise bad_request(
            f"field {name!r} must be 2-63 lowercase letters, digits or '-', starting with a "
            "letter or digit"
        )
    return value


def text_field(data: dict[str, Any], name: str, max_length: int, *, required: bool = True) -> str:
    """A short printable text: stripped, no control characters, at most `max_length`."""
    value = field(data, name, str, None if required else "").strip()
    if (required and not value) or len(value) > max_length or not value.isprintable():
        least = 1 if required else 0
        raise bad_request(f"field {name!r} must be {least}-{max_length} printable characters")
    return value


def _json_type(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}.get(
        kind, kind.__name__
    )
