"""What a server process remembers between device polls, and how it knows it is stale
(ADR 0014).

A device poll needs three facts: who holds the credential, the factory, and the newest
metadata file of the device's view. This process keeps the first and the last in
memory. Each entry carries the generation of its factory it was read at: the factory's
`auth_generation` for a credential, its `metadata_generation` for a file. Triggers bump
those counters in the transaction of every change (migration 0009), so an entry is
used only while one query, made after the request arrived, still reads the same
number. That query is the only database work of a cached poll:

one read of the factory's row, on a connection of the event loop (no thread hop; for
SQLite a blocking read of microseconds), shared by every request that arrived before it
was sent; requests that arrive while it runs wait for the next one. So a change
committed before a request arrived is seen by that request, on every process sharing
the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.engine import make_url

from tufa.core.metadata import Channel
from tufa.server.principals import Principal
from tufa.server.repository import StoredFile

# Entries kept at most, per kind; when full the cache starts again empty.
MAX_ENTRIES = 200_000


class FactoryStamp(NamedTuple):
    """A factory's row as the poll path needs it, with its two generations."""

    id: int
    anonymous_read: bool
    auth_generation: int
    metadata_generation: int


@dataclass(frozen=True)
class _Known:
    principal: Principal
    expires_at: datetime | None
    generation: int


@dataclass(frozen=True)
class _Newest:
    file: StoredFile
    generation: int


class PollCache:
    """Credentials (by secret digest) and the newest file of each view, each with the
    generation of its factory it was read at."""

    def __init__(self) -> None:
        self._principals: dict[str, _Known] = {}
        self._newest: dict[tuple[int, Channel, str, str], _Newest] = {}

    def principal(
        self, digest: str, stamp: FactoryStamp, now: Callable[[], datetime]
    ) -> Principal | None:
        """Who holds the secret of `digest`, if known at the stamp's generation (and, for
        a token that expires, not expired by `now()`)."""
        known = self._principals.get(digest)
        if (
            known is None
            or known.generation != stamp.auth_generation
            or known.principal.factory_id != stamp.id
            or (known.expires_at is not None and known.expires_at <= now())
        ):
            return None
        return known.principal

    def remember_principal(
        self, digest: str, principal: Principal, expires_at: datetime | None, generation: int
    ) -> None:
        # A credential a rotation issued must be adopted on first use, which is a write.
        if principal.credential_pending or principal.kind not in ("device", "token"):
            return
        if len(self._principals) >= MAX_ENTRIES:
            self._principals.clear()
        self._principals[digest] = _Known(principal, expires_at, generation)

    def newest(
        self, stamp: FactoryStamp, channel: Channel, view: str, role: str
    ) -> StoredFile | None:
        newest = self._newest.get((stamp.id, channel, view, role))
        if newest is None or newest.generation != stamp.metadata_generation:
            return None
        return newest.file

    def remember_newest(
        self,
        factory_id: int,
        channel: Channel,
        view: str,
        role: str,
        file: StoredFile,
        generation: int,
    ) -> None:
        if len(self._newest) >= MAX_ENTRIES:
            self._newest.clear()
        self._newest[(factory_id, channel, view, role)] = _Newest(file, generation)


class Stamps:
    """Factory stamps as committed when asked. A request waits for a query that starts
    after it arrived; all the requests waiting then share that one query, so under load
    one query answers many polls, and none is answered from a query older than itself."""

    def __init__(self) -> None:
        self._waiting: list[tuple[str, asyncio.Future[FactoryStamp | None]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def stamp(self, name: str) -> FactoryStamp | None:
        """The factory's stamp; None if there is no such factory. Raises the driver's
        error if the database cannot be read (the caller falls back to the full path)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FactoryStamp | None] = loop.create_future()
        self._waiting.append((name, future))
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())  # held: a task may be collected
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    found = await self._query({name for name, _ in batch})
                except Exception as e:
                    with contextlib.suppress(Exception):
                        await self.close()  # the next batch connects again
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for name, future in batch:
                    if not future.done():  # not if its request was cancelled meanwhile
                        future.set_result(found.get(name))
        finally:
            self._running = False

    async def _query(self, names: set[str]) -> dict[str, FactoryStamp]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


_STAMP_COLUMNS = "name, id, anonymous_read, auth_generation, metadata_generation"


def _stamps(rows: Any) -> dict[str, FactoryStamp]:
    return {row[0]: FactoryStamp(row[1], bool(row[2]), row[3], row[4]) for row in rows}


class SqliteStamps(Stamps):
    """Stamps read on the event loop's own thread, each statement its own snapshot: a
    blocking call of microseconds, since WAL readers wait for no writer."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._path = make_url(url).database
        self._conn: sqlite3.Connection | None = None

    async def _query(self, names: set[str]) -> dict[str, FactoryStamp]:
        conn = self._conn
        if conn is None:
            # A connection of its own that only reads: short waits, never a write lock.
            conn = sqlite3.connect(str(self._path), timeout=0.2, check_same_thread=False)
            conn.isolation_level = None
            conn.execute("PRAGMA query_only=1")
            self._conn = conn
        marks = ", ".join("?" * len(names))
        query = f"SELECT {_STAMP_COLUMNS} FROM factories WHERE name IN ({marks})"  # noqa: S608
        return _stamps(conn.execute(query, tuple(names)).fetchall())

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


class PostgresStamps(Stamps):
    """Stamps from one connection on the event loop."""

    def __init__(self, url: str) -> None:
        super().__init__()
        parsed = make_url(url).set(drivername="postgresql")
        self._conninfo = parsed.render_as_string(hide_password=False)
        self._conn: Any = None

    async def _query(self, names: set[str]) -> dict[str, FactoryStamp]:
        import psycopg  # the server's PostgreSQL driver; SQLite servers never load it

        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=5
            )
        cursor = await self._conn.execute(
            f"SELECT {_STAMP_COLUMNS} FROM factories WHERE name = ANY(%s)",  # noqa: S608
            (list(names),),
            prepare=True,
        )
        return _stamps(await cursor.fetchall())

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


def stamps_for(url: str) -> Stamps:
    return SqliteStamps(url) if url.startswith("sqlite") else PostgresStamps(url)
