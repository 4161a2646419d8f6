"""How values cross into SQL the same way on SQLite and PostgreSQL: column types for
moments and channels, and long lists as query parameters."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, DateTime, String, TypeDecorator, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from tufa.core.metadata import Channel


def one_of(
    conn: Connection, column: ColumnElement[str], values: Collection[str]
) -> ColumnElement[bool]:
    """`column IN values`, fast for long lists on both backends.

    On PostgreSQL the list is one array parameter: after five runs psycopg prepares a
    statement, and the generic plan of an IN list of 1,000 parameters filters the whole
    table (measured: 2 s per publish at 40,000 targets, instead of a few milliseconds)."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(String)))
    return column.in_(values)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class ChannelName(TypeDecorator[Channel]):
    """A channel, stored as its name: the rest of the server only ever sees `Channel`."""

    impl = String(8)
    cache_ok = True

    def process_bind_param(self, value: Channel | str | None, dialect: Any) -> str | None:
        # `Channel(...)` refuses a name that is no channel before it reaches a query.
        return None if value is None else Channel(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> Channel | None:
        return None if value is None else Channel(value)
