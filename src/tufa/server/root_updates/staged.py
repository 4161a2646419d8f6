"""The open root update of a factory as stored (the `root_updates` table): at most one.

The staged roots collect signatures as signed metadata; the staged root key pairs and
the re-signed production targets (one per view) are kept as the API carries them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.metadata import Channel, to_bytes
from tufa.core.root_update import RootKeyPairs, pairs_from_json, pairs_to_json
from tufa.server.db import root_updates
from tufa.server.exceptions import NotFound


@dataclass
class StagedUpdate:
    message: str
    created_at: datetime
    roots: dict[Channel, Metadata[Root]]
    # View -> its re-signed production targets, collecting offline signatures.
    prod_targets: dict[str, Metadata[Targets]]
    pairs: RootKeyPairs


def open_message(conn: Connection, factory_id: int) -> str | None:
    """The message of the factory's open update, if it has one."""
    message: str | None = conn.execute(
        select(root_updates.c.message).where(root_updates.c.factory_id == factory_id)
    ).scalar_one_or_none()
    return message


def load(conn: Connection, factory_id: int) -> StagedUpdate:
    row = conn.execute(select(root_updates).where(root_updates.c.factory_id == factory_id)).first()
    if row is None:
        raise NotFound("no root update is open; start one with `tufa keys updates init`")
    return StagedUpdate(
        message=row.message,
        created_at=row.created_at,
        roots={
            Channel.CI: Metadata[Root].from_bytes(row.ci_root),
            Channel.PROD: Metadata[Root].from_bytes(row.prod_root),
        },
        prod_targets={
            view: Metadata[Targets].from_dict(data)
            for view, data in json.loads(row.prod_targets).items()
        },
        pairs=pairs_from_json(json.loads(row.root_key_pairs)),
    )


def create(
    conn: Connection,
    factory_id: int,
    message: str,
    created_at: datetime,
    roots: Mapping[Channel, Metadata[Root]],
    pairs: RootKeyPairs,
) -> None:
    conn.execute(
        insert(root_updates).values(
            factory_id=factory_id,
            message=message,
            created_at=created_at,
            ci_root=to_bytes(roots[Channel.CI]),
            prod_root=to_bytes(roots[Channel.PROD]),
            prod_targets="{}",
            root_key_pairs=json.dumps(pairs_to_json(pairs)),
        )
    )


def save(
    conn: Connection,
    factory_id: int,
    roots: Mapping[Channel, Metadata[Root]],
    prod_targets: Mapping[str, Metadata[Targets]] | None = None,
    pairs: RootKeyPairs | None = None,
) -> None:
    """Store the staged roots (and re-signed production targets and root key pairs,
    when given)."""
    values: dict[str, Any] = {
        "ci_root": to_bytes(roots[Channel.CI]),
        "prod_root": to_bytes(roots[Channel.PROD]),
    }
    if prod_targets is not None:
        values["prod_targets"] = json.dumps(
            {view: md.to_dict() for view, md in prod_targets.items()}
        )
    if pairs is not None:
        values["root_key_pairs"] = json.dumps(pairs_to_json(pairs))
    conn.execute(update(root_updates).where(root_updates.c.factory_id == factory_id).values(values))


def drop(conn: Connection, factory_id: int) -> None:
    conn.execute(delete(root_updates).where(root_updates.c.factory_id == factory_id))
