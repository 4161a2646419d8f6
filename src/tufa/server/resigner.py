"""Which process runs the background re-signer: the one holding the re-signer lock.

Re-signing is safe from several processes at once (each channel is re-checked under
its lock), but one process doing it is enough, and N workers or replicas doing the
same checks every interval only load the database. On PostgreSQL the lock is a
session advisory lock, which every replica on every host sees; on SQLite (one host)
it is an `flock` on a file beside the database. Either is released when its process
dies, and a process standing by takes over at its next turn.

The webhook deliverer (webhook_delivery.py) takes turns the same way, with a lock of
its own (`WEBHOOKS`), so that no delivery is attempted by two processes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tufa.server.db import Database

log = logging.getLogger("tufa.server")
# The start-up lock (db.Database.startup) is 7412300.
_ADVISORY_KEY = 7412301


@dataclass(frozen=True)
class LockKind:
    """Which background task a lock is for: its advisory key and lock file suffix."""

    task: str
    advisory_key: int
    suffix: str


RESIGNER = LockKind("background re-signer", _ADVISORY_KEY, "resigner-lock")
WEBHOOKS = LockKind("webhook deliverer", _ADVISORY_KEY + 1, "webhooks-lock")


class ResignerLock:
    def __init__(self, db: Database, kind: LockKind = RESIGNER) -> None:
        self._db = db
        self.kind = kind
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._fd: int | None = None
        self.held = False

    def take(self) -> bool:
        """True if this process holds the lock (now, or still): its turn to re-sign.

        Never raises: a database that does not answer means no turn this time.
        """
        try:
            got = self._take_sqlite() if self._db.is_sqlite else self._take_postgres()
        except Exception as e:
            log.warning("could not take the lock of the %s: %s", self.kind.task, e)
            self.release()
            got = False
        if got and not self.held:
            log.info("this process (pid %d) runs the %s", os.getpid(), self.kind.task)
        elif not got and self.held:
            log.warning("this process (pid %d) lost the %s lock", os.getpid(), self.kind.task)
        self.held = got
        return got

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a connection that broke closes anyway
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops its flock
            self._fd = None
        self.held = False

    def _take_postgres(self) -> bool:
        if self._conn is not None:
            # A session lock lasts as long as its connection: check it is still there.
            self._conn.exec_driver_sql("SELECT 1")
            return True
        if self._engine is None:
            # A connection of its own, outside the pools: it holds the lock while it lives.
            self._engine = create_engine(
                self._db.url, poolclass=NullPool, isolation_level="AUTOCOMMIT"
            )
        conn = self._engine.connect()
        got = bool(
            conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.kind.advisory_key}
            ).scalar()
        )
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def _take_sqlite(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(lock_path(self._db.url, self.kind.suffix), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True


def lock_path(sqlite_url: str, suffix: str = RESIGNER.suffix) -> Path:
    """The lock file beside a SQLite database: every process using it sees the same."""
    database = make_url(sqlite_url).database
    assert database, f"no database file in {sqlite_url}"
    path = Path(database)
    return path.with_name(f"{path.name}.{suffix}")
