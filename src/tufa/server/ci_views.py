"""The CI channel's views: one per (hardware id, tag), each listing only its targets.

A CI device is served the view of its own hardware id and tag (ADR 0016), so what it
downloads per refresh is what concerns it, however many targets CI has published for
other hardware. A publish re-signs only the views it changes; each view's targets file
is joined from entries encoded once, when each target was published
(core/assembled_targets.py). All views take their versions from the channel's counters
(ADR 0003), as production's views do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Integer,
    String,
    bindparam,
    delete,
    distinct,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from tuf.api.metadata import TargetFile

from tufa.core.assembled_targets import EncodedEntry, encode_entry, sign_assembled
from tufa.core.metadata import TARGETS, Channel, expiry
from tufa.server.db import ci_view_targets, devices, targets
from tufa.server.sql_types import insert_rows, one_of
from tufa.server.stored_files import NewFile
from tufa.server.views import ci_view

if TYPE_CHECKING:
    from tufa.server.repository import Repository

# Views signed per query and insert: bounds the memory a key rotation over many views
# takes, while a publish of one build is one group.
_VIEWS_PER_GROUP = 500


# On PostgreSQL, each view's rows looked up by the whole of (factory_id, view), the
# primary key's prefix. A list given as `view = ANY(...)` leaves the planner a choice,
# and without statistics (a bulk load outruns autovacuum's analysis; CI databases run
# without autovacuum) the plan psycopg prepared on a small table read every row of the
# factory and filtered the views: at 100,000 targets 26 ms a publish instead of 2, and
# growing with every batch. OFFSET 0 keeps the subquery a lookup per view.
_PG_ENTRIES = text("""
    SELECT v.view, t.name, t.entry, t.entry_canonical
    FROM unnest(:views) AS v(view)
    CROSS JOIN LATERAL (
        SELECT c.name FROM ci_view_targets AS c
        WHERE c.factory_id = :factory_id AND c.view = v.view OFFSET 0
    ) AS listed
    JOIN targets AS t ON t.factory_id = :factory_id AND t.name = listed.name
""").bindparams(bindparam("views", type_=ARRAY(String)), bindparam("factory_id", type_=Integer))


def _entries_of(conn: Connection, factory_id: int, views: list[str]) -> Any:
    """The stored entries of the targets `views` list, with the view of each."""
    if conn.dialect.name == "postgresql":
        return conn.execute(_PG_ENTRIES, {"factory_id": factory_id, "views": views})
    return conn.execute(
        select(ci_view_targets.c.view, targets.c.name, targets.c.entry, targets.c.entry_canonical)
        .join(
            targets,
            (ci_view_targets.c.factory_id == targets.c.factory_id)
            & (ci_view_targets.c.name == targets.c.name),
        )
        .where(
            ci_view_targets.c.factory_id == factory_id,
            one_of(conn, ci_view_targets.c.view, views),
        )
    )


def views_of(custom: dict[str, Any]) -> set[str]:
    """The CI views that list a target with this custom metadata."""
    return {ci_view(hw, tag) for hw in custom["hardwareIds"] for tag in custom["tags"]}


def describe(view: str) -> str:
    """A CI view in words, for messages."""
    hardware_id, _, tag = view.removeprefix("ci:").partition("/")
    return f"hardware id {hardware_id!r} and tag {tag!r}" if tag else "the default view"


def entry_columns(target: TargetFile) -> dict[str, str | None]:
    """The `targets` columns that hold the target's encoded entry."""
    entry = encode_entry(target)
    return {
        "entry": entry.json,
        "entry_canonical": None if entry.canonical == entry.json else entry.canonical,
    }


def list_in_views(conn: Connection, factory_id: int, listed: dict[str, set[str]]) -> None:
    """Record that each target name is listed by its views."""
    rows = [
        {"factory_id": factory_id, "view": view, "name": name}
        for name, views in listed.items()
        for view in sorted(views)
    ]
    insert_rows(conn, ci_view_targets, rows)


