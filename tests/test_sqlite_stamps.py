"""How a server process on SQLite knows, at each poll, whether what it read of the
factories still holds (`poll_cache.SqliteStamps`, ADR 0014): every commit made by
another process must be seen by the very next read, in WAL mode (told by the
wal-index header) and without it (told by `PRAGMA data_version`), through WAL resets.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tufa.server.poll_cache import FactoryStamp, SqliteStamps

_SCHEMA = (
    "CREATE TABLE factories (id INTEGER PRIMARY KEY, name TEXT UNIQUE, "
    "anonymous_read BOOLEAN, auth_generation INTEGER, metadata_generation INTEGER)"
)


def _database(path: Path, journal_mode: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute(_SCHEMA)
    conn.execute("INSERT INTO factories VALUES (1, 'acme', 0, 1, 1)")
    conn.close()


def _commit_elsewhere(path: Path, *statements: str) -> None:
    """Run `statements` in another process, as another server replica would."""
    script = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "for statement in sys.argv[2:]:\n"
        "    conn.execute(statement)\n"
        "conn.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path), *statements], check=True)


def _stamp(stamps: SqliteStamps, name: str = "acme") -> FactoryStamp | None:
    return asyncio.run(stamps.stamp(name))


@pytest.mark.parametrize(("journal_mode", "reads_wal_index"), [("wal", True), ("delete", False)])
def test_every_commit_elsewhere_is_seen_by_the_next_read(
    tmp_path: Path, journal_mode: str, reads_wal_index: bool
) -> None:
    path = tmp_path / "tufa.db"
    _database(path, journal_mode)
    # A connection that stays open, as the server's own pool keeps one.
    held = sqlite3.connect(path, isolation_level=None)
    held.execute("SELECT 1").fetchall()
    stamps = SqliteStamps(f"sqlite:///{path}")
    try:
        assert _stamp(stamps) == FactoryStamp(1, False, 1, 1)
        assert stamps.reads_wal_index is reads_wal_index
        for generation in range(2, 7):
            _commit_elsewhere(path, f"UPDATE factories SET auth_generation = {generation}")  # noqa: S608
            assert _stamp(stamps) == FactoryStamp(1, False, generation, 1)
        # A checkpoint that empties the WAL, then writes into it from its start again.
        _commit_elsewhere(
            path, "PRAGMA wal_checkpoint(TRUNCATE)", "UPDATE factories SET metadata_generation = 2"
        )
        assert _stamp(stamps) == FactoryStamp(1, False, 6, 2)
        _commit_elsewhere(path, "UPDATE factories SET anonymous_read = 1")
        assert _stamp(stamps) == FactoryStamp(1, True, 6, 2)
        # A factory made after its name was asked for, and one deleted.
        assert _stamp(stamps, "beta") is None
        _commit_elsewhere(path, "INSERT INTO factories VALUES (2, 'beta', 0, 1, 1)")
        assert _stamp(stamps, "beta") == FactoryStamp(2, False, 1, 1)
        _commit_elsewhere(path, "DELETE FROM factories WHERE name = 'acme'")
        assert _stamp(stamps) is None
    finally:
        asyncio.run(stamps.close())
        held.close()


def test_a_read_without_a_commit_elsewhere_keeps_what_it_read(tmp_path: Path) -> None:
    """What makes the poll path cheap: with nothing committed, no statement runs, so a
    change this connection could not see (its own table, altered under it) stays unseen."""
    path = tmp_path / "tufa.db"
    _database(path, "wal")
    stamps = SqliteStamps(f"sqlite:///{path}")
    try:
        first = _stamp(stamps)
        assert stamps.reads_wal_index
        statements = 0

        def count(_statement: str) -> None:
            nonlocal statements
            statements += 1

        conn = stamps._conn
        assert conn is not None
        conn.set_trace_callback(count)
        for _ in range(100):
            assert _stamp(stamps) == first
        assert statements == 0
        _commit_elsewhere(path, "UPDATE factories SET auth_generation = 9")
        assert _stamp(stamps) == FactoryStamp(1, False, 9, 1)
        assert statements == 1
    finally:
        asyncio.run(stamps.close())


def _dead_man_switch(path: Path) -> str:
    """Whether another process could lock the wal-index's "dead man switch" byte for
    itself, which SQLite does to find a database no connection has open (and then
    resets the wal-index): "locked", "free", or "absent" (no wal-index file)."""
    script = (
        "import fcntl, os, sys\n"
        "if not os.path.exists(sys.argv[1]):\n"
        "    sys.exit(3)\n"  # removed by the last connection's close
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\n"
        "except OSError:\n"
        "    sys.exit(4)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, f"{path}-shm"], check=False)
    return {0: "free", 3: "absent", 4: "locked"}[done.returncode]


def test_mapping_the_wal_index_leaves_sqlites_own_locks_in_place(tmp_path: Path) -> None:
    """Closing a descriptor of a file drops all of a process's POSIX locks on it: had the
    stamps closed the one they mapped the wal-index with, the server's other connections
    would lose their locks, and another process would reset the file under them (the
    server died of SIGBUS in test_publish_limits)."""
    path = tmp_path / "tufa.db"
    _database(path, "wal")
    held = sqlite3.connect(path, isolation_level=None)
    held.execute("SELECT 1 FROM factories").fetchall()
    assert _dead_man_switch(path) == "locked"
    stamps = SqliteStamps(f"sqlite:///{path}")
    try:
        assert _stamp(stamps) == FactoryStamp(1, False, 1, 1)
        assert stamps.reads_wal_index
        assert _dead_man_switch(path) == "locked"
        asyncio.run(stamps.close())
        assert _dead_man_switch(path) == "locked"
        assert _stamp(stamps) == FactoryStamp(1, False, 1, 1)  # connects and maps again
        assert _dead_man_switch(path) == "locked"
    finally:
        asyncio.run(stamps.close())
        held.close()
    assert _dead_man_switch(path) == "absent"  # the last connection removed it
    unused = tmp_path / "unused.db"
    Path(f"{unused}-shm").write_bytes(bytes(256))
    assert _dead_man_switch(unused) == "free"  # the check can tell a lock is missing
