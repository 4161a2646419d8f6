"""core/durations.py: `90s`, `15m`, `12h`, `30d`, `2w` on the command line."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tufa.core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("90", timedelta(seconds=90)),  # seconds when no unit is given
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
    with pytest.raises(ValueError, match="is not a duration: use a positive number"):
        parse_duration(text)
