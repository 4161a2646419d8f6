"""Factory stamps kept in memory on PostgreSQL, forgotten when the database says they
changed (`tufa-server run --poll-invalidation notify`, ADR 0014).

The default, `PostgresStamps`, reads the factory's row for every batch of polls: a
change committed before a request arrived is seen by that request. Here a stamp read
once is used until a notification says its row changed (migration 0013), so a cached
poll costs no database work at all. The price is the notification's delay: it is sent
when the change commits and arrives a moment later, so a poll reaching another process
in that moment (milliseconds; longer if the listening connection's host is overloaded)
is still answered from the old stamp. While no listening connection is established
(at start, after a lost connection), every stamp is read as `PostgresStamps` reads it.

`stamps_for` picks among the three ways for a server's database and settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from sqlalchemy.engine import make_url

from tufa.server.poll_cache import (
    MAX_ENTRIES,
    FactoryStamp,
    PostgresStamps,
    SqliteStamps,
    Stamps,
)

log = logging.getLogger("tufa.server")
CHANNEL = "tufa_factory_stamps"
# How long to wait before listening again after the connection was lost or refused.
RELISTEN_SECONDS = 1.0
# Each process notifies itself this often, on a connection of its own, and gives up on
# its listening connection when its own notification has not come back for
# BEAT_TIMEOUT_SECONDS: a closed socket tells of a lost connection, but a proxy or a
# pooler between the server and PostgreSQL may keep the socket up while nothing more
# arrives through it.
BEAT_SECONDS = 1.0
BEAT_TIMEOUT_SECONDS = 3.0
# Factory names have no ":" (api_paths.FACTORY_NAME): a heartbeat is never taken for one.
_BEAT = ":beat:"
_CONNECTION = {
    "connect_timeout": "5",
    # TCP keepalive probes, for a peer that went silent without closing.
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "1",
    "keepalives_count": "3",
}


def listener_name(pid: int) -> str:
    """The application name of the listening connection of server process `pid`."""
    return f"tufa-server-{pid}-listener"


def _conninfo(url: str, application_name: str) -> bytes:
    # Named, so that an operator (and a test) can tell it in pg_stat_activity.
    named = {**_CONNECTION, "application_name": application_name}
    parsed = make_url(url).set(drivername="postgresql").update_query_dict(named)
    return parsed.render_as_string(hide_password=False).encode()


class NotifiedStamps(Stamps):
    """Stamps remembered while a LISTEN connection hears about every change."""

    def __init__(self, url: str) -> None:
        self._read = PostgresStamps(url)
        pid = os.getpid()
        self._conninfo = _conninfo(url, listener_name(pid))
        self._beat_conninfo = _conninfo(url, f"tufa-server-{pid}-heartbeat")
        self._own_beat = f"{_BEAT}{pid}".encode()
        self._beat_heard = 0.0  # time.monotonic() when the last own heartbeat arrived
        self._beater: Any = None  # psycopg.pq.PGconn, blocking, used from a thread
        self._beating: asyncio.Task[None] | None = None
        self._closed = False
        self._listener: Any = None  # psycopg.pq.PGconn, LISTENing, non-blocking
        self._socket = -1  # its socket (a lost connection no longer tells it)
        self._known: dict[str, FactoryStamp | None] = {}
        # Moves on every notification and every change of the listener: a stamp read
        # while it moved may predate what was heard, and is not remembered.
        self._heard = 0
        self._listening: asyncio.Task[None] | None = None
        self._lost_logged = False

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def stamp(self, name: str) -> FactoryStamp | None:
        if self._closed:
            return await self._read.stamp(name)
        if self._listener is None:
            self._listen_soon()
        else:
            # What has reached this host already is heard before the answer, not after.
            self._hear()
            if time.monotonic() - self._beat_heard > BEAT_TIMEOUT_SECONDS:
                self._lose(OSError("its own heartbeat notifications stopped arriving"))
            if self._listener is not None and name in self._known:
                return self._known[name]
        heard = self._heard
        found = await self._read.stamp(name)
        if self._listener is not None and heard == self._heard:
            if len(self._known) >= MAX_ENTRIES:
                self._known.clear()
            self._known[name] = found
        return found

    def _listen_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listening is None or self._listening.done():
            self._listening = loop.create_task(self._listen())
        if self._beating is None or self._beating.done():
            self._beating = loop.create_task(self._beat())

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        while self._listener is None and not self._closed:
            try:
                listener = await loop.run_in_executor(None, self._connect)
            except Exception as e:
                if not self._lost_logged:
                    log.warning("poll cache: cannot listen for factory changes: %s", e)
                    self._lost_logged = True
                await asyncio.sleep(RELISTEN_SECONDS)
                continue
            if self._closed:  # closed while it connected
                listener.finish()
                return
            self._known.clear()
            self._heard += 1
            self._beat_heard = time.monotonic()
            self._listener, self._socket = listener, listener.socket
            self._lost_logged = False
            loop.add_reader(self._socket, self._hear)

    async def _beat(self) -> None:
        """Notify this process's heartbeat every BEAT_SECONDS, for `stamp` to hear."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                await loop.run_in_executor(None, self._send_beat)
            except Exception:
                self._drop_beater()  # no beat: the listener is given up until one is heard
            await asyncio.sleep(BEAT_SECONDS)

    def _send_beat(self) -> None:
        from psycopg import pq

        if self._beater is None:
            self._beater = pq.PGconn.connect(self._beat_conninfo)
        sent = self._beater.exec_(b"SELECT pg_notify($1, $2)", [CHANNEL.encode(), self._own_beat])
        if sent.status != pq.ExecStatus.TUPLES_OK:
            raise OSError(self._beater.get_error_message())

    def _drop_beater(self) -> None:
        beater, self._beater = self._beater, None
        if beater is not None:
            beater.finish()

    def _connect(self) -> Any:
        from psycopg import pq

        conn = pq.PGconn.connect(self._conninfo)
        if conn.status != pq.ConnStatus.OK:
            message = conn.get_error_message()
            conn.finish()
            raise OSError(message)
        done = conn.exec_(f"LISTEN {CHANNEL}".encode())
        if done.status != pq.ExecStatus.COMMAND_OK:
            message = conn.get_error_message()
            conn.finish()
            raise OSError(message)
        conn.nonblocking = 1
        return conn

    def _hear(self) -> None:
        """Forget the stamps the notifications received so far name. Called when the
        listening socket is readable, and before every answer."""
        listener = self._listener
        if listener is None:
            return
        from psycopg import pq

        try:
            listener.consume_input()
        except Exception as e:  # closed by the server, or the network
            self._lose(e)
            return
        if listener.status != pq.ConnStatus.OK:
            self._lose(OSError(listener.get_error_message()))
            return
        while (notification := listener.notifies()) is not None:
            if notification.extra.startswith(_BEAT.encode()):
                if notification.extra == self._own_beat:
                    self._beat_heard = time.monotonic()
                continue
            self._heard += 1
            self._known.pop(notification.extra.decode(), None)

    def _lose(self, error: Exception) -> None:
        listener, self._listener = self._listener, None
        self._known.clear()
        self._heard += 1
        if listener is not None:
            asyncio.get_running_loop().remove_reader(self._socket)
            listener.finish()
        log.warning("poll cache: lost the connection listening for factory changes: %s", error)
        self._lost_logged = True
        self._listen_soon()

    async def close(self) -> None:
        self._closed = True
        for task in (self._listening, self._beating):
            if task is not None:
                task.cancel()
        self._drop_beater()
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(self._socket)
            listener.finish()
        await self._read.close()


def stamps_for(url: str, invalidation: str = "query") -> Stamps:
    """How the poll path learns factory stamps on the database of `url`: read after
    each request arrived, or (`invalidation="notify"`, PostgreSQL only) remembered
    until a notification says they changed."""
    if url.startswith("sqlite"):
        return SqliteStamps(url)
    if invalidation == "notify":
        return NotifiedStamps(url)
    return PostgresStamps(url)
