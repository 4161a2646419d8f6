"""A factory's TUF repositories as stored by the server: online keys, signed metadata,
and the publishing steps that keep both channels valid.

Metadata is rendered to bytes once, when it is signed, and stored with its ETag; the
read path only looks bytes up. Versioned files never change, so they are cached here
and may be cached by any CDN; `timestamp.json` and `root.json` are looked up each time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from securesystemslib.signer import Signer
from sqlalchemy import Connection, bindparam, insert, select, update
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.keys import KeyPair, key_from_json, key_to_json
from tufa.core.metadata import (
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    AnySigned,
    Channel,
    build_snapshot,
    build_targets,
    build_timestamp,
    expiry,
    sign,
    to_bytes,
)
from tufa.server.db import Database, channels, metadata_files, online_keys
from tufa.server.secrets import MasterKey
from tufa.server.settings import Settings

log = logging.getLogger("tufa.server")

DEFAULT_VIEW = ""


@dataclass(frozen=True)
class StoredFile:
    role: str
    version: int
    body: bytes
    etag: str
    expires: datetime


class _ImmutableFileCache:
    """An LRU of versioned metadata files, which never change once published."""

    def __init__(self, size: int = 4096) -> None:
        self._items: OrderedDict[tuple[int, str, str, int], StoredFile] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str, str, int]) -> StoredFile | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[int, str, str, int], item: StoredFile) -> None:
        with self._lock:
            self._items[key] = item
            if len(self._items) > self._size:
                self._items.popitem(last=False)


# Built once: the read path runs these for every device poll, and building a statement
# costs more than executing it.
_FILE_COLUMNS = select(
    metadata_files.c.role,
    metadata_files.c.version,
    metadata_files.c.body,
    metadata_files.c.etag,
    metadata_files.c.expires,
).where(
    metadata_files.c.factory_id == bindparam("factory_id"),
    metadata_files.c.channel == bindparam("channel"),
    metadata_files.c.role == bindparam("role"),
)
# Versions come from counters shared by all views of a channel, so a version names one
# file whichever view it was published in (a completed wave's targets, copied to its
# tag's view, are the same bytes under the same version).
_FILE_BY_VERSION = _FILE_COLUMNS.where(metadata_files.c.version == bindparam("version")).limit(1)
_NEWEST_FILE = (
    _FILE_COLUMNS.where(metadata_files.c.view == bindparam("view"))
    .order_by(metadata_files.c.version.desc())
    .limit(1)
)


def _live(factory_id: int, *, pending: bool = False) -> tuple[Any, ...]:
    """Online keys in force (or, with `pending`, generated for the open root update)."""
    return (
        online_keys.c.factory_id == factory_id,
        online_keys.c.retired_at.is_(None),
        online_keys.c.pending.is_(pending),
    )


OnlineKeyids = dict[Channel, dict[str, str]]


class Repository:
    def __init__(self, db: Database, master_key: MasterKey, settings: Settings) -> None:
        self.db = db
        self.master_key = master_key
        self.settings = settings
        self._cache = _ImmutableFileCache()

    # -- online keys ------------------------------------------------------------------

    def store_online_key(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        role: str,
        pair: KeyPair,
        pending: bool = False,
    ) -> None:
        conn.execute(
            insert(online_keys).values(
                factory_id=factory_id,
                channel=channel.value,
                role=role,
                keyid=pair.keyid,
                public=key_to_json(pair.public).decode(),
                private_encrypted=self.master_key.encrypt(
                    pair.private_pem, f"online-key:{pair.keyid}"
                ),
                created_at=self.settings.clock.now(),
                pending=pending,
            )
        )

    def retire_online_key(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        role: str,
        now: datetime,
        *,
        pending: bool = False,
    ) -> None:
        """`channel`'s online `role` key in force (or the pending one) signs no more."""
        conn.execute(
            update(online_keys)
            .where(
                *_live(factory_id, pending=pending),
                online_keys.c.channel == channel.value,
                online_keys.c.role == role,
            )
            .values(retired_at=now)
        )

    def online_signer(
        self, conn: Connection, factory_id: int, channel: Channel, role: str
    ) -> Signer:
        """The signer of `channel`'s online key in force for `role` (pending keys sign
        nothing)."""
        row = conn.execute(
            select(online_keys)
            .where(
                *_live(factory_id),
                online_keys.c.channel == channel.value,
                online_keys.c.role == role,
            )
            .order_by(online_keys.c.id.desc())
            .limit(1)
        ).one()
        private = self.master_key.decrypt(row.private_encrypted, f"online-key:{row.keyid}")
        return KeyPair.from_pem(private, key_from_json(row.public.encode())).signer()

    def online_keyids(
        self, conn: Connection, factory_id: int, *, pending: bool = False
    ) -> OnlineKeyids:
        """Channel -> role -> key id of the online keys in force (or pending)."""
        rows = conn.execute(
            select(online_keys.c.channel, online_keys.c.role, online_keys.c.keyid)
            .where(*_live(factory_id, pending=pending))
            .order_by(online_keys.c.id)
        ).all()
        found: OnlineKeyids = {channel: {} for channel in Channel}
        for channel, role, keyid in rows:
            found[Channel(channel)][role] = keyid
        return found

    # -- storing and reading metadata ---------------------------------------------------

    def store(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        md: Metadata[AnySigned],
        view: str = DEFAULT_VIEW,
    ) -> bytes:
        body = to_bytes(md)
        conn.execute(
            insert(metadata_files).values(
                factory_id=factory_id,
                channel=channel.value,
                view=DEFAULT_VIEW if md.signed.type == ROOT else view,
                role=md.signed.type,
                version=md.signed.version,
                body=body,
                etag=f'"{hashlib.sha256(body).hexdigest()}"',
                expires=md.signed.expires,
                created_at=self.settings.clock.now(),
            )
        )
        return body

    def read_file(
        self,
        conn: Connection,
        factory_id: int,
        channel: str,
        role: str,
        version: int | None,
        view: str = DEFAULT_VIEW,
    ) -> StoredFile | None:
        """A metadata file by version, or the newest one of `view` when `version` is None.

        A view that has published nothing yet (a tag before its first release) is served
        the channel's default view.
        """
        if role == ROOT:
            view = DEFAULT_VIEW
        key = (factory_id, channel, role, version or 0)
        if version is not None:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        params = {"factory_id": factory_id, "channel": channel, "role": role}
        if version is None:
            row = conn.execute(_NEWEST_FILE, {**params, "view": view}).first()
            if row is None and view != DEFAULT_VIEW:
                row = conn.execute(_NEWEST_FILE, {**params, "view": DEFAULT_VIEW}).first()
        else:
            row = conn.execute(_FILE_BY_VERSION, {**params, "version": version}).first()
        if row is None:
            return None
        found = StoredFile(row.role, row.version, row.body, row.etag, row.expires)
        if version is not None:
            self._cache.put(key, found)
        return found

    def root(
        self, conn: Connection, factory_id: int, channel: Channel, version: int | None = None
    ) -> Metadata[Root]:
        """`channel`'s newest root, or the given version of it (all versions are kept)."""
        stored = self.read_file(conn, factory_id, channel.value, ROOT, version)
        assert stored is not None, f"factory {factory_id} has no {channel} root {version or ''}"
        return Metadata[Root].from_bytes(stored.body)

    # -- publishing -----------------------------------------------------------------

    def publish_snapshot_and_timestamp(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        targets_version: int,
        now: datetime,
        view: str = DEFAULT_VIEW,
    ) -> None:
        """Sign a new snapshot naming `targets_version`, and a timestamp naming it.

        Both take the next number of the channel's shared counters, so every view of a
        channel moves on one version sequence and no device ever sees a version go down.
        """
        counters = self.bump(conn, factory_id, channel, SNAPSHOT, TIMESTAMP)
        snapshot = sign(
            build_snapshot(
                counters[SNAPSHOT],
                expiry(now, self.settings.snapshot_expiry),
                self._stored_body(conn, factory_id, channel, TARGETS, targets_version),
                targets_version,
            ),
            [self.online_signer(conn, factory_id, channel, SNAPSHOT)],
        )
        snapshot_bytes = self.store(conn, factory_id, channel, snapshot, view)
        timestamp = sign(
            build_timestamp(
                counters[TIMESTAMP],
                expiry(now, self.settings.timestamp_expiry),
                snapshot_bytes,
                counters[SNAPSHOT],
            ),
            [self.online_signer(conn, factory_id, channel, TIMESTAMP)],
        )
        self.store(conn, factory_id, channel, timestamp, view)

    def _stored_body(
        self, conn: Connection, factory_id: int, channel: Channel, role: str, version: int
    ) -> bytes:
        """A file's bytes as stored in this transaction, bypassing the cache: a publish
        that is rolled back must never leave its files in the cache."""
        params = {"factory_id": factory_id, "channel": channel.value, "role": role}
        row = conn.execute(_FILE_BY_VERSION, {**params, "version": version}).one()
        body: bytes = row.body
        return body

    def bump(
        self, conn: Connection, factory_id: int, channel: Channel, *roles: str
    ) -> dict[str, int]:
        where = (channels.c.factory_id == factory_id, channels.c.channel == channel.value)
        conn.execute(
            update(channels)
            .where(*where)
            .values({f"{role}_version": channels.c[f"{role}_version"] + 1 for role in roles})
        )
        row = conn.execute(select(channels).where(*where)).one()
        return {role: row._mapping[f"{role}_version"] for role in roles}

    def resign_due(self) -> int:
        """Re-sign online metadata of every channel that has used half its validity.

        Returns how many channels were refreshed. Safe to run from several server
        replicas at once: each channel is re-checked under its lock.
        """
        with self.db.read() as conn:
            rows = conn.execute(select(channels.c.factory_id, channels.c.channel)).all()
        refreshed = 0
        for factory_id, channel in rows:
            try:
                with self.db.write() as conn:
                    self.db.lock_channel(conn, factory_id, channel)
                    if self._resign_channel(conn, factory_id, Channel(channel)):
                        refreshed += 1
            except Exception:
                log.exception("re-signing %s channel of factory %s failed", channel, factory_id)
        return refreshed

    def live_views(self, conn: Connection, factory_id: int, channel: str) -> list[str]:
        """The views of a channel that serve devices (those with a timestamp)."""
        return sorted(
            conn.execute(
                select(metadata_files.c.view)
                .where(
                    metadata_files.c.factory_id == factory_id,
                    metadata_files.c.channel == channel,
                    metadata_files.c.role == TIMESTAMP,
                )
                .distinct()
            ).scalars()
        )

    def _resign_channel(self, conn: Connection, factory_id: int, channel: Channel) -> bool:
        now = self.settings.clock.now()
        root = self.read_file(conn, factory_id, channel.value, ROOT, None)
        assert root is not None
        if root.expires - now < self.settings.offline_expiry_warning:
            log.warning(
                "%s root of factory %s expires at %s: extend it with `tufa keys updates`",
                channel.value,
                factory_id,
                root.expires.isoformat(),
            )
        refreshed = False
        for view in self.live_views(conn, factory_id, channel.value):
            refreshed |= self._resign_view(conn, factory_id, channel, view, now)
        return refreshed

    def _resign_view(
        self, conn: Connection, factory_id: int, channel: Channel, view: str, now: datetime
    ) -> bool:
        def newest(role: str) -> StoredFile:
            found = self.read_file(conn, factory_id, channel.value, role, None, view)
            assert found is not None, f"{channel} view {view!r} of {factory_id} has no {role}"
            return found

        def due(found: StoredFile, role: str) -> bool:
            return found.expires - now < self.settings.expiry_for(role) / 2

        targets = newest(TARGETS)
        targets_version = targets.version
        if channel is Channel.CI and due(targets, TARGETS):
            targets_version = self.resign_ci_targets(conn, factory_id, now)
        elif (
            channel is Channel.PROD and targets.expires - now < self.settings.offline_expiry_warning
        ):
            log.warning(
                "production targets (view %r) of factory %s expire at %s: release a new wave",
                view,
                factory_id,
                targets.expires.isoformat(),
            )
        snapshot = newest(SNAPSHOT)
        if targets_version != targets.version or due(snapshot, SNAPSHOT):
            self.publish_snapshot_and_timestamp(
                conn, factory_id, channel, targets_version, now, view
            )
            return True
        if due(newest(TIMESTAMP), TIMESTAMP):
            self._resign_timestamp(conn, factory_id, channel, snapshot, now, view)
            return True
        return False

    def resign_ci_targets(self, conn: Connection, factory_id: int, now: datetime) -> int:
        """Sign the CI targets again, same content, as the next version; return it."""
        stored = self.read_file(conn, factory_id, Channel.CI.value, TARGETS, None)
        assert stored is not None
        current = Metadata[Targets].from_bytes(stored.body).signed
        version = self.bump(conn, factory_id, Channel.CI, TARGETS)[TARGETS]
        resigned = sign(
            build_targets(version, expiry(now, self.settings.ci_targets_expiry), current.targets),
            [self.online_signer(conn, factory_id, Channel.CI, TARGETS)],
        )
        self.store(conn, factory_id, Channel.CI, resigned)
        return version

    def _resign_timestamp(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        snapshot: StoredFile,
        now: datetime,
        view: str,
    ) -> None:
        version = self.bump(conn, factory_id, channel, TIMESTAMP)[TIMESTAMP]
        timestamp = sign(
            build_timestamp(
                version,
                expiry(now, self.settings.timestamp_expiry),
                snapshot.body,
                snapshot.version,
            ),
            [self.online_signer(conn, factory_id, channel, TIMESTAMP)],
        )
        self.store(conn, factory_id, channel, timestamp, view)
