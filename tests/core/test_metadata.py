"""core/metadata.py: the snapshot pins targets by hash, so one channel's targets of the
same version do not pass for the other's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from hashlib import sha256

import pytest
from tuf.api.exceptions import LengthOrHashMismatchError

from tufa.core.metadata import TARGETS, build_snapshot, build_timestamp, expiry

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_snapshot_pins_targets_by_version_length_and_hash() -> None:
    targets = b'{"signed": "ci"}'
    snapshot = build_snapshot(3, NOW, targets, 7)
    meta = snapshot.meta[f"{TARGETS}.json"]
    assert (snapshot.version, meta.version, meta.length) == (3, 7, len(targets))
    assert meta.hashes == {"sha256": sha256(targets).hexdigest()}
    meta.verify_length_and_hashes(targets)
    with pytest.raises(LengthOrHashMismatchError):
        meta.verify_length_and_hashes(b'{"signed": "pr"}')  # same length and version


def test_timestamp_pins_the_snapshot() -> None:
    timestamp = build_timestamp(4, NOW, b"snapshot bytes", 3)
    assert timestamp.snapshot_meta.version == 3
    assert timestamp.snapshot_meta.length == len(b"snapshot bytes")


def test_expiry_is_in_whole_seconds() -> None:
    assert expiry(NOW.replace(microsecond=999), timedelta(days=1)) == NOW + timedelta(days=1)
