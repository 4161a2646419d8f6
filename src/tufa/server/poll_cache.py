"""What a server process remembers between device polls, and how it knows it is stale
(ADR 0014).

A device poll needs three facts: who holds the credential, the factory, and the newest
metadata file of the device's view. This process keeps the first and the last in
memory. Each entry carries the generation of its factory it was read at: the factory's
`auth_generation` for a credential, its `metadata_generation` for a file. Triggers bump
those counters in the transaction of every change (migration 0009), so an entry is
used only while the factory's counters, learnt after the request arrived, still read
the same number. Learning them is the only database work of a cached poll:

on PostgreSQL one read of the factory's row, on a connection of the event loop (no
thread hop), shared by every request that arrived before it was sent, while requests
that arrive during it wait for the next one; on SQLite a look at the database's
wal-index header in shared memory, on the loop's thread, which says whether anything
was committed since the row was last read (and a read of the row only if so). So a
change committed before a request arrived is seen by that request, on every process
sharing the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.engine import make_url

from tufa.core import api_paths
from tufa.core.metadata import Channel
from tufa.server.principals import Principal
from tufa.server.stored_files import StoredFile

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
    """Factory stamps as committed when asked: read after the request arrived, so that a
    change committed before it (a revoked credential, a publish) is what it sees."""

    async def stamp(self, name: str) -> FactoryStamp | None:
        """The factory's stamp; None if there is no such factory. Raises the driver's
        error if the database cannot be read (the caller falls back to the full path)."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


_STAMP_COLUMNS = "name, id, anonymous_read, auth_generation, metadata_generation"
_STATEMENT = b"tufa_factory_stamps"
_NAME = api_paths.FACTORY_NAME


def _stamps(rows: Any) -> dict[str, FactoryStamp]:
    return {row[0]: FactoryStamp(row[1], bool(row[2]), row[3], row[4]) for row in rows}


# The unix VFS's wal-index (the `-shm` file) starts with two copies of a 48-byte
# header in native byte order, the first field its format's version; every commit
# rewrites both (sqlite.org/walformat.html).
_WAL_INDEX_HEADERS = 96
_WAL_INDEX_VERSION = 3007000


class SqliteStamps(Stamps):
    """Stamps read on the event loop's own thread: nothing else runs meanwhile, so the
    read is made after the request arrived. The factories read before still hold while
    nothing was committed since, which the database's wal-index header tells: a read
    of shared memory, where any statement would release and retake the GIL (measured:
    a quarter of the poll path's throughput). Where that header is not there to read (a
    database not in WAL mode, a format this code does not know), `PRAGMA data_version`
    tells the same from a statement."""

    def __init__(self, url: str) -> None:
        self._path = str(make_url(url).database)
        self._conn: sqlite3.Connection | None = None
        self._wal_index: mmap.mmap | None = None
        self._seen: bytes | int | None = None  # the header or data_version read last
        self._known: dict[str, FactoryStamp | None] = {}

    @property
    def reads_wal_index(self) -> bool:
        """Whether changes are told by the wal-index header (else by data_version)."""
        return self._wal_index is not None

    async def stamp(self, name: str) -> FactoryStamp | None:
        try:
            return self._read(name)
        except Exception:
            await self.close()  # the next poll connects again
            raise

    def _read(self, name: str) -> FactoryStamp | None:
        conn = self._conn or self._connect()
        seen = (
            self._wal_index[:_WAL_INDEX_HEADERS]
            if self._wal_index is not None
            else conn.execute("PRAGMA data_version").fetchone()[0]
        )
        if seen != self._seen:
            self._known.clear()
            self._seen = seen
        if name in self._known:
            return self._known[name]
        query = f"SELECT {_STAMP_COLUMNS} FROM factories WHERE name = ?"  # noqa: S608
        found = _stamps(conn.execute(query, (name,)).fetchall()).get(name)
        if len(self._known) >= MAX_ENTRIES:
            self._known.clear()
        self._known[name] = found
        return found

    def _connect(self) -> sqlite3.Connection:
        # A connection of its own that only reads: short waits, never a write lock. While
        # it is open, no other process may reset or remove the wal-index (SQLite does that
        # only to a database no connection has open), so the mapping stays the file's.
        conn = sqlite3.connect(self._path, timeout=0.2, check_same_thread=False)
        conn.isolation_level = None
        conn.execute("PRAGMA query_only=1")
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        conn.execute("SELECT 1 FROM factories LIMIT 1").fetchall()  # the wal-index exists
        self._wal_index = _map_wal_index(self._path) if mode == "wal" else None
        self._conn = conn
        return conn

    async def close(self) -> None:
        self._wal_index = None  # the mapping is the process's (`_map_wal_index`)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        self._seen = None


class _MappedFile(NamedTuple):
    inode: int
    descriptor: int
    mapped: mmap.mmap | None


# The wal-index files this process opened, by path, never closed while the file is in
# use: closing any descriptor of a file drops every POSIX lock this process holds on it,
# and SQLite's connections in this process lock the wal-index. Without their locks,
# another process would take the database for unused and reset the file under them.
_wal_index_files: dict[str, _MappedFile] = {}


