"""Human durations on the command line: `90s`, `15m`, `12h`, `30d`, `2w`.

Every option that takes a duration (`tufa tokens create --expires`, `tufa waves init
--expires`, the server's expiries and intervals) parses it here, and the unit is never
implied: `--expires 90` could mean seconds or days, so it is refused, naming both.
"""

from __future__ import annotations

import re
from datetime import timedelta

import click

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_BARE_NUMBER = re.compile(r"^\s*(\d+)\s*$")
FORMS = "a positive whole number with a unit: s, m, h, d or w, e.g. 90s, 15m, 12h, 30d or 2w"


def parse_duration(text: str) -> timedelta:
    """Parse `N` followed by one of s, m, h, d, w."""
    bare = _BARE_NUMBER.match(text)
    if bare and int(bare.group(1)) > 0:
        n = bare.group(1)
        raise ValueError(f"{text!r} has no unit: write {n}s for seconds, {n}d for days ({FORMS})")
    match = _PATTERN.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use {FORMS}")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


class Duration(click.ParamType[timedelta]):
    """A click option's type for a duration, so that each refusal reads alike."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()
