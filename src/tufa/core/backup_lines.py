"""The line layer of a text backup (see tufa.core.backup): numbered lines, each with
its own check, written and read back without knowing what the lines say.

The check is the first six hex digits of sha256 of ``"<number>:<text>"``. Because the
number is part of it, a line typed in the wrong place fails just like a typo, and the
reader can name the exact line (and the key and PEM line it belongs to) instead of a bare
"invalid key". Reading reports every problem at once, so the owner fixes them all in one
pass: mistyped lines (with the likely look-alike character), a mistyped line number,
and repeated, swapped or missing lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CHECK_LENGTH = 6
# PEM lines are 64 characters: padding shorter lines to that width puts every check in
# one column on paper, which makes a skipped line easy to see.
TEXT_WIDTH = 64
_CHECK = re.compile(rf"[0-9a-fA-F]{{{CHECK_LENGTH}}}")
# Line numbers: five digits are plenty, and bound the work for a hostile file.
_NUMBER = re.compile(r"[0-9]{1,5}")
# Characters people confuse when reading a printout, to suggest the likely fix.
_CONFUSABLE = ("0OoDQ", "1lIi", "5Ss", "2Zz", "8B", "6Gb", "9gq", "uvUV", "+t")


class BackupError(ValueError):
    """A text backup that cannot be restored; each problem names its line number."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"the backup has {len(self.problems)} problems:\n{lines}"
        super().__init__(message)


def line_check(number: int, text: str) -> str:
    """The check printed after line `number`: it covers the number, so order matters too."""
    return hashlib.sha256(f"{number}:{text}".encode()).hexdigest()[:CHECK_LENGTH]


def normalise(text: str) -> str:
    """Runs of spaces count as one, so retyping does not have to match the padding."""
    return " ".join(text.split())


def short_keyid(keyid: str) -> str:
    return f"{keyid[:8]}…"


def number_lines(texts: list[str]) -> str:
    """The printable lines: number, text padded to one width, check."""
    width = max(2, len(str(len(texts))))
    return "".join(
        f"{n:0{width}d}  {t.ljust(TEXT_WIDTH)}  {line_check(n, t)}\n"
        for n, t in enumerate(texts, start=1)
    )


@dataclass
class _Context:
    """Where a line sits, so a problem says "key 4bfa…, PEM line 3", not just "line 17"."""

    keyid: str | None = None
    pem_line: int = 0
    last_keyid: str | None = None

    def describe(self, text: str) -> str:
        if text.startswith("key "):
            parts = text.split()
            self.keyid = parts[2] if len(parts) > 2 else "?"
            self.pem_line = 0
            return f" (key line of key {short_keyid(self.keyid)})"
        if self.keyid is None:
            return " (header)" if self.last_keyid is None else f" (after key {self.last_keyid})"
        if text == "end":
            self.last_keyid, self.keyid = short_keyid(self.keyid), None
            return f" (end of key {self.last_keyid})"
        self.pem_line += 1
        return f" (key {short_keyid(self.keyid)}, PEM line {self.pem_line})"


@dataclass
class Lines:
    numbers: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _suggestion(number: int, text: str, check: str) -> str:
    """A one-character fix among look-alikes (0/O, 1/l, ...) that makes the check match."""
    if len(text) > 2 * TEXT_WIDTH:
        return ""  # not a PEM line: no look-alike search on long text
    fixes = []
    for column, char in enumerate(text):
        alternatives = {char.swapcase()}
        for group in _CONFUSABLE:
            if char in group:
                alternatives.update(group)
        alternatives.discard(char)
        for alt in sorted(alternatives):
            candidate = text[:column] + alt + text[column + 1 :]
            if line_check(number, candidate) == check:
                fixes.append(f"; character {column + 1} is {char!r}: should it be {alt!r}?")
    return fixes[0] if len(fixes) == 1 else ""


def read_lines(text: str) -> Lines:
    """Every numbered line with its check verified, and the problems found, in order."""
    result = Lines()
    context = _Context()
    previous = 0
    for file_line, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        expected = previous + 1
        numbered = _NUMBER.fullmatch(tokens[0]) is not None
        if not (numbered and len(tokens) >= 3 and _CHECK.fullmatch(tokens[-1])):
            # Counted as present, so the sequence check does not report it missing too.
            previous = int(tokens[0]) if numbered else expected
            words = " ".join(tokens[1:] if numbered else tokens)
            result.problems.append(
                f"line {previous}{context.describe(words)} "
                f"(line {file_line} of the file): expected 'NUMBER  TEXT  CHECK', where CHECK "
                f"is {CHECK_LENGTH} characters 0-9/a-f"
            )
            result.numbers.append(previous)
            result.texts.append(words)
            continue
        number, body, check = int(tokens[0]), " ".join(tokens[1:-1]), tokens[-1].lower()
        where = context.describe(body)
        if line_check(number, body) != check:
            if number != expected and line_check(expected, body) == check:
                result.problems.append(
                    f"line {expected}{where}: the line number is typed as {number}; "
                    f"it should be {expected}"
                )
                number = expected
            else:
                result.problems.append(
                    f"line {number}{where}: checksum does not match: check for a typo"
                    f"{_suggestion(number, body, check)}"
                )
        result.numbers.append(number)
        result.texts.append(body)
        previous = number
    result.problems.extend(_sequence_problems(result.numbers))
    return result


def _sequence_problems(numbers: list[int]) -> list[str]:
    """Repeated, out-of-order and missing line numbers."""
    problems = []
    seen: set[int] = set()
    highest = 0
    for number in numbers:
        if number in seen:
            problems.append(f"line {number} appears more than once")
        elif number < highest:
            problems.append(
                f"line {number} comes after line {highest}: lines are out of order "
                "(swapped?); put them in order"
            )
        seen.add(number)
        highest = max(highest, number)
    missing = sorted(set(range(1, highest + 1)) - seen)
    if len(missing) == 1:
        problems.append(f"line {missing[0]} is missing: type every line of the printout")
    elif missing:
        listed = ", ".join(str(n) for n in missing[:20]) + (", ..." if len(missing) > 20 else "")
        problems.append(f"lines {listed} are missing: type every line of the printout")
    return problems
