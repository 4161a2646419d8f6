"""`tufa-server`: run the service."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import uvicorn
from cryptography.exceptions import InvalidTag
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp

from tufa.core.command_help import EnvvarNamingGroup
from tufa.core.durations import DURATION
from tufa.core.files import default_database_url
from tufa.core.keys import KeyType
from tufa.server import ci_views
from tufa.server import workers as worker_handover
from tufa.server.app import create_app
from tufa.server.background import resign_pass
from tufa.server.blobs import BlobStore
from tufa.server.db import Database, server_facts
from tufa.server.repository import Repository
from tufa.server.secrets import MasterKey
from tufa.server.serving import (
    LOG_FORMATS,
    PortUnavailable,
    claim_port,
    configure_logging,
    serve,
    uvicorn_log_config,
)
from tufa.server.settings import Clock, OffsetClock, Settings
from tufa.server.state import ServerState
from tufa.server.tokens import (
    MAX_OPERATOR_TOKEN,
    MIN_OPERATOR_TOKEN,
    chosen_operator_token,
    ensure_operator_token,
    has_operator_token,
    rotate_operator_token,
    secret_shaped,
)

F = TypeVar("F", bound=Callable[..., Any])


@click.group(cls=EnvvarNamingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tufa")
def cli() -> None:
    """The tufa server: factories, TUF repositories, online signing, devices."""


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default="tufa-data",
    show_default=True,
    envvar="TUFA_DATA_DIR",
    help="Where the database, master key and blobs live.",
)
db_option = click.option(
    "--db",
    "db_url",
    envvar="TUFA_DB",
    help="Database URL; default: SQLite in the data dir. PostgreSQL: postgresql+psycopg://user@host/db",
)


def shared_path_option(flag: str, envvar: str, what: str, *, file: bool) -> Callable[[F], F]:
    """An option naming a file or directory that every replica must share with the others."""
    return click.option(
        flag,
        type=click.Path(file_okay=file, dir_okay=not file, path_type=Path),
        envvar=envvar,
        help=f"{what} Replicas sharing one database must share it.",
    )


def duration_option(flag: str, default: str, help: str | None = None) -> Callable[[F], F]:
    """A validity or interval, written as `90s`, `12h` or `30d`."""
    return click.option(flag, type=DURATION, default=default, show_default=True, help=help)


@cli.command()
@data_dir_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, envvar="TUFA_HOST")
@click.option("--port", default=8080, show_default=True, type=int, envvar="TUFA_PORT")
@shared_path_option(
    "--master-key-file",
    "TUFA_MASTER_KEY_FILE",
    "Key that encrypts online private keys [default: DATA_DIR/master.key].",
    file=True,
)
@click.option(
    "--online-key-type",
    type=click.Choice([t.value for t in KeyType]),
    default=KeyType.ED25519.value,
    show_default=True,
    envvar="TUFA_ONLINE_KEY_TYPE",
    help="Type of the online keys the server generates for new factories and rotations.",
)
@shared_path_option(
    "--blob-dir",
    "TUFA_BLOB_DIR",
    "Where uploaded target files are stored [default: DATA_DIR/blobs].",
    file=False,
)
@click.option(
    "--public-url",
    envvar="TUFA_PUBLIC_URL",
    help="Base URL devices use, if the server sits behind a proxy.",
)
@duration_option("--timestamp-expiry", "1d")
@duration_option("--snapshot-expiry", "7d")
@duration_option("--ci-targets-expiry", "30d")
@duration_option("--root-expiry", "365d", "Validity of roots the server creates.")
@duration_option("--prod-targets-expiry", "365d")
@duration_option("--resign-interval", "60s", "How often online metadata is checked for re-signing.")
@duration_option(
    "--rollout-interval", "15s", "How often staged rollouts are checked (to halt or advance)."
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
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="TUFA_LOG_FORMAT",
    help="json: one JSON object a line, an access line's fields as keys.",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    envvar="TUFA_ACCESS_LOG",
    help="A line for every request (method, path, status, duration, caller); "
    "refusals are logged with their reason either way.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    envvar="TUFA_WORKERS",
    help="Server processes sharing the port; one of them runs the re-signer.",
)
@click.option(
    "--poll-invalidation",
    type=click.Choice(["query", "notify"]),
    default="query",
    show_default=True,
    envvar="TUFA_POLL_INVALIDATION",
    help="PostgreSQL only: how a process learns that a factory's credentials or metadata "
    "changed. 'query' reads it for every batch of polls, so a revocation holds from the "
    "next request; 'notify' listens for changes (LISTEN/NOTIFY) and reads nothing while "
    "nothing changed, more polls a second, but a poll that reaches another process "
    "between a change's commit and its notification (milliseconds; at most about 3 s if "
    "notifications are lost) is answered as before it.",
)
@click.option(
    "--metrics-token",
    envvar="TUFA_METRICS_TOKEN",
    help="A secret (32 to 256 characters) that may read /metrics and nothing else; "
    "the operator token may always read it.",
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
    rollout_interval: timedelta,
    no_resign: bool,
    clock_offset_file: Path | None,
    log_level: str,
    log_format: str,
    access_log: bool,
    workers: int,
    poll_invalidation: str,
    metrics_token: str | None,
) -> None:
    """Run the HTTP service.

    The first start creates the database, the master key (DATA_DIR/master.key, mode
    0600) that encrypts online private keys, and the operator token, printed once.
    Set TUFA_OPERATOR_TOKEN in the first start's environment to choose it instead
    (32 to 256 printable ASCII characters, no spaces; a shorter one is refused at
    every start). Replace it later with `tufa-server rotate-operator-token`.
    A port already in use is refused before anything is created.

    \b
    Examples:
      tufa-server run --data-dir /var/lib/tufa
      tufa-server run --db postgresql+psycopg://tufa@db.example/tufa --port 9000
      tufa-server run --db postgresql+psycopg://tufa@db.example/tufa --workers 4
    """
    configure_logging(log_level, log_format)
    if metrics_token is not None and not secret_shaped(metrics_token):
        raise click.BadParameter(
            f"must be {MIN_OPERATOR_TOKEN} to {MAX_OPERATOR_TOKEN} printable ASCII characters "
            f"without spaces; it has {len(metrics_token)}. Choose a random one, e.g. "
            "$(openssl rand -hex 32)",
            param_hint="--metrics-token",
        )
    if poll_invalidation == "notify" and (db_url or "sqlite").startswith("sqlite"):
        raise click.BadParameter(
            "'notify' needs PostgreSQL (--db postgresql+psycopg://...); on SQLite every "
            "poll already learns of changes from the database file's shared memory",
            param_hint="--poll-invalidation",
        )
    try:
        claim_port(host, port)
    except PortUnavailable as e:
        raise click.ClickException(f"cannot start: {e}") from None
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
        rollout_interval=rollout_interval,
        resign_enabled=not no_resign,
        clock=OffsetClock(clock_offset_file) if clock_offset_file else Clock(),
        metrics_token_sha256=hashlib.sha256(metrics_token.encode()).hexdigest()
        if metrics_token
        else None,
        poll_invalidation=poll_invalidation,
        access_log=access_log,
    )
    try:
        state = open_state(settings)
    except Exception as e:
        raise click.ClickException(f"cannot start: {e}") from e
    if workers == 1:
        serve(create_app(state), host, port, log_level)
        return
    # Start-up work happens once, here, before any worker serves: migrations, the
    # operator token (printed once), and the first re-signing pass.
    if settings.resign_enabled:
        asyncio.run(resign_pass(state))
    state.db.dispose()
    worker_handover.hand_over(settings, log_level, log_format)
    uvicorn.run(
        f"{__name__}:worker_app",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        log_config=uvicorn_log_config(),
        access_log=False,
    )


def worker_app() -> ASGIApp:
    """One worker of `run --workers N`: the state its parent prepared, opened again."""
    settings, log_level, log_format = worker_handover.handed_over()
    configure_logging(log_level, log_format)
    master_key = MasterKey.load(settings.master_key_path)
    db = Database(settings.db_url)
    state = _state(settings, db, Repository(db, master_key, settings))
    return create_app(state, first_resign_pass=False)


@cli.command("rotate-operator-token")
@data_dir_option
@db_option
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "token"} as JSON.')
def rotate_operator_token_command(data_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Replace the operator token and print the new one, once.

    The old token is refused from the moment this finishes, by every server replica
    sharing the database; the servers keep running. Run it where the server's database
    is reachable (the data directory for SQLite, or --db). With the current operator
    token, `POST /api/v1/operator-token` does the same over HTTP.

    \b
    Examples:
      tufa-server rotate-operator-token --data-dir /var/lib/tufa
      tufa-server rotate-operator-token --db postgresql+psycopg://tufa@db.example/tufa --json
    """
    url = db_url or default_database_url(data_dir)
    if db_url is None and not (data_dir / "tufa.db").exists():
        raise click.ClickException(
            f"no database in {data_dir}: pass the server's --data-dir (or --db), or start "
            "the server once (`tufa-server run`) to create the operator token"
        )
    db = Database(url)
    try:
        with db.startup() as conn:
            db.migrate(conn)
            if not has_operator_token(conn):
                raise click.ClickException(
                    "this database has no operator token yet: start the server once "
                    "(`tufa-server run`), which creates it"
                )
            token = rotate_operator_token(conn, datetime.now(UTC))
    except SQLAlchemyError as e:
        raise click.ClickException(f"cannot use the database {url}: {e}") from e
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps({"id": token.id, "token": token.secret}))
        return
    click.echo(
        "New operator token (shown once; the old one no longer works, on any replica):\n"
        f"  {token.secret}"
    )


def open_state(settings: Settings) -> ServerState:
    """Open (creating on first start) the master key and database of a data directory."""
    chosen_token = chosen_operator_token()
    db = Database(settings.db_url)
    with db.startup() as conn:
        db.migrate(conn)
        master_key = _open_master_key(conn, settings)
        repo = Repository(db, master_key, settings)
        ci_views.upgrade(repo, conn)
        created = ensure_operator_token(conn, settings.clock.now(), chosen_token)
    if created is not None:
        print(
            f"Operator token (shown once; keep it safe, it creates factories):\n  {created}",
            flush=True,
        )
    return _state(settings, db, repo)


def _state(settings: Settings, db: Database, repo: Repository) -> ServerState:
    return ServerState(
        settings=settings,
        db=db,
        master_key=repo.master_key,
        repo=repo,
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
