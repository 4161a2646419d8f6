"""Time as tufa writes it: UTC, whole seconds, and ISO 8601 with a `Z`, as TUF metadata does."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """`None` stays `None`, so an optional column reads as JSON null."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(utc_now())
