"""Human durations on the command line: `90s`, `15m`, `12h`, `30d`, `2w`."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> timedelta:
    """Parse `N[s|m|h|d|w]` (seconds when no unit is given)."""
    match = _PATTERN.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use a positive number with s, m, h, d or w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])
