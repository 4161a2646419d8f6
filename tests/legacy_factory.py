"""A factory created by tufa before its channels were separated (ADR 0009), for tests.

`tests/data/legacy-factory/` holds what the last release before ADR 0009 left behind
(made by `make.sh` there): the rows of its schema-0005 database, the master key, the
blob store, the owner's downloaded keys archive (format 1) and the admin token. Its
factory `legacy` has CI builds 1 and 2 and production release 1 (wave `release-1`).
`install` writes it where a server starts from, on either backend; the server then
migrates it as it would an upgraded installation.
"""

from __future__ import annotations

import base64
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, create_engine, insert, text

import tufa.server.db
from tufa.core.files import default_database_url

FIXTURE = Path(__file__).parent / "data" / "legacy-factory"
NAME = "legacy"
SCHEMA = "0005"  # the schema the fixture was made with
_TOKENS = json.loads((FIXTURE / "tokens.json").read_text())
ADMIN_TOKEN: str = _TOKENS["admin"]


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    if isinstance(value, dict) and "datetime" in value:
        return datetime.fromisoformat(value["datetime"])
    return value


def install(data_dir: Path, db_url: str | None, *, open_update: bool = False) -> None:
    """Write the fixture's database (SQLite in `data_dir`, or the empty database at
    `db_url`), master key and blobs, as a server at schema 0005 left them; with
    `open_update`, with a root update left open that rotated the online timestamp key."""
    data_dir.mkdir(parents=True)
    url = db_url or default_database_url(data_dir)
    engine = create_engine(url)
    rows = json.loads((FIXTURE / "tables.json").read_text())
    if open_update:
        rows.update(_open_update(rows))
    try:
        with engine.begin() as conn:
            config = Config()
            migrations = Path(tufa.server.db.__file__).parent / "migrations"
            config.set_main_option("script_location", str(migrations))
            config.attributes["connection"] = conn
            command.upgrade(config, SCHEMA)
            schema = MetaData()
            schema.reflect(conn)
            for table in schema.sorted_tables:
                found = rows.get(table.name, [])
                if table.name != "alembic_version" and found:
                    decoded = [{k: _decode(v) for k, v in row.items()} for row in found]
                    conn.execute(insert(table), decoded)
            if conn.dialect.name == "postgresql":
                # Rows came with their ids: move each sequence past them.
                for name in ("factories", "online_keys"):
                    conn.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "  # noqa: S608
                            f"(SELECT MAX(id) FROM {name}))"
                        )
                    )
    finally:
        engine.dispose()
    shutil.copytree(FIXTURE / "blobs", data_dir / "blobs")
    master = data_dir / "master.key"
    shutil.copy(FIXTURE / "master.key", master)
    master.chmod(0o600)


def _open_update(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The rows `tufa keys updates init` and `rotate-online-key -r timestamp` would have
    added before the upgrade: the staged roots (unsigned) and a pending online key."""
    (factory,) = rows["factories"]
    roots = {
        r["channel"]: r["body"]
        for r in rows["metadata_files"]
        if r["role"] == "root" and r["version"] == 1
    }
    timestamp_key = next(k for k in rows["online_keys"] if k["role"] == "timestamp")
    pending = {**timestamp_key, "id": 1000, "pending": True}
    created = {"datetime": "2026-11-30T12:00:00"}
    update = {"factory_id": factory["id"], "message": "opened before the upgrade",
              "created_at": created, "ci_root": roots["ci"], "prod_root": roots["prod"],
              "prod_targets": "{}"}  # fmt: skip
    return {"online_keys": [*rows["online_keys"], pending], "root_updates": [update]}


def archive_copy(where: Path) -> Path:
    """The owner's keys archive as downloaded (format 1), copied to `where` (0600)."""
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "legacy-keys.tgz", where)
    where.chmod(0o600)
    return where
