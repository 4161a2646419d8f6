"""What a tufa server's answer says when it refuses a request.

Every API error has the shape `{"error": {"status", "code", "message"}}`; anything
else (a proxy's page, a server that is not tufa) is shown by its first bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

MAX_ERROR_BODY = 4096  # what is read of a streamed error answer for its message


@dataclass(frozen=True)
class Refusal:
    """One refused request: its status, the server's error code (None if the body is
    not a tufa error) and its message."""

    status: int
    code: str | None
    message: str

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"


def refusal(status: int, body: bytes) -> Refusal:
    try:
        error = json.loads(body)["error"]
        return Refusal(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return Refusal(status, None, body[:200].decode(errors="replace"))


def refusal_of(response: httpx.Response) -> Refusal:
    """The refusal of a response that was read (or was not streamed)."""
    return refusal(response.status_code, response.content)


def streamed_refusal(response: httpx.Response) -> Refusal:
    """The refusal of a streamed response, from its first few KiB only (an answer that
    never ends must not hold up the caller), closing it."""
    body = b""
    try:
        for chunk in response.iter_bytes(MAX_ERROR_BODY):
            body += chunk
            if len(body) >= MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    finally:
        response.close()
    return refusal(response.status_code, body[:MAX_ERROR_BODY])
