"""Creating a factory: its online keys, first root key, and both channels at version 1.

The first root key (a pair: one key per channel) and a first offline targets key are
generated here, sign the version-1 roots and production targets, go into the offline
keys archive, and are then dropped: the server keeps the archive (encrypted) only until
its owner has downloaded it, and never keeps a root private key anywhere else.

The two channels share no key but the offline targets key (ADR 0009): each has its own
online keys and its own half of every root key, so no file of one channel verifies for
a client of the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from tufa.core.archive import FIRST_ROOT_KEY_NAME, ArchiveKey, OfflineArchive, generate_root_key
from tufa.core.keys import KeyPair
from tufa.core.metadata import (
    MIN_PROD_TARGETS_THRESHOLD,
    ONLINE_ROLES,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    Channel,
    build_root,
    build_targets,
    expiry,
    sign,
    to_bytes,
)
from tufa.server.db import channels, factories, key_archives, root_key_pairs
from tufa.server.exceptions import Conflict
from tufa.server.principals import Scope
from tufa.server.state import ServerState
from tufa.server.tokens import create_token


@dataclass(frozen=True)
class CreatedFactory:
    name: str
    admin_token: str
    # The first root key's halves, per channel.
    root_keyids: dict[Channel, str]


def archive_purpose(factory_id: int) -> str:
    return f"offline-archive:{factory_id}"


def create_factory(state: ServerState, name: str) -> CreatedFactory:
    settings, repo = state.settings, state.repo
    now = settings.clock.now()
    online = {
        channel: {role: KeyPair.generate(settings.online_key_type) for role in ONLINE_ROLES}
        for channel in Channel
    }
    first_root = generate_root_key(name=FIRST_ROOT_KEY_NAME)
    offline_targets = KeyPair.generate()
    targets_threshold = {Channel.CI: 1, Channel.PROD: MIN_PROD_TARGETS_THRESHOLD}
    roots = {
        channel: sign(
            build_root(
                version=1,
                expires=expiry(now, settings.root_expiry),
                root_keys=[first_root.half(channel).public],
                root_threshold=1,
                targets_keys=[online[channel][TARGETS].public, offline_targets.public],
                targets_threshold=targets_threshold[channel],
                snapshot_key=online[channel][SNAPSHOT].public,
                timestamp_key=online[channel][TIMESTAMP].public,
            ),
            [first_root.half(channel).signer()],
        )
        for channel in Channel
    }
    targets_signers = {
        Channel.CI: [online[Channel.CI][TARGETS].signer()],
        Channel.PROD: [online[Channel.PROD][TARGETS].signer(), offline_targets.signer()],
    }
    targets_expiry = {
        Channel.CI: settings.ci_targets_expiry,
        Channel.PROD: settings.prod_targets_expiry,
    }
    archive = OfflineArchive(
        factory=name,
        keys=[
            first_root,
            ArchiveKey.shared(TARGETS, f"{TARGETS}-{offline_targets.keyid}", offline_targets),
        ],
        roots={channel: to_bytes(md) for channel, md in roots.items()},
    ).to_bytes()

    try:
        with state.db.write() as conn:
            factory_id = _insert_factory(conn, name, now)
            conn.execute(
                insert(root_key_pairs).values(
                    factory_id=factory_id,
                    ci_keyid=first_root.ci.keyid,
                    prod_keyid=first_root.prod.keyid,
                )
            )
            for channel in Channel:
                for role, pair in online[channel].items():
                    repo.store_online_key(conn, factory_id, channel, role, pair)
                conn.execute(
                    insert(channels).values(
                        factory_id=factory_id,
                        channel=channel,
                        root_version=1,
                        targets_version=1,
                        snapshot_version=0,
                        timestamp_version=0,
                    )
                )
                repo.store(conn, factory_id, channel, roots[channel])
                targets = sign(
                    build_targets(1, expiry(now, targets_expiry[channel]), {}),
                    targets_signers[channel],
                )
                repo.store(conn, factory_id, channel, targets)
                repo.publish_snapshot_and_timestamp(conn, factory_id, channel, 1, now)
            conn.execute(
                insert(key_archives).values(
                    factory_id=factory_id,
                    archive_encrypted=state.master_key.encrypt(
                        archive, archive_purpose(factory_id)
                    ),
                    sha256=hashlib.sha256(archive).hexdigest(),
                    created_at=now,
                )
            )
            admin_token = create_token(
                conn, factory_id, [Scope.ADMIN.value], "factory admin (created with factory)", now
            )
    except IntegrityError as e:
        raise Conflict(f"a factory named {name!r} already exists") from e
    return CreatedFactory(
        name=name,
        admin_token=admin_token.secret,
        root_keyids={channel: first_root.half(channel).keyid for channel in Channel},
    )


def _insert_factory(conn: Connection, name: str, now: object) -> int:
    if conn.execute(select(factories.c.id).where(factories.c.name == name)).first():
        raise Conflict(f"a factory named {name!r} already exists")
    result = conn.execute(insert(factories).values(name=name, anonymous_read=False, created_at=now))
    factory_id = result.inserted_primary_key
    assert factory_id is not None
    return int(factory_id[0])
