"""The input rules every request passes before a handler looks at it, and every target's
custom metadata before it is signed.

No text holds a NUL character or a lone surrogate: PostgreSQL stores no NUL, and no
UTF-8 encodes a lone surrogate (JSON's `\\ud800` escape can carry one). A JSON body has
no fractional number, NaN or Infinity (canonical JSON, which TUF metadata is signed in,
has none), no integer outside 64 bits (what the database columns and other TUF clients
hold), and no nesting deeper than `MAX_JSON_DEPTH`. Each refusal (InvalidInput, a 400)
names the parameter, or the JSON path of the field such as 'targets[0].custom.build'.

The API applies them to every request (api/common.py: `refuse_unstorable_params` and
`json_object`); publishing applies the JSON rules to custom metadata with a lower depth.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tufa.server.exceptions import InvalidInput

# Signed metadata in a body nests 7 levels (roots.ci.signed.keys.ID.keyval.public); the
# rest is room for a target's custom metadata, which has a limit of its own (publishing).
MAX_JSON_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def text_problem(text: str) -> str | None:
    """What makes `text` impossible to store or encode, if anything: NUL characters
    (PostgreSQL refuses them) and lone surrogates (not Unicode text; UTF-8 cannot hold
    them, and JSON's \\ud800 escapes can)."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode()
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate (\\u{ord(text[e.start]):04x}), which is not text"
    return None


def json_path(parent: str, key: str | int) -> str:
    """The JSON path of `key` under `parent`: 'targets[0].custom.build', 'a["odd key"]'."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if not _PLAIN_KEY.fullmatch(key):
        return f"{parent}[{json.dumps(key)}]"
    return f"{parent}.{key}" if parent else key


def refuse_unsignable_json(value: Any, path: str = "", max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what canonical JSON cannot sign or a database cannot store, anywhere in
    `value` (a parsed JSON document found at `path`); the error names the field."""
    pending: list[tuple[Any, str, int]] = [(value, path, 1)]
    while pending:
        item, at, depth = pending.pop()
        # Paths are ASCII: odd keys are JSON-escaped (json_path), so quoting them is safe.
        label = f"field '{at}'" if at else "the request body"
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                raise InvalidInput(f"{label} {problem}; remove it")
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise InvalidInput(
                    f"{label} is out of range: integers must be from -2^63 to 2^63-1"
                )
        elif isinstance(item, float):
            raise InvalidInput(
                f"{label} is the number {item!r}: only integers are accepted, as "
                "signed (canonical) JSON has no fractions, NaN or Infinity; send an integer "
                "or a string"
            )
        else:
            if depth > max_depth:
                raise InvalidInput(
                    f"{label} nests deeper than {max_depth} levels of arrays and objects"
                )
            children = list(item.items() if isinstance(item, dict) else enumerate(item))
            for key, _ in children:
                problem = text_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    raise InvalidInput(f"a key of {label} {problem}; remove it")
            # Reversed onto the stack, so the first problem in document order is named.
            pending.extend(
                (child, json_path(at, key), depth + 1) for key, child in reversed(children)
            )
