"""Offline-signed metadata near its expiry: each channel's root and the production
targets of each tag, which only their owner's offline keys can re-sign.

`tufa factory show` warns of them (api/factories.py), the re-signer logs them, and the
`keys.expiring` webhook event tells a factory's hooks 30, 7 and 1 days ahead: each
threshold at most once per hook and metadata version, by the key of its delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, select

from tufa.core.clock import iso
from tufa.core.metadata import ROOT, TARGETS, Channel
from tufa.server.repository import DEFAULT_VIEW, Repository
from tufa.server.state import ServerState
from tufa.server.views import tag_view
from tufa.server.webhooks import emit, webhooks

KEYS_EXPIRING = "keys.expiring"
# The days ahead of an expiry at which `keys.expiring` fires, tightest first.
THRESHOLD_DAYS = (1, 7, 30)


def expiry_warning(channel: Channel, role: str, expires: datetime, now: datetime) -> str:
    days = (expires - now).days
    when = "has expired" if expires <= now else f"expires in {days} day(s)"
    fix = (
        "extend it with `tufa keys updates`" if role == ROOT else "release a new wave to re-sign it"
    )
    return f"the {channel} {role} metadata {when} ({iso(expires)}): {fix}"


@dataclass(frozen=True)
class OfflineSigned:
    channel: Channel
    role: str
    view: str  # "" for roots and the default view, "tag:T" for a tag's production targets
    version: int
    expires: datetime


def offline_signed(repo: Repository, conn: Connection, factory_id: int) -> list[OfflineSigned]:
    """The newest offline-signed files a factory's devices trust."""
    found = []
    for channel in Channel:
        root = repo.read_file(conn, factory_id, channel, ROOT, None)
        assert root is not None
        found.append(OfflineSigned(channel, ROOT, DEFAULT_VIEW, root.version, root.expires))
    for view in repo.live_views(conn, factory_id, Channel.PROD):
        if view == DEFAULT_VIEW or view.startswith(tag_view("")):
            targets = repo.read_file(conn, factory_id, Channel.PROD, TARGETS, None, view)
            assert targets is not None
            found.append(
                OfflineSigned(Channel.PROD, TARGETS, view, targets.version, targets.expires)
            )
    return found


def threshold_reached(expires: datetime, now: datetime) -> int | None:
    """The tightest threshold (in days) that `expires` is within, if any."""
    for days in THRESHOLD_DAYS:
        if expires - now <= timedelta(days=days):
            return days
    return None


def check_expiring_keys(state: ServerState) -> int:
    """Queue the `keys.expiring` events now due, for the factories with a hook for them;
    how many files were within a threshold (a key queued before queues nothing)."""
    with state.db.read() as conn:
        factory_ids = sorted(
            set(
                conn.execute(
                    select(webhooks.c.factory_id).where(webhooks.c.events.contains(KEYS_EXPIRING))
                ).scalars()
            )
        )
    due = 0
    for factory_id in factory_ids:
        with state.db.write() as conn:
            now = state.settings.clock.now()
            for file in offline_signed(state.repo, conn, factory_id):
                days = threshold_reached(file.expires, now)
                if days is None:
                    continue
                due += 1
                tag = file.view.removeprefix(tag_view("")) if file.view else None
                data = {
                    "channel": str(file.channel),
                    "role": file.role,
                    "tag": tag,
                    "version": file.version,
                    "expires_at": iso(file.expires),
                    "days_before": days,
                    "message": expiry_warning(file.channel, file.role, file.expires, now),
                }
                key = f"{file.channel}:{file.role}:{file.view}:{file.version}:{days}d"
                emit(conn, factory_id, KEYS_EXPIRING, data, key=f"{KEYS_EXPIRING}:{key}")
    return due
