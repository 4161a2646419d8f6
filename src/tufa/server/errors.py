"""API errors: every refusal is JSON that names the problem and, where there is one, the fix."""

from __future__ import annotations

from typing import TypedDict

from starlette.requests import Request
from starlette.responses import JSONResponse

from tufa.server.exceptions import (
    ArchiveGone,
    Conflict,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    Refused,
    TooLarge,
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


# The status of each domain refusal (tufa.server.exceptions), most specific class first.
_STATUS_OF: tuple[tuple[type[Refused], int], ...] = (
    (InvalidInput, 400),
    (NotAuthenticated, 401),
    (NotFound, 404),
    (Conflict, 409),
    (ArchiveGone, 410),
    (TooLarge, 413),
)


def status_of(error: Refused) -> int:
    return next((status for kind, status in _STATUS_OF if isinstance(error, kind)), 400)


class ErrorDetail(TypedDict):
    status: int
    code: str
    message: str


class ErrorBody(TypedDict):
    """Every refusal's body, whatever refused: clients read it (tufa.core.responses)."""

    error: ErrorDetail


def error_body(status: int, code: str, message: str) -> ErrorBody:
    return {"error": {"status": status, "code": code, "message": message}}


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(exc.status, exc.code, exc.message), status_code=exc.status)


async def refused_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    status = status_of(exc)
    return JSONResponse(error_body(status, exc.code, exc.message), status_code=status)