def unlist(conn: Connection, factory_id: int, names: list[str]) -> set[str]:
    """Take the targets `names` out of every view; return the views that listed them."""
    where = (
        ci_view_targets.c.factory_id == factory_id,
        one_of(conn, ci_view_targets.c.name, names),
    )
    views = set(conn.execute(select(distinct(ci_view_targets.c.view)).where(*where)).scalars())
    conn.execute(delete(ci_view_targets).where(*where))
    return views


def publish(
    repo: Repository, conn: Connection, factory_id: int, views: Iterable[str], now: datetime
) -> dict[str, tuple[int, int]]:
    """Sign each view's targets as they are listed now, with a snapshot and timestamp.

    Returns view -> (targets version, size in bytes). A view listing nothing (the
    default view "") gets an empty targets file. Views are signed in groups, each group
    with one query for its entries and one insert for its files."""
    signer = repo.online_signer(conn, factory_id, Channel.CI, TARGETS)
    expires = expiry(now, repo.settings.ci_targets_expiry)
    ordered = sorted(views)
    published = {}
    for start in range(0, len(ordered), _VIEWS_PER_GROUP):
        group = ordered[start : start + _VIEWS_PER_GROUP]
        entries: dict[str, list[EncodedEntry]] = {view: [] for view in group}
        for row in _entries_of(conn, factory_id, group):
            entries[row.view].append(
                EncodedEntry(row.name, row.entry, row.entry_canonical or row.entry)
            )
        last = repo.bump(conn, factory_id, Channel.CI, TARGETS, count=len(group))[TARGETS]
        files, signed = [], {}
        for version, view in enumerate(group, start=last - len(group) + 1):
            body = sign_assembled(version, expires, entries[view], [signer])
            files.append(NewFile(view, TARGETS, version, expires, body))
            signed[view] = (version, body)
            published[view] = (version, len(body))
        repo.store_files(conn, factory_id, Channel.CI, files)
        repo.publish_snapshots_and_timestamps(conn, factory_id, Channel.CI, signed, now)
    return published


def listed(
    conn: Connection, factory_id: int, *, view: str | None = None, version: str | None = None
) -> dict[str, TargetFile]:
    """The targets in the CI targets (not pruned or deleted), by name: all, or those
    `view` lists, or those of build `version`."""
    query = select(targets.c.name, targets.c.entry).where(
        targets.c.factory_id == factory_id, targets.c.pruned_at.is_(None)
    )
    if view is not None:
        query = query.join(
            ci_view_targets,
            (ci_view_targets.c.factory_id == targets.c.factory_id)
            & (ci_view_targets.c.name == targets.c.name)
            & (ci_view_targets.c.view == view),
        )
    if version is not None:
        query = query.where(targets.c.version == version)
    rows = conn.execute(query)
    return {row.name: TargetFile.from_dict(json.loads(row.entry), row.name) for row in rows}


def upgrade(repo: Repository, conn: Connection) -> None:
    """Bring what a server from before CI views stored into them: encode each target's
    entry, list it in its views, move CI devices to their views, and publish the views
    of each factory that had targets (the default view then lists nothing).

    Runs at every start, in the start-up transaction; costs two statements when done."""
    now = repo.settings.clock.now()
    conn.execute(
        update(devices)
        .where(devices.c.channel == Channel.CI, devices.c.view == "")
        # views.ci_view, in SQL.
        .values(view=literal("ci:") + devices.c.hardware_id + literal("/") + devices.c.tag)
    )
    legacy = conn.execute(select(targets).where(targets.c.entry.is_(None))).all()
    changed: dict[int, set[str]] = {}
    for row in legacy:
        custom = json.loads(row.custom)
        target = TargetFile(
            row.length, {"sha256": row.sha256}, row.name, unrecognized_fields={"custom": custom}
        )
        conn.execute(
            update(targets)
            .where(targets.c.factory_id == row.factory_id, targets.c.name == row.name)
            .values(entry_columns(target))
        )
        views = changed.setdefault(row.factory_id, {""})
        if row.pruned_at is None:
            list_in_views(conn, row.factory_id, {row.name: views_of(custom)})
            views |= views_of(custom)
    for factory_id, views in sorted(changed.items()):
        publish(repo, conn, factory_id, views, now)
