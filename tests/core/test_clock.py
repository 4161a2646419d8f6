"""core/clock.py: UTC, whole seconds, ISO 8601 with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from tufa.core.clock import iso, now_iso, utc_now


def test_utc_now_is_aware_utc_in_whole_seconds() -> None:
    now = utc_now()
    assert now.tzinfo is UTC
    assert now.microsecond == 0
    assert abs(datetime.now(UTC) - now) < timedelta(seconds=2)


def test_iso_writes_z_for_utc() -> None:
    assert iso(datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)) == "2026-12-01T10:00:05Z"


def test_iso_keeps_other_offsets_and_none() -> None:
    plus_one = timezone(timedelta(hours=1))
    assert iso(datetime(2026, 12, 1, 10, 0, tzinfo=plus_one)) == "2026-12-01T10:00:00+01:00"
    assert iso(None) is None


def test_now_iso_reads_back_as_now() -> None:
    text = now_iso()
    assert text.endswith("Z")
    assert "." not in text
    assert abs(datetime.fromisoformat(text) - datetime.now(UTC)) < timedelta(seconds=2)
