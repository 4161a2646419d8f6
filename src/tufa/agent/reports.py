"""Reports to the server: what the device runs, and what happened on the way.

Events are queued in `events.json` first and sent when the server can be reached, so
an offline install or an outage loses nothing; each carries an id, and the server
ignores an id it already has, so resending after a crash is harmless. Ids sort in the
order the events happened: `at` counts whole seconds, and the server lists the events of
one second by id (`tufa devices show`, newest first).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import TypedDict

import httpx

from tufa.agent.state import EVENTS_FILE, Release, write_json
from tufa.agent.trust import VerifiedTimestamp
from tufa.core.clock import now_iso
from tufa.core.device_events import EventKind
from tufa.core.responses import refusal_of

log = logging.getLogger("tufa.agent")

MAX_QUEUED = 500  # the oldest go first when a device is offline for very long
BATCH = 100  # the server's limit per report
MAX_INTERVAL = 366 * 24 * 3600  # the longest poll interval a report may name


class Event(TypedDict):
    """One queued event, as the server's device reports take it."""

    id: str
    at: str
    kind: EventKind
    version: str | None
    target: str | None
    detail: str


def _event_id() -> str:
    """Nanoseconds since the epoch, zero-padded so that text order is time order, then a
    random part so that two devices or two events of one nanosecond never share an id."""
    return f"{time.time_ns():020d}{uuid.uuid4().hex}"


class EventQueue:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / EVENTS_FILE

    def pending(self) -> list[Event]:
        try:
            found = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return []
        return found if isinstance(found, list) else []

    def add(self, kind: EventKind, release: Release | None, detail: str = "") -> None:
        event: Event = {
            "id": _event_id(),
            "at": now_iso(),
            "kind": kind,
            "version": release.version[:64] if release else None,
            "target": release.target[:255] if release else None,
            "detail": detail.replace("\x00", "")[:1000],  # the databases store no NUL
        }
        log.info("event %s %s %s", kind, event["version"] or "", detail)
        write_json(self.path, [*self.pending(), event][-MAX_QUEUED:])

    def drop(self, ids: set[str]) -> None:
        write_json(self.path, [e for e in self.pending() if e.get("id") not in ids])


def send_reports(
    client: httpx.Client,
    url: str,
    queue: EventQueue,
    installed: Release | None,
    verified: VerifiedTimestamp | None = None,
    poll_interval: float | None = None,
) -> bool:
    """Deliver the installed release, the queued events, the timestamp the device last
    verified and how often it polls (from which the server tells a device fed stale
    metadata); False if the server could not be reached or refused (the events stay
    queued). A server older than these fields ignores them."""
    while True:
        batch = queue.pending()[:BATCH]
        body: dict[str, object] = {
            "installed": installed.to_report() if installed else None,
            "events": batch,
        }
        if verified is not None:
            body["timestamp"] = verified
        # Whole seconds, as the server takes them; one it would refuse would cost the
        # events of the report, so it is left out instead.
        if poll_interval is not None and 0 <= poll_interval <= MAX_INTERVAL:
            body["poll_interval"] = math.ceil(poll_interval)
        try:
            response = client.post(url, json=body)
        except httpx.HTTPError as e:
            log.info("reports not delivered (%s); they stay queued", e)
            return False
        if response.status_code == 400 and batch:
            # The server will never take these events: keeping them would block every
            # later report behind them.
            log.warning(
                "the server refused %d event(s), dropped: %s",
                len(batch),
                refusal_of(response).message,
            )
            queue.drop({e["id"] for e in batch})
            continue
        if response.status_code >= 300:
            log.warning("the server refused the report: %s", refusal_of(response))
            return False
        queue.drop({e["id"] for e in batch})
        if len(batch) < BATCH:
            return True
