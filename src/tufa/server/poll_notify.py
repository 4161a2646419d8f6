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
# A listening connection whose peer went silent (a network failure, not a close) is
# given up after about idle + interval * count seconds: the operating system's TCP
# keepalive probes, which libpq turns on with these parameters.
_KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "1",
    "keepalives_count": "3",
}


def listener_name(pid: int) -> str:
    """The application name of the listening connection of server process `pid`."""
    return f"tufa-server-{pid}-listener"


class NotifiedStamps(Stamps):
    """Stamps remembered while a LISTEN connection hears about every change."""

    def __init__(self, url: str) -> None:
        self._read = PostgresStamps(url)
        # Named, so that an operator (and a test) can tell it in pg_stat_activity.
        named = {**_KEEPALIVE, "application_name": listener_name(os.getpid())}
        parsed = make_url(url).set(drivername="postgresql").update_query_dict(named)
        self._conninfo = parsed.render_as_string(hide_password=False).encode()
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
        if self._listener is None:
            self._listen_soon()
        else:
            # What has reached this host already is heard before the answer, not after.
            self._hear()
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
        if self._listening is None or self._listening.done():
            self._listening = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        while self._listener is None:
            try:
                listener = await loop.run_in_executor(None, self._connect)
            except Exception as e:
                if not self._lost_logged:
                    log.warning("poll cache: cannot listen for factory changes: %s", e)
                    self._lost_logged = True
                await asyncio.sleep(RELISTEN_SECONDS)
                continue
            self._known.clear()
            self._heard += 1
            self._listener, self._socket = listener, listener.socket
            self._lost_logged = False
            loop.add_reader(self._socket, self._hear)

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
        if self._listening is not None:
            self._listening.cancel()
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
