"""The triggers that bump `factories.metadata_generation` (migrations 0010 and 0011), on
a database migrated as a server migrates it: every statement that adds, changes or
removes metadata files moves the counter of each factory whose files it touched, in
its own transaction, and of no other factory. On PostgreSQL a statement bumps once
(0011), however many rows it touches; SQLite bumps once per row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, delete, insert, select, update

from tests.conftest import BACKENDS
from tufa.core.metadata import TARGETS, Channel
from tufa.server.db import Database, factories, metadata_files
from tufa.server.sql_types import insert_rows

NOW = datetime(2026, 12, 3, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def db(
    request: pytest.FixtureRequest, tmp_path: Path, make_db_url: Callable[[str], str | None]
) -> Iterator[Database]:
    url = make_db_url(request.param) or f"sqlite:///{tmp_path / 'tufa.db'}"
    database = Database(url)
    with database.startup() as conn:
        database.migrate(conn)
    yield database
    database.dispose()


def _factory(conn: Connection, name: str) -> int:
    row = {"name": name, "anonymous_read": False, "created_at": NOW}
    factory_id: int = conn.execute(insert(factories).returning(factories.c.id), row).scalar_one()
    return factory_id


def _file(factory_id: int, version: int) -> dict[str, object]:
    return {
        "factory_id": factory_id,
        "channel": Channel.CI,
        "view": "",
        "role": TARGETS,
        "version": version,
        "body": b"{}",
        "etag": '"e"',
        "expires": NOW,
        "created_at": NOW,
    }


def _generations(conn: Connection, *ids: int) -> list[int]:
    found = dict(conn.execute(select(factories.c.id, factories.c.metadata_generation)).all())
    return [found[i] for i in ids]


def test_a_statement_over_many_files_bumps_each_factory_it_touched(db: Database) -> None:
    per_row = db.is_sqlite  # SQLite has row triggers only
    with db.write() as conn:
        a, b, c = (_factory(conn, name) for name in ("a", "b", "c"))
        before = _generations(conn, a, b, c)

        # One multi-row INSERT, then what the server stores files by (one COPY on
        # PostgreSQL).
        conn.execute(insert(metadata_files).values([_file(a, 1), _file(a, 2), _file(b, 1)]))
        insert_rows(conn, metadata_files, [_file(a, 3), _file(a, 4)])
        inserted = _generations(conn, a, b, c)  # in the same transaction, before commit
        assert inserted == [before[0] + (4 if per_row else 2), before[1] + 1, before[2]]

        of_a = metadata_files.c.factory_id == a
        conn.execute(update(metadata_files).where(of_a).values(etag="x"))
        updated = _generations(conn, a, b, c)
        assert updated == [inserted[0] + (4 if per_row else 1), inserted[1], inserted[2]]

        # A file moved from one factory to another changes both.
        conn.execute(
            update(metadata_files)
            .where(metadata_files.c.factory_id == b, metadata_files.c.version == 1)
            .values(factory_id=c)
        )
        moved = _generations(conn, a, b, c)
        assert moved == [updated[0], updated[1] + 1, updated[2] + 1]

        conn.execute(delete(metadata_files).where(metadata_files.c.factory_id.in_([a, c])))
        deleted = _generations(conn, a, b, c)
        assert deleted == [moved[0] + (4 if per_row else 1), moved[1], moved[2] + 1]

        # Statements that touch no file move nothing.
        conn.execute(update(metadata_files).where(of_a).values(etag="y"))
        conn.execute(delete(metadata_files).where(metadata_files.c.factory_id == b))
        assert _generations(conn, a, b, c) == deleted
    with db.read() as conn:
        assert _generations(conn, a, b, c) == deleted


def test_a_bump_rolled_back_with_its_statement_leaves_the_counter(db: Database) -> None:
    with db.write() as conn:
        factory_id = _factory(conn, "a")
        (before,) = _generations(conn, factory_id)

    def store_then_fail() -> None:
        with db.write() as conn:
            insert_rows(conn, metadata_files, [_file(factory_id, v) for v in (1, 2)])
            assert _generations(conn, factory_id) != [before]
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        store_then_fail()
    with db.read() as conn:
        assert _generations(conn, factory_id) == [before]
