"""The fields of a device report (`POST /device-reports`), each checked for its type
and form: a 400 naming the field when it is wrong, never a 500 from what a device sends."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, TypeGuard

from tufa.core.device_events import EVENT_KINDS
from tufa.server.api.fields import field
from tufa.server.devices import DeviceEvent, Installed
from tufa.server.errors import bad_request
from tufa.server.staleness import MAX_POLL_INTERVAL, Verified

# The limits match the columns of `devices` and `device_events`.
MAX_EVENTS = 100
MAX_VERSION = 64
MAX_TARGET = 255
MAX_DETAIL = 1000
MAX_INT = 2**31 - 1  # a 32-bit INTEGER column on both databases
EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _text(
    data: dict[str, Any],
    key: str,
    label: str,
    max_length: int,
    *,
    nullable: bool = False,
) -> str | None:
    """`data[key]`: 1 to `max_length` printable characters, or None (null or left out)
    if `nullable`. `label` names the field in the message, e.g. `events[3].version`."""
    value = data.get(key)
    if value is None:
        if nullable:
            return None
        raise bad_request(f"field {label!r} is required")
    if not isinstance(value, str) or not 1 <= len(value) <= max_length or not value.isprintable():
        least = " or null" if nullable else ""
        raise bad_request(f"field {label!r} must be 1-{max_length} printable characters{least}")
    return value


def installed(data: dict[str, Any]) -> Installed:
    if "installed" not in data:
        raise bad_request("field 'installed' is required (null when nothing is installed yet)")
    installed = data["installed"]
    if installed is None:
        return {"installed_version": None, "installed_target": None, "installed_sha256": None}
    if not isinstance(installed, dict):
        raise bad_request("field 'installed' must be an object or null")
    sha256 = installed.get("sha256")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise bad_request("field 'installed.sha256' must be 64 hexadecimal digits")
    return {
        "installed_version": _text(installed, "version", "installed.version", MAX_VERSION),
        "installed_target": _text(installed, "target", "installed.target", MAX_TARGET),
        "installed_sha256": sha256.lower(),
    }


def _time(value: Any, label: str) -> datetime:
    """An ISO 8601 time with its offset (`Z` or `+00:00`): a time without one could be
    any time zone's, and the device's own is unknown here."""
    message = f"field {label!r} must be an ISO 8601 time in UTC, such as 2026-12-01T10:00:00Z"
    if not isinstance(value, str) or len(value) > 64:
        raise bad_request(message)
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # overflow: year 1 or 9999 moved past by its offset
        raise bad_request(message) from None


def _detail(event: dict[str, Any], label: str) -> str:
    """Any text the agent has, such as an install command's output with its colours and
    carriage returns (refusing those would keep the agent's report queue stuck); what no
    database can store (NUL, lone surrogates) never gets here (tufa.server.inputs)."""
    value = event.get("detail")
    if not isinstance(value, str) or len(value) > MAX_DETAIL:
        raise bad_request(f"field {label!r} must be a text of at most {MAX_DETAIL} characters")
    return value


def events(data: dict[str, Any]) -> list[DeviceEvent]:
    """The events of a report, checked; an id given twice counts once (the first)."""
    events = field(data, "events", list)
    if len(events) > MAX_EVENTS:
        raise bad_request(f"field 'events' holds at most {MAX_EVENTS} events; send the rest next")
    checked: dict[str, DeviceEvent] = {}
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            raise bad_request(f"field {where!r} must be an object")
        ident = event.get("id")
        if not isinstance(ident, str) or not EVENT_ID.fullmatch(ident):
            raise bad_request(f"field '{where}.id' must be 1-64 letters, digits, '_' or '-'")
        kind = event.get("kind")
        if kind not in EVENT_KINDS:
            raise bad_request(f"field '{where}.kind' must be one of {', '.join(EVENT_KINDS)}")
        checked.setdefault(
            ident,
            {
                "id": ident,
                "at": _time(event.get("at"), f"{where}.at"),
                "kind": kind,
                "version": _text(event, "version", f"{where}.version", MAX_VERSION, nullable=True),
                "target": _text(event, "target", f"{where}.target", MAX_TARGET, nullable=True),
                "detail": _detail(event, f"{where}.detail"),
            },
        )
    return list(checked.values())


def verified(data: dict[str, Any]) -> Verified:
    """The timestamp the device last verified and its poll interval in seconds; each
    may be left out (or null), as an agent older than them does: unknown then."""
    found: Verified = {
        "verified_timestamp_version": None,
        "verified_timestamp_expires": None,
        "poll_interval": None,
    }
    timestamp = data.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, dict):
            raise bad_request(
                "field 'timestamp' must be an object {version, expires} (the timestamp the "
                "device verified last), or null"
            )
        version = timestamp.get("version")
        if not _integer(version) or not 1 <= version <= MAX_INT:
            raise bad_request(f"field 'timestamp.version' must be an integer from 1 to {MAX_INT}")
        found["verified_timestamp_version"] = version
        found["verified_timestamp_expires"] = _time(timestamp.get("expires"), "timestamp.expires")
    interval = data.get("poll_interval")
    if interval is not None:
        if not _integer(interval) or not 0 <= interval <= MAX_POLL_INTERVAL:
            raise bad_request(
                f"field 'poll_interval' must be a whole number of seconds from 0 to "
                f"{MAX_POLL_INTERVAL}, or null"
            )
        found["poll_interval"] = interval
    return found


def _integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
