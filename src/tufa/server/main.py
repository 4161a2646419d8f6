"""`tufa-server`: run the service."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import click
import uvicorn
from cryptography.exceptions import InvalidTag
from sqlalchemy import Connection, insert, select

from tufa.core.durations import parse_duration
from tufa.core.files import default_database_url
from tufa.core.keys import KeyType
from tufa.server.app import create_app
from tufa.server.auth import OPERATOR_SCOPE
from tufa.server.blobs import BlobStore
from tufa.server.db import Database, server_facts, tokens
from tufa.server.repository import Repository
from tufa.server.secrets import MasterKey
from tufa.server.settings import Clock, OffsetClock, Settings
from tufa.server.state import ServerState
from tufa.server.tokens import create_operator_token


class Duration(click.ParamType[timedelta]):
    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tufa")
def cli() -> None:
    """The tufa server: factories, TUF repositories, online signing, devices."""


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default="tufa-data",
    show_default=True,
    envvar="TUFA_DATA_DIR",
    help="Where the database, master key and blobs live.",
)
@click.option(
    "--db",
    "db_url",
    envvar="TUFA_DB",
    help="Database URL; default: SQLite in the data dir. PostgreSQL: postgresql+psycopg://user@host/db",
)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="TUFA_HOST")
@click.option("--port", default=8080, show_default=True, type=int, envvar="TUFA_PORT")
@click.option(
    "--master-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TUFA_MASTER_KEY_FILE",
    help="Key that encrypts online private keys [default: DATA_DIR/master.key]. "
    "Replicas sharing one database must share it.",
)
@click.option(
    "--online-key-type",
    type=click.Choice([t.value for t in KeyType]),
    default=KeyType.ED25519.value,
    show_default=True,
    envvar="TUFA_ONLINE_KEY_TYPE",
    help="Type of the online keys the server generates for new factories and rotations.",
)
@click.option(
    "--blob-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TUFA_BLOB_DIR",
    help="Where uploaded target files are stored [default: DATA_DIR/blobs]. Replicas "
    "sharing one database must share it.",
)
@click.option(
    "--public-url",
    envvar="TUFA_PUBLIC_URL",
    help="Base URL devices use, if the server sits behind a proxy.",
)
@click.option("--timestamp-expiry", type=DURATION, default="1d", show_default=True)
@click.option("--snapshot-expiry", type=DURATION, default="7d", show_default=True)
@click.option("--ci-targets-expiry", type=DURATION, default="30d", show_default=True)
@click.option(
    "--root-expiry",
    type=DURATION,
    default="365d",
    show_default=True,
    help="Validity of roots the server creates.",
)
@click.option("--prod-targets-expiry", type=DURATION, default="365d", show_default=True)
@click.option(
    "--resign-interval",
    type=DURATION,
    default="60s",
    show_default=True,
    help="How often online metadata is checked for re-signing.",
)
@click.option(
    "--no-resign",
    is_flag=True,
    help="Do not re-sign online metadata (debugging only: it will expire).",
)
@click.option(
    "--clock-offset-file",
    type=click.Path(path_type=Path),
    hidden=True,
    envvar="TUFA_CLOCK_OFFSET_FILE",
    help="Test hook: seconds to add to the clock, re-read on every use.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(
    data_dir: Path,
    db_url: str | None,
    host: str,
    port: int,
    master_key_file: Path | None,
    online_key_type: str,
    blob_dir: Path | None,
    public_url: str | None,
    timestamp_expiry: timedelta,
    snapshot_expiry: timedelta,
    ci_targets_expiry: timedelta,
    root_expiry: timedelta,
    prod_targets_expiry: timedelta,
    resign_interval: timedelta,
    no_resign: bool,
    clock_offset_file: Path | None,
    log_level: str,
) -> None:
    """Run the HTTP service.

    The first start creates the database, the master key (DATA_DIR/master.key, mode
    0600) that encrypts online private keys, and the operator token, printed once.
    Set TUFA_OPERATOR_TOKEN in the first start's environment to choose it instead.

    \b
    Examples:
      tufa-server run --data-dir /var/lib/tufa
      tufa-server run --db postgresql+psycopg://tufa@db.example/tufa --port 9000
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # python-tuf logs every missing signature at INFO; that is routine while signing.
    logging.getLogger("tuf").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings = Settings(
        data_dir=data_dir,
        db_url=db_url or default_database_url(data_dir),
        host=host,
        port=port,
        public_url=public_url,
        master_key_file=master_key_file,
        online_key_type=KeyType(online_key_type),
        blob_dir=blob_dir,
        timestamp_expiry=timestamp_expiry,
        snapshot_expiry=snapshot_expiry,
        ci_targets_expiry=ci_targets_expiry,
        root_expiry=root_expiry,
        prod_targets_expiry=prod_targets_expiry,
        resign_interval=resign_interval,
        resign_enabled=not no_resign,
        clock=OffsetClock(clock_offset_file) if clock_offset_file else Clock(),
    )
    try:
        state = open_state(settings)
    except Exception as e:
        raise click.ClickException(f"cannot start: {e}") from e
    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, access_log=False)


def open_state(settings: Settings) -> ServerState:
    """Open (creating on first start) the master key and database of a data directory."""
    db = Database(settings.db_url)
    with db.startup() as conn:
        db.migrate(conn)
        master_key = _open_master_key(conn, settings)
        created = _ensure_operator_token(conn, settings)
    if created is not None:
        print(
            f"Operator token (shown once; keep it safe, it creates factories):\n  {created}",
            flush=True,
        )
    return ServerState(
        settings=settings,
        db=db,
        master_key=master_key,
        repo=Repository(db, master_key, settings),
        blobs=BlobStore(settings.blob_path),
    )


def _open_master_key(conn: Connection, settings: Settings) -> MasterKey:
    """The master key; created with a new database, and refused unless it is the one the
    database was created with (its check value must decrypt)."""
    purpose = "master-key-check"
    path = settings.master_key_path
    stored = conn.execute(
        select(server_facts.c.value).where(server_facts.c.name == purpose)
    ).scalar()
    if stored is None:
        master_key = MasterKey.load(path) if path.exists() else MasterKey.create(path)
        conn.execute(
            insert(server_facts).values(name=purpose, value=master_key.encrypt(b"tufa", purpose))
        )
        return master_key
    if not path.exists():
        raise RuntimeError(
            f"master key file {path} not found, but this database already has online keys "
            "encrypted with a master key: copy that key file here or pass --master-key-file"
        )
    master_key = MasterKey.load(path)
    try:
        master_key.decrypt(stored, purpose)
    except InvalidTag:
        raise RuntimeError(
            f"the master key {settings.master_key_path} is not the one this database was "
            "created with; every replica must use the same key (copy it and pass "
            "--master-key-file)"
        ) from None
    return master_key


def _ensure_operator_token(conn: Connection, settings: Settings) -> str | None:
    """Create the operator token on first start; return its secret if it must be shown."""
    exists = conn.execute(
        select(tokens.c.id).where(tokens.c.scopes == OPERATOR_SCOPE).limit(1)
    ).first()
    if exists:
        return None
    chosen = os.environ.get("TUFA_OPERATOR_TOKEN")
    token = create_operator_token(conn, settings.clock.now(), chosen)
    return None if chosen else token.secret
