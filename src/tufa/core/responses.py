"""What a tufa server's answer says when it refuses a request.

Every API error has the shape `{"error": {"status", "code", "message"}}`; anything
else (a proxy's page, a server that is not tufa) is shown by its first bytes.
"""

from __future__ import annotations

import json

import httpx


def refusal(body: bytes) -> tuple[str | None, str]:
    """The error's code (None if the body is not a tufa error) and its message."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return None, body[:200].decode(errors="replace")


def refusal_message(response: httpx.Response) -> str:
    return refusal(response.content)[1]
