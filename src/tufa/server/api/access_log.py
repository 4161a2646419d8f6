"""The access log: a line for each request (method, path, status, duration, who called),
and for each refusal the reason the client was given, at INFO.

Secrets travel in the Authorization header, which is never logged; a secret put in a
path or a query string by mistake is logged as `[redacted]`. The caller is named by its
token id (tok_...) or device id, as `tufa tokens list` and `tufa devices list` show them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tufa.server.credentials import DEVICE_SECRET_PREFIX
from tufa.server.principals import watch_caller
from tufa.server.tokens import TOKEN_PREFIX

log = logging.getLogger("tufa.access")
REDACTED = "[redacted]"
# What tufa's secrets look like (secrets.new_secret): a prefix and 32 random bytes.
_SECRET = re.compile(rf"(?:{TOKEN_PREFIX}|{DEVICE_SECRET_PREFIX})_[A-Za-z0-9_-]{{43}}")
_SECRET_PARAM = re.compile(r"token|secret|credential|password|authorization", re.IGNORECASE)
# Enough of an error body to read its reason; error bodies are a few hundred bytes.
_MAX_ERROR_BODY = 16 * 1024
_LINE = "%s %s %d %.1fms %s %s"
_REFUSED_LINE = _LINE + " refused (%s): %s"


def loggable_path(scope: Scope) -> str:
    """The request's path and query string, without secrets and on one line."""
    path: str = scope["path"]
    if TOKEN_PREFIX in path:  # both prefixes start with it; polls skip the split
        path = "/".join(REDACTED if _SECRET.fullmatch(part) else part for part in path.split("/"))
    query: bytes = scope["query_string"]
    if query:
        path += "?" + "&".join(_loggable_param(p) for p in query.decode("latin-1").split("&"))
    if not path.isprintable():
        path = path.encode("unicode_escape").decode("ascii")
    return path


def _loggable_param(param: str) -> str:
    name, equals, value = param.partition("=")
    if equals and (_SECRET_PARAM.search(unquote_plus(name)) or _SECRET.search(unquote_plus(value))):
        return f"{name}={REDACTED}"
    return param


def _refusal(body: bytes) -> tuple[str, str] | None:
    """The code and message of an API error body (errors.error_body), if it is one; a
    message may quote what the client sent, a secret included."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), _SECRET.sub(REDACTED, str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return None


class AccessLog:
    """Log each request once answered; with `every_request=False`, refusals only."""

    def __init__(self, app: ASGIApp, *, every_request: bool) -> None:
        self.app = app
        self.every_request = every_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = watch_caller()
        status = 500  # what the client gets if the app raises before it answers
        error_body = b""

        async def watched_send(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status >= 400 and len(error_body) < _MAX_ERROR_BODY:
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if status >= 400 or self.every_request:
                principal = seen.principal
                self._log(
                    scope,
                    status,
                    (time.perf_counter() - started) * 1000,
                    principal.kind if principal else "anonymous",
                    principal.caller_id if principal else None,
                    _refusal(error_body) if status >= 400 else None,
                )

    @staticmethod
    def _log(
        scope: Scope,
        status: int,
        milliseconds: float,
        kind: str,
        caller_id: str | None,
        refusal: tuple[str, str] | None,
    ) -> None:
        method, path = scope["method"], loggable_path(scope)
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(milliseconds, 1),
            "caller_kind": kind,
            "caller_id": caller_id,
        }
        level = logging.WARNING if status >= 500 else logging.INFO
        args: tuple[Any, ...] = (method, path, status, milliseconds, kind, caller_id or "-")
        if refusal is None:
            log.log(level, _LINE, *args, extra={"access": fields})
            return
        fields["refusal"], fields["reason"] = refusal
        log.log(level, _REFUSED_LINE, *args, *refusal, extra={"access": fields})
