"""The database: schema, engines and the two kinds of transaction the server uses.

SQLite (one file in the data directory) is the default and PostgreSQL the scale-out
store. Writes that publish metadata are serialised per channel: PostgreSQL locks the
channel's row (`SELECT ... FOR UPDATE`); SQLite takes its database-wide write lock at
the start of every write transaction (`BEGIN IMMEDIATE`), so no two writers interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    select,
    text,
)

from tufa.core.metadata import Channel
from tufa.server.sql_types import ChannelName, UTCDateTime

log = logging.getLogger("tufa.server")


schema = MetaData()


def _per_factory(name: str, *columns: Column[Any] | Index) -> Table:
    """A table of what each factory has of its own, keyed by the factory first."""
    return Table(
        name,
        schema,
        Column("factory_id", Integer, ForeignKey("factories.id"), primary_key=True),
        *columns,
    )


# Server-wide facts; "master_key_check" proves at start that the master key given is the
# one that encrypted this database's private keys.
server_facts = Table(
    "server_facts",
    schema,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

factories = Table(
    "factories",
    schema,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("anonymous_read", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("archive_downloaded_at", UTCDateTime),
    # Bumped by triggers (migration 0009) in the transaction of every change to who may
    # read the factory, and to its metadata files: a server's poll cache is valid while
    # they stand still (ADR 0014).
    Column("auth_generation", BigInteger, nullable=False, server_default="0"),
    Column("metadata_generation", BigInteger, nullable=False, server_default="0"),
)

# One row per factory and channel: the version counters that every view of the channel
# shares, and the row publishers lock to serialise their work.
channels = _per_factory(
    "channels",
    Column("channel", ChannelName, primary_key=True),
    Column("root_version", Integer, nullable=False),
    Column("targets_version", Integer, nullable=False),
    Column("snapshot_version", Integer, nullable=False),
    Column("timestamp_version", Integer, nullable=False),
)

# A view's name: "", "tag:T", "wave:NAME", or "ci:HARDWARE_ID/TAG" (views.py), whose
# two labels may have 128 characters each.
VIEW_LENGTH = 300

# Signed metadata, rendered to bytes once when published. `view` is "" for the
# channel's default view; root files belong to the whole channel and use "".
metadata_files = _per_factory(
    "metadata_files",
    Column("channel", ChannelName, primary_key=True),
    Column("view", String(VIEW_LENGTH), primary_key=True),
    Column("role", String(16), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("etag", String(80), nullable=False),
    Column("expires", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Every channel has online keys of its own (ADR 0009): a file one channel's online key
# signed never verifies for a client of the other channel.
online_keys = Table(
    "online_keys",
    schema,
    Column("id", Integer, primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False, index=True),
    Column("channel", ChannelName, nullable=False),
    Column("role", String(16), nullable=False),
    Column("keyid", String(128), nullable=False),
    Column("public", Text, nullable=False),
    Column("private_encrypted", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime),
    # Generated for an open root update; signs nothing until the update is applied.
    Column("pending", Boolean, nullable=False, default=False, server_default=false()),
)

# Every target CI has published: the inventory behind the CI targets metadata, the
# source that waves build production targets from, and what devices may download.
# `url` is set for external targets (described only); the others name a blob the
# factory owns (`blob_owners`).
targets = _per_factory(
    "targets",
    Column("name", String(255), primary_key=True),
    Column("length", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("url", Text),
    Column("custom", Text, nullable=False),
    Column("version", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # When the target left the CI targets (`prune` or `delete`); production views that
    # list it keep serving it.
    Column("pruned_at", UTCDateTime),
    # Set when a wave first includes the target: production devices may download it.
    Column("released_at", UTCDateTime),
    # The target's entry in a targets file, encoded when it was published
    # (core/assembled_targets.py); `entry_canonical` only where the two encodings differ.
    # Null for targets published before entries were stored, until the server's start
    # fills them in (ci_views.upgrade).
    Column("entry", Text),
    Column("entry_canonical", Text),
    # Waves look a build up by version. Led by it, not by the factory: a plan made
    # without statistics could take it for a lookup by (factory_id, name) (migration 0012).
    Index("ix_targets_version_factory_id", "version", "factory_id"),
)

# Which CI view lists which target: one row per (hardware id, tag) of each target in
# the CI targets (not pruned or deleted). A CI device is served the view of its own
# hardware id and tag (ADR 0016), so a publish re-signs only the views it changes.
ci_view_targets = _per_factory(
    "ci_view_targets",
    Column("view", String(VIEW_LENGTH), primary_key=True),
    Column("name", String(255), primary_key=True),
    # Led by the name, for the reason the version index of `targets` is (migration 0012).
    Index("ix_ci_view_targets_name_factory_id", "name", "factory_id"),
)

# Which factory may use which stored file. The blob store keeps one file per SHA-256
# for the whole server; access is per factory: a row exists once the factory uploaded
# the bytes itself (or, for targets published before this table, referenced them).
blob_owners = _per_factory(
    "blob_owners",
    Column("sha256", String(64), primary_key=True),
    Column("length", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Releases on demand: production targets for a tag, signed offline, served to the
# devices a rollout chose until the wave is completed (or cancelled).
waves = _per_factory(
    "waves",
    Column("name", String(64), primary_key=True),
    Column("tag", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("targets_version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("targets", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
)

device_groups = _per_factory(
    "device_groups",
    Column("name", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
)

device_group_members = _per_factory(
    "device_group_members",
    Column("group_name", String(64), primary_key=True),
    Column("device_id", String(36), ForeignKey("devices.id"), primary_key=True),
)

# The owner's root keys: each is a pair of keys, its CI half listed by the CI root and
# its production half by the production root (ADR 0009). Factories created before the
# channels were separated have pairs whose halves are the same key.
root_key_pairs = _per_factory(
    "root_key_pairs",
    Column("ci_keyid", String(128), primary_key=True),
    Column("prod_keyid", String(128), nullable=False),
)

# The one open root update of a factory: the staged roots of both channels (signed
# metadata JSON, collecting signatures), the staged root key pairs (JSON), and any
# re-signed production targets per view.
root_updates = _per_factory(
    "root_updates",
    Column("message", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("ci_root", LargeBinary, nullable=False),
    Column("prod_root", LargeBinary, nullable=False),
    Column("prod_targets", Text, nullable=False, default="{}"),
    Column("root_key_pairs", Text, nullable=False, default="[]", server_default="[]"),
)

# The offline keys archive waits here, encrypted, until its owner confirms the download.
key_archives = _per_factory(
    "key_archives",
    Column("archive_encrypted", LargeBinary, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

tokens = Table(
    "tokens",
    schema,
    Column("id", String(32), primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), index=True),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("scopes", String(200), nullable=False),
    Column("description", String(200), nullable=False, default=""),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
)

devices = Table(
    "devices",
    schema,
    Column("id", String(36), primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("hardware_id", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("channel", ChannelName, nullable=False),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    # When the current credential took effect: registration, or the first use of the
    # credential a rotation issued (ADR 0011). Always set; nullable only because SQLite
    # cannot add a NOT NULL column to a table that others refer to without rebuilding it.
    Column("credential_since", UTCDateTime),
    # The credential a rotation issued and the device has not used yet; the current one
    # stays valid until it is used once, so a power cut on the device loses neither.
    Column("pending_secret_sha256", String(64)),
    # Set by `tufa devices revoke`: every credential of the device is refused from then on.
    Column("revoked_at", UTCDateTime),
    # Which view the device is served: "ci:HARDWARE_ID/TAG" in CI; "tag:T" or "wave:NAME"
    # in production.
    Column("view", String(VIEW_LENGTH), nullable=False, default="", server_default=""),
    # What the device last said it runs (all None until it reports something installed),
    # and when its last report arrived, by the server's clock.
    Column("installed_version", String(64)),
    Column("installed_target", String(255)),
    Column("installed_sha256", String(64)),
    Column("last_report_at", UTCDateTime),
    # The timestamp the device's last report said it verified, and its poll interval in
    # seconds (NULL when it did not say): what tells a device fed stale metadata (ADR 0018).
    Column("verified_timestamp_version", Integer),
    Column("verified_timestamp_expires", UTCDateTime),
    Column("poll_interval", Integer),
    # When a wave last moved the device to another view: a report from before says
    # nothing of how stale the new view's files are to it.
    Column("view_since", UTCDateTime),
    UniqueConstraint("factory_id", "name"),
    Index("ix_devices_pending_secret_sha256", "pending_secret_sha256", unique=True),
)

# What devices report happened: downloads, installs, failures. `id` is the agent's own,
# so a report resent after a crash stores nothing twice; `at` is the device's clock,
# `received_at` the server's. Waves count failures per version of a factory.
device_events = Table(
    "device_events",
    schema,
    Column("device_id", String(36), ForeignKey("devices.id"), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("version", String(64)),
    Column("target", String(255)),
    Column("detail", Text, nullable=False),
    Index("ix_device_events_factory_id_version", "factory_id", "version"),
)


# Device credentials that no longer work, so that whoever still uses one is told why
# (replaced by a rotation, or its device deleted) instead of "unknown token". Only the
# SHA-256 is kept, as for live credentials; the device may no longer exist.
retired_credentials = Table(
    "retired_credentials",
    schema,
    Column("secret_sha256", String(64), primary_key=True),
    Column("factory_id", Integer, ForeignKey("factories.id"), nullable=False),
    Column("device_id", String(36), nullable=False),
    Column("device_name", String(128), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("retired_at", UTCDateTime, nullable=False),
    Index("ix_retired_credentials_factory_id_device_name", "factory_id", "device_name"),
)


class Database:
    """Engines for one database URL, with read and write transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._writer = _sqlite_engine(url, immediate=True)
            self._reader = _sqlite_engine(url, immediate=False)
        else:
            # At most 15 connections a process: replicas and workers share PostgreSQL's
            # max_connections (100 by default); a request waits for a free connection
            # rather than failing for want of one.
            self._writer = create_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
            self._reader = self._writer

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._reader.begin() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that commits on success and rolls everything back on any error."""
        with self._writer.begin() as conn:
            yield conn

    def lock_channel(self, conn: Connection, factory_id: int, channel: Channel) -> None:
        """Serialise publishers of one channel until the transaction ends."""
        if self.is_sqlite:
            return  # BEGIN IMMEDIATE already holds the database's write lock.
        conn.execute(
            select(channels.c.factory_id)
            .where(channels.c.factory_id == factory_id, channels.c.channel == channel)
            .with_for_update()
        )

    def purge_deleted_bytes(self) -> None:
        """Make deleted secrets unrecoverable from the database files.

        SQLite runs with `secure_delete`, which zeroes freed pages; the write-ahead log
        still holds old page images until it is checkpointed and truncated. PostgreSQL
        keeps dead row versions until the table is rewritten.
        """
        if self.is_sqlite:
            # Outside any transaction: a checkpoint cannot run inside one.
            raw = self._writer.raw_connection()
            try:
                for _attempt in range(50):
                    busy, _, _ = raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    if not busy:
                        return
                    time.sleep(0.1)  # a reader holds an old snapshot; wait for it to finish
                log.warning("could not truncate the SQLite WAL: readers kept it busy")
            finally:
                raw.close()
        else:
            with self._writer.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM FULL key_archives")

    @contextmanager
    def startup(self) -> Iterator[Connection]:
        """A write transaction that server replicas starting together take one at a time;
        operator token rotations take it too, so that one live operator token remains."""
        with self._writer.begin() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(7412300)"))
            yield conn

    def migrate(self, conn: Connection) -> None:
        """Bring the schema to the newest migration, on a `startup` connection."""
        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")

    def dispose(self) -> None:
        self._writer.dispose()
        self._reader.dispose()


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event decide how transactions start.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
