"""What a tufa server's answer says when it refuses a request.

Every API error has the shape `{"error": {"status", "code", "message"}}`; anything
else (a proxy's page, a server that is not tufa) is shown by its first bytes.
"""

from __future__ import annotations

import httpx


def refusal_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