def _map_wal_index(database: str) -> mmap.mmap | None:
    """The wal-index of `database` mapped for reading (one mapping per file and process),
    or None if it is not in the format this code knows."""
    path = f"{database}-shm"
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return None
    known = _wal_index_files.get(path)
    if known is not None and known.inode == inode:
        return known.mapped
    descriptor = os.open(path, os.O_RDONLY)
    try:
        mapped: mmap.mmap | None = mmap.mmap(
            descriptor, _WAL_INDEX_HEADERS, access=mmap.ACCESS_READ
        )
    except (OSError, ValueError):
        mapped = None
    if mapped is not None and struct.unpack_from("=I", mapped, 0)[0] != _WAL_INDEX_VERSION:
        mapped.close()
        mapped = None
    if known is not None:
        # Its file was removed (no connection had the database open): no lock of
        # SQLite's is on that inode any more.
        if known.mapped is not None:
            known.mapped.close()
        os.close(known.descriptor)
    _wal_index_files[path] = _MappedFile(inode, descriptor, mapped)
    return mapped


class PostgresStamps(Stamps):
    """Stamps from libpq connections driven by the event loop: a prepared statement sent
    without blocking, its answer read when the socket is readable. (psycopg's async
    connection spent ten times the CPU per query, measured, on this path.)

    A request waits for a query that starts after it arrived; all the requests waiting
    then share that one query, so under load one query answers many polls, and none is
    answered from a query older than itself. While queries are in flight, the next batch
    goes out on a free connection."""

    def __init__(self, url: str, connections: int = 1) -> None:
        self._waiting: list[tuple[str, asyncio.Future[FactoryStamp | None]]] = []
        # Up to `connections` queries in flight: a batch is sent at once if one is free.
        self._free = list(range(connections))
        self._starting = False  # a sender is starting: new arrivals join its batch
        self._tasks: set[asyncio.Task[None]] = set()  # held: a task may be collected
        parsed = make_url(url).set(drivername="postgresql")
        self._conninfo = parsed.render_as_string(hide_password=False).encode()
        self._conns: dict[int, Any] = {}

    async def stamp(self, name: str) -> FactoryStamp | None:
        """The factory's stamp; None if there is no such factory. Raises the driver's
        error if the database cannot be read (the caller falls back to the full path)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FactoryStamp | None] = loop.create_future()
        self._waiting.append((name, future))
        if self._free and not self._starting:
            self._starting = True
            task = loop.create_task(self._send(self._free.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _send(self, slot: int) -> None:
        try:
            while self._waiting:
                self._starting = False
                batch, self._waiting = self._waiting, []
                try:
                    found = await self._query(slot, {name for name, _ in batch})
                except Exception as e:
                    with contextlib.suppress(Exception):
                        await self._disconnect(slot)  # its next query connects again
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for name, future in batch:
                    if not future.done():  # not if its request was cancelled meanwhile
                        future.set_result(found.get(name))
        finally:
            self._starting = False
            self._free.append(slot)

    async def _connect(self) -> Any:
        from psycopg import pq  # the server's PostgreSQL driver; SQLite never loads it

        def connect() -> Any:
            conn = pq.PGconn.connect(self._conninfo)
            if conn.status != pq.ConnStatus.OK:
                message = conn.get_error_message()
                conn.finish()
                raise OSError(f"cannot connect: {message}")
            sql = f"SELECT {_STAMP_COLUMNS} FROM factories WHERE name = ANY($1::text[])"  # noqa: S608
            prepared = conn.prepare(_STATEMENT, sql.encode())
            if prepared.status != pq.ExecStatus.COMMAND_OK:
                message = conn.get_error_message()
                conn.finish()
                raise OSError(f"cannot prepare: {message}")
            conn.nonblocking = 1
            return conn

        # Connecting blocks for a round trip or two: not on the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, connect)

    async def _query(self, slot: int, names: set[str]) -> dict[str, FactoryStamp]:
        from psycopg import pq

        conn = self._conns.get(slot)
        if conn is None:
            conn = self._conns[slot] = await self._connect()
        # Factory names are [a-z0-9-] (api_paths.FACTORY_NAME): quoted, each is literal.
        listed = "{" + ",".join(f'"{name}"' for name in names if _NAME.fullmatch(name)) + "}"
        conn.send_query_prepared(_STATEMENT, [listed.encode()])  # raises if it cannot
        loop = asyncio.get_running_loop()
        while conn.flush() != 0:  # a query of a few bytes: almost never
            await _ready(loop.add_writer, loop.remove_writer, conn.socket)
        while True:
            conn.consume_input()
            if not conn.is_busy():
                break
            await _ready(loop.add_reader, loop.remove_reader, conn.socket)
        found: dict[str, FactoryStamp] = {}
        failure = None
        while (result := conn.get_result()) is not None:
            if result.status != pq.ExecStatus.TUPLES_OK:
                failure = result.error_message
                continue
            for row in range(result.ntuples):
                name, ident, public, auth, metadata = (
                    result.get_value(row, column) for column in range(5)
                )
                found[name.decode()] = FactoryStamp(
                    int(ident), public == b"t", int(auth), int(metadata)
                )
        if failure is not None:
            raise OSError(f"the generation query failed: {failure!r}")
        return found

    async def _disconnect(self, slot: int) -> None:
        conn = self._conns.pop(slot, None)
        if conn is not None:
            conn.finish()

    async def close(self) -> None:
        for slot in list(self._conns):
            await self._disconnect(slot)


async def _ready(add: Callable[..., None], remove: Callable[[int], object], socket: int) -> None:
    """Until `socket` is ready, as `add` (the loop's add_reader or add_writer) watches."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    add(socket, _wake, ready)
    try:
        await ready
    finally:
        remove(socket)


def _wake(ready: asyncio.Future[None]) -> None:
    # A level-triggered watch may fire again before its waiter runs and removes it.
    if not ready.done():
        ready.set_result(None)
