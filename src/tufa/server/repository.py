"""A factory's TUF repositories as stored by the server: online keys (`online_keys.py`),
root key pairs, signed metadata, and the publishing steps that keep both channels valid.

Metadata is rendered to bytes once, when it is signed, and stored with its ETag; the
read path only looks bytes up. Versioned files never change, so they are cached here
and may be cached by any CDN; `timestamp.json` and `root.json` are looked up each time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.metadata import (
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    AnySigned,
    Channel,
    build_snapshot,
    build_timestamp,
    expiry,
    sign,
    to_bytes,
)
from tufa.core.root_update import RootKeyPairs
from tufa.server import ci_views
from tufa.server.db import Database, channels, metadata_files, root_key_pairs
from tufa.server.exceptions import Conflict
from tufa.server.online_keys import OnlineKeys
from tufa.server.secrets import MasterKey
from tufa.server.settings import Settings
from tufa.server.sql_types import insert_rows
from tufa.server.stored_files import ImmutableFileCache, NewFile, StoredFile

log = logging.getLogger("tufa.server")

DEFAULT_VIEW = ""


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


class Repository(OnlineKeys):
    def __init__(self, db: Database, master_key: MasterKey, settings: Settings) -> None:
        super().__init__(master_key, settings)
        self.db = db
        self._cache = ImmutableFileCache()

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
        role = md.signed.type
        view = DEFAULT_VIEW if role == ROOT else view
        self.store_files(conn, factory_id, channel, [NewFile.of(view, md, body)])
        return body

    def store_files(
        self, conn: Connection, factory_id: int, channel: Channel, files: list[NewFile]
    ) -> None:
        """Store signed files already rendered to the bytes they are served as."""
        now = self.settings.clock.now()
        # One statement (COPY on PostgreSQL), so the counter that tells other processes
        # their poll cache is stale moves once for all these files (migration 0011).
        insert_rows(
            conn,
            metadata_files,
            [
                {
                    "factory_id": factory_id,
                    "channel": channel,
                    "view": file.view,
                    "role": file.role,
                    "version": file.version,
                    "body": file.body,
                    "etag": f'"{hashlib.sha256(file.body).hexdigest()}"',
                    "expires": file.expires,
                    "created_at": now,
                }
                for file in files
            ],
        )

    def read_file(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
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

    def cached_version(
        self, factory_id: int, channel: Channel, role: str, version: int
    ) -> StoredFile | None:
        """A versioned file if this process's cache holds it (no database work)."""
        return self._cache.get((factory_id, channel, role, version))

    def root(
        self, conn: Connection, factory_id: int, channel: Channel, version: int | None = None
    ) -> Metadata[Root]:
        """`channel`'s newest root, or the given version of it (all versions are kept)."""
        stored = self.read_file(conn, factory_id, channel, ROOT, version)
        assert stored is not None, f"factory {factory_id} has no {channel} root {version or ''}"
        return Metadata[Root].from_bytes(stored.body)

    def roots(self, conn: Connection, factory_id: int) -> dict[Channel, Metadata[Root]]:
        """The newest root of each channel."""
        return {channel: self.root(conn, factory_id, channel) for channel in Channel}

    def live_files(
        self, conn: Connection, factory_id: int, channel: Channel, role: str
    ) -> dict[str, StoredFile]:
        """The newest `role` file of each view of `channel` that serves devices."""
        found = {}
        for view in self.live_views(conn, factory_id, channel):
            stored = self.read_file(conn, factory_id, channel, role, None, view)
            assert stored is not None, f"{channel} view {view!r} of {factory_id} has no {role}"
            found[view] = stored
        return found

    def counter(self, conn: Connection, factory_id: int, channel: Channel, role: str) -> int:
        """The version `role` files of `channel` last took (the views share the counter)."""
        version: int = conn.execute(
            select(channels.c[f"{role}_version"]).where(
                channels.c.factory_id == factory_id, channels.c.channel == channel
            )
        ).scalar_one()
        return version

    def root_key_pairs(self, conn: Connection, factory_id: int) -> RootKeyPairs:
        """The owner's root keys in force, each its CI half -> its production half."""
        rows = conn.execute(
            select(root_key_pairs.c.ci_keyid, root_key_pairs.c.prod_keyid).where(
                root_key_pairs.c.factory_id == factory_id
            )
        ).all()
        return dict(rows)

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
        """Sign a new snapshot naming `targets_version`, and a timestamp naming it."""
        body = self._stored_body(conn, factory_id, channel, TARGETS, targets_version)
        self.publish_snapshots_and_timestamps(
            conn, factory_id, channel, {view: (targets_version, body)}, now
        )

    def publish_snapshots_and_timestamps(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        targets: Mapping[str, tuple[int, bytes]],
        now: datetime,
    ) -> None:
        """For each view, sign a new snapshot naming its targets (version and bytes), and a
        timestamp naming that snapshot.

        Each takes the next number of the channel's shared counter, so every view of a
        channel moves on one version sequence and no device ever sees a version go down.
        """
        if not targets:
            return
        last = self.bump(conn, factory_id, channel, SNAPSHOT, TIMESTAMP, count=len(targets))
        signers = {
            role: self.online_signer(conn, factory_id, channel, role)
            for role in (SNAPSHOT, TIMESTAMP)
        }
        files = []
        for offset, (view, (targets_version, body)) in enumerate(sorted(targets.items())):
            version = last[SNAPSHOT] - len(targets) + 1 + offset
            snapshot = sign(
                build_snapshot(
                    version, expiry(now, self.settings.snapshot_expiry), body, targets_version
                ),
                [signers[SNAPSHOT]],
            )
            snapshot_bytes = to_bytes(snapshot)
            timestamp = sign(
                build_timestamp(
                    last[TIMESTAMP] - len(targets) + 1 + offset,
                    expiry(now, self.settings.timestamp_expiry),
                    snapshot_bytes,
                    version,
                ),
                [signers[TIMESTAMP]],
            )
            files += [NewFile.of(view, snapshot, snapshot_bytes), NewFile.of(view, timestamp)]
        self.store_files(conn, factory_id, channel, files)

    def _publish_timestamp(
        self,
        conn: Connection,
        factory_id: int,
        channel: Channel,
        snapshot: bytes,
        snapshot_version: int,
        now: datetime,
        view: str,
    ) -> None:
        """Sign a new timestamp naming the snapshot, as the next version of the counter."""
        version = self.bump(conn, factory_id, channel, TIMESTAMP)[TIMESTAMP]
        timestamp = sign(
            build_timestamp(
                version, expiry(now, self.settings.timestamp_expiry), snapshot, snapshot_version
            ),
            [self.online_signer(conn, factory_id, channel, TIMESTAMP)],
        )
        self.store(conn, factory_id, channel, timestamp, view)

    def publish_roots(
        self,
        conn: Connection,
        factory_id: int,
        roots: Mapping[Channel, Metadata[Root]],
        pairs: RootKeyPairs,
        prod_targets: Mapping[str, Metadata[Targets]],
        now: datetime,
    ) -> None:
        """Put new roots in force with everything that changes with them (an applied root
        update, checked by its caller): the pending online keys, the root key pairs, the
        views' re-signed production targets (countersigned by the online targets key), and
        fresh CI targets, snapshots and timestamps, so that every file devices fetch next
        chains to the new roots."""
        self.promote_pending_keys(conn, factory_id, now)
        conn.execute(delete(root_key_pairs).where(root_key_pairs.c.factory_id == factory_id))
        conn.execute(
            insert(root_key_pairs),
            [
                {"factory_id": factory_id, "ci_keyid": ci, "prod_keyid": prod}
                for ci, prod in sorted(pairs.items())
            ],
        )
        for channel, root in roots.items():
            self.store(conn, factory_id, channel, root)
        conn.execute(
            update(channels)
            .where(channels.c.factory_id == factory_id)
            .values(root_version=roots[Channel.CI].signed.version)
        )
        prod_root = roots[Channel.PROD].signed
        prod_versions = {
            view: stored.version
            for view, stored in self.live_files(conn, factory_id, Channel.PROD, TARGETS).items()
        }
        for view, targets in sorted(prod_targets.items()):
            targets.sign(self.online_signer(conn, factory_id, Channel.PROD, TARGETS), append=True)
            prod_root.verify_delegate(TARGETS, targets.signed_bytes, targets.signatures)
            counter = self.bump(conn, factory_id, Channel.PROD, TARGETS)[TARGETS]
            if counter != targets.signed.version:
                raise Conflict(
                    "production targets changed while this update was open; stage and sign "
                    "the re-signed production targets again"
                )
            self.store(conn, factory_id, Channel.PROD, targets, view)
            prod_versions[view] = counter
        ci_views.publish(self, conn, factory_id, self.live_views(conn, factory_id, Channel.CI), now)
        for view, version in sorted(prod_versions.items()):
            self.publish_snapshot_and_timestamp(conn, factory_id, Channel.PROD, version, now, view)

    def _stored_body(
        self, conn: Connection, factory_id: int, channel: Channel, role: str, version: int
    ) -> bytes:
        """A file's bytes as stored in this transaction, bypassing the cache: a publish
        that is rolled back must never leave its files in the cache."""
        params = {"factory_id": factory_id, "channel": channel, "role": role}
        row = conn.execute(_FILE_BY_VERSION, {**params, "version": version}).one()
        body: bytes = row.body
        return body

    def bump(
        self, conn: Connection, factory_id: int, channel: Channel, *roles: str, count: int = 1
    ) -> dict[str, int]:
        """Take the next `count` numbers of each role's counter; return the last taken."""
        where = (channels.c.factory_id == factory_id, channels.c.channel == channel)
        conn.execute(
            update(channels)
            .where(*where)
            .values({f"{role}_version": channels.c[f"{role}_version"] + count for role in roles})
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
                    if self._resign_channel(conn, factory_id, channel):
                        refreshed += 1
            except Exception:
                log.exception("re-signing %s channel of factory %s failed", channel, factory_id)
        return refreshed

    def live_views(self, conn: Connection, factory_id: int, channel: Channel) -> list[str]:
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
        root = self.read_file(conn, factory_id, channel, ROOT, None)
        assert root is not None
        if root.expires - now < self.settings.offline_expiry_warning:
            log.warning(
                "%s root of factory %s expires at %s: extend it with `tufa keys updates`",
                channel,
                factory_id,
                root.expires.isoformat(),
            )
        refreshed = False
        for view in self.live_views(conn, factory_id, channel):
            refreshed |= self._resign_view(conn, factory_id, channel, view, now)
        return refreshed

    def _resign_view(
        self, conn: Connection, factory_id: int, channel: Channel, view: str, now: datetime
    ) -> bool:
        def newest(role: str) -> StoredFile:
            found = self.read_file(conn, factory_id, channel, role, None, view)
            assert found is not None, f"{channel} view {view!r} of {factory_id} has no {role}"
            return found

        def due(found: StoredFile, role: str) -> bool:
            return found.expires - now < self.settings.expiry_for(role) / 2

        targets = newest(TARGETS)
        if channel is Channel.CI and due(targets, TARGETS):
            ci_views.publish(self, conn, factory_id, [view], now)
            return True
        if channel is Channel.PROD and targets.expires - now < self.settings.offline_expiry_warning:
            log.warning(
                "production targets (view %r) of factory %s expire at %s: release a new wave",
                view,
                factory_id,
                targets.expires.isoformat(),
            )
        snapshot = newest(SNAPSHOT)
        if due(snapshot, SNAPSHOT):
            self.publish_snapshot_and_timestamp(
                conn, factory_id, channel, targets.version, now, view
            )
            return True
        if due(newest(TIMESTAMP), TIMESTAMP):
            self._publish_timestamp(
                conn, factory_id, channel, snapshot.body, snapshot.version, now, view
            )
            return True
        return False
