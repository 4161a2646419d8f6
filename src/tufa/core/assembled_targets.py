"""Targets metadata assembled from entries encoded once, when each target was published.

Signing a targets file with python-tuf's Metadata API encodes every entry again: to
canonical JSON for the signature, and to JSON for the bytes served. For a view of a
channel that lists many targets this is most of a publish's cost, although one publish
changes a few entries. Here each entry is encoded once (`encode_entry`, stored with the
target), and a targets file is joined from the stored encodings around a header that
python-tuf renders. The result is the same bytes python-tuf's `Metadata.sign` and
compact serialiser make (tests/core/test_assembled_targets.py checks both encodings
against python-tuf and securesystemslib on random input).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signer
from tuf.api.metadata import TargetFile, Targets

from tufa.core.metadata import report_signing

JsonValue = bool | int | str | list[Any] | dict[str, Any] | None

# What python-tuf's Targets.to_dict renders for an empty list: the entries go inside.
_EMPTY_TARGETS = '"targets":{}'


@dataclass(frozen=True)
class EncodedEntry:
    """One target's entry in a targets file, in both encodings it is needed in."""

    name: str
    # As python-tuf's compact serialiser writes it (json.dumps, sorted keys, ASCII).
    json: str
    # As securesystemslib's canonical encoder writes it, for the signature. Equal to
    # `json` unless a string holds characters JSON escapes and canonical JSON does not.
    canonical: str


# A backslash in json.dumps' ASCII output followed by neither a quote nor a backslash: an
# escape canonical JSON does not make (or, harmlessly, an escaped backslash then a letter).
_OTHER_ESCAPE = re.compile(r'\\[^"\\]')


def _plain_json(value: JsonValue) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def canonical_json(value: JsonValue) -> str:
    """securesystemslib's canonical JSON of `value` (which holds no float: canonical JSON
    has none), by the C encoder of `json` where the two agree."""
    return _canonical(value, _plain_json(value))


def _canonical(value: JsonValue, plain: str) -> str:
    """The canonical JSON of `value`, whose sorted compact JSON is `plain`: the same text
    unless that escapes more than \" and \\ (control characters, non-ASCII text), which
    canonical JSON writes unescaped."""
    if _OTHER_ESCAPE.search(plain) is None:
        return plain
    encoded = encode_canonical(value)
    assert encoded is not None  # None only when an output function is given
    return encoded


def encode_entry(target: TargetFile) -> EncodedEntry:
    entry = target.to_dict()
    plain = _plain_json(entry)
    return EncodedEntry(target.path, plain, _canonical(entry, plain))


def _join(header: str, members: Iterable[str]) -> str:
    before, marker, after = header.partition(_EMPTY_TARGETS)
    assert marker, "python-tuf renders an empty targets list as '\"targets\":{}'"
    return f'{before}"targets":{{{",".join(members)}}}{after}'


def sign_assembled(
    version: int, expires: datetime, entries: Sequence[EncodedEntry], signers: Iterable[Signer]
) -> bytes:
    """The served bytes of a targets file listing `entries`, signed by every signer.

    Entries are listed in name order, as sorted keys put them; names are unique."""
    ordered = sorted(entries, key=lambda entry: entry.name)
    header = Targets(version=version, expires=expires).to_dict()
    signed_canonical = _join(
        canonical_json(header),
        (f"{canonical_json(e.name)}:{e.canonical}" for e in ordered),
    ).encode()
    started = time.perf_counter()
    signatures = [signer.sign(signed_canonical).to_dict() for signer in signers]
    report_signing(Targets.type, time.perf_counter() - started)
    signed_json = _join(
        _plain_json(header),
        (f"{json.dumps(e.name)}:{e.json}" for e in ordered),
    )
    envelope = json.dumps(signatures, separators=(",", ":"), sort_keys=True)
    return f'{{"signatures":{envelope},"signed":{signed_json}}}'.encode()
