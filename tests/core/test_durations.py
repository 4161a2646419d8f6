"""core/durations.py: `90s`, `15m`, `12h`, `30d`, `2w` on the command line."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tufa.core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        (" 3 d ", timedelta(days=3)),
    ],
)
def test_parses(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["0", "0d", "-1d", "1.5h", "1y", "d", "", "1 d 2h", "1D"])
def test_refuses(text: str) -> None:
    with pytest.raises(
        ValueError,
        match="is not a duration: use a positive whole number with a unit: s, m, h, d or w",
    ):
        parse_duration(text)


@pytest.mark.parametrize("text", ["90", " 90 "])
def test_a_number_without_a_unit_is_refused_naming_the_units(text: str) -> None:
    """`--expires 90` could mean seconds or days: no unit is implied."""
    n = text.strip()
    with pytest.raises(ValueError, match=f"has no unit: write {n}s for seconds, {n}d for days"):
        parse_duration(text)
