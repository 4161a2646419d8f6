"""A factory's online keys, from generation to retirement: the repository's half of
every key change.

The server generates each online key, keeps its private half encrypted under the
master key, and signs with it; each channel has its own key per online role (ADR 0009).
A root update stages new keys as *pending*: they are listed by the staged roots but
sign nothing until the update is applied, when they replace the keys in force; a
cancelled update drops them. A replaced key is retired, never deleted, so the history
of which key signed what stays in the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from securesystemslib.signer import Key, Signer
from sqlalchemy import Connection, delete, insert, select, update

from tufa.core.keys import KeyPair, key_from_json, key_to_json
from tufa.core.metadata import Channel
from tufa.server.db import online_keys
from tufa.server.secrets import MasterKey
from tufa.server.settings import Settings

# Channel -> online role -> key id.
OnlineKeyids = dict[Channel, dict[str, str]]


def _live(factory_id: int, *, pending: bool = False) -> tuple[Any, ...]:
    """Online keys in force (or, with `pending`, generated for the open root update)."""
    return (
        online_keys.c.factory_id == factory_id,
        online_keys.c.retired_at.is_(None),
        online_keys.c.pending.is_(pending),
    )


def _of_role(channel: Channel, role: str) -> tuple[Any, ...]:
    return online_keys.c.channel == channel, online_keys.c.role == role


def shares_online_keys(online: OnlineKeyids) -> bool:
    """Whether the channels still sign with the same online keys (factories created
    before ADR 0009, until their next root update)."""
    return bool(set(online[Channel.CI].values()) & set(online[Channel.PROD].values()))


class OnlineKeys:
    """The online key lifecycle of every factory; `Repository` signs with these keys."""

    def __init__(self, master_key: MasterKey, settings: Settings) -> None:
        self.master_key = master_key
        self.settings = settings

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
                channel=channel,
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
            .where(*_live(factory_id, pending=pending), *_of_role(channel, role))
            .values(retired_at=now)
        )

    def online_signer(
        self, conn: Connection, factory_id: int, channel: Channel, role: str
    ) -> Signer:
        """The signer of `channel`'s online key in force for `role` (pending keys sign
        nothing)."""
        row = conn.execute(
            select(online_keys)
            .where(*_live(factory_id), *_of_role(channel, role))
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
            found[channel][role] = keyid
        return found

    def online_keyids_after(self, conn: Connection, factory_id: int) -> OnlineKeyids:
        """The online keys that will be in force once the open root update is applied."""
        in_force = self.online_keyids(conn, factory_id)
        pending = self.online_keyids(conn, factory_id, pending=True)
        return {channel: {**in_force[channel], **pending[channel]} for channel in Channel}

    # -- while a root update is open ---------------------------------------------------

    def stage_online_key(
        self, conn: Connection, factory_id: int, channel: Channel, role: str
    ) -> Key:
        """Generate a pending key for `channel`'s `role` (replacing one staged before);
        return its public half, for the staged root to list."""
        pair = KeyPair.generate(self.settings.online_key_type)
        now = self.settings.clock.now()
        self.retire_online_key(conn, factory_id, channel, role, now, pending=True)
        self.store_online_key(conn, factory_id, channel, role, pair, pending=True)
        return pair.public

    def promote_pending_keys(self, conn: Connection, factory_id: int, now: datetime) -> None:
        """The pending keys go into force; the keys they replace are retired."""
        for channel, roles in self.online_keyids(conn, factory_id, pending=True).items():
            for role in roles:
                self.retire_online_key(conn, factory_id, channel, role, now)
        conn.execute(
            update(online_keys)
            .where(online_keys.c.factory_id == factory_id, online_keys.c.pending.is_(True))
            .values(pending=False)
        )

    def drop_pending_keys(self, conn: Connection, factory_id: int) -> None:
        """A cancelled update's keys never signed anything: nothing to keep."""
        conn.execute(
            delete(online_keys).where(
                online_keys.c.factory_id == factory_id, online_keys.c.pending.is_(True)
            )
        )
