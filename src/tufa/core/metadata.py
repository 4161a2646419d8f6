"""Building and signing the TUF metadata of a factory's two channels.

Everything here is python-tuf's Metadata API; this module only fixes tufa's choices:
which keys sit in which role, what the two channels' roots share (only the owner's
offline targets keys: ADR 0009), and how metadata is serialised for serving (compact,
canonical ordering of keys).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from hashlib import sha256
from typing import TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

ROOT = Root.type
TARGETS = Targets.type
SNAPSHOT = Snapshot.type
TIMESTAMP = Timestamp.type
TOP_LEVEL_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
ONLINE_ROLES = (TARGETS, SNAPSHOT, TIMESTAMP)

# Offline-signed metadata (roots, production targets) closer to expiry than this is
# reported loudly by the server and the CLI.
OFFLINE_EXPIRY_WARNING = timedelta(days=30)

# The production targets role needs the online key and at least one offline key.
MIN_PROD_TARGETS_THRESHOLD = 2

_SERIALIZER = JSONSerializer(compact=True)

AnySigned = TypeVar("AnySigned", Root, Targets, Snapshot, Timestamp)


class Channel(StrEnum):
    """A factory's two TUF repositories: CI for development devices, prod for the fleet."""

    CI = "ci"
    PROD = "prod"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def expiry(now: datetime, period: timedelta) -> datetime:
    return (now + period).replace(microsecond=0)


def build_root(
    *,
    version: int,
    expires: datetime,
    root_keys: Iterable[Key],
    root_threshold: int,
    targets_keys: Iterable[Key],
    targets_threshold: int,
    snapshot_key: Key,
    timestamp_key: Key,
) -> Root:
    """A root with consistent snapshots on, listing the given keys for each role."""
    root = Root(version=version, expires=expires, consistent_snapshot=True)
    for role_name, keys in (
        (ROOT, root_keys),
        (TARGETS, targets_keys),
        (SNAPSHOT, [snapshot_key]),
        (TIMESTAMP, [timestamp_key]),
    ):
        for key in keys:
            root.add_key(key, role_name)
    root.roles[ROOT].threshold = root_threshold
    root.roles[TARGETS].threshold = targets_threshold
    return root


def build_targets(version: int, expires: datetime, targets: Mapping[str, TargetFile]) -> Targets:
    return Targets(version=version, expires=expires, targets=dict(targets))


def build_snapshot(
    version: int, expires: datetime, targets_bytes: bytes, targets_version: int
) -> Snapshot:
    """A snapshot that pins targets.json by length and hash, not by version alone.

    Both channels' roots trust the owner's offline targets keys, so the production
    channel's targets of some version verify against the CI root too; the hash is what
    makes a CI client refuse them (and targets that a stolen offline key signed alone).
    """
    return Snapshot(
        version=version,
        expires=expires,
        meta={f"{TARGETS}.json": file_meta(targets_bytes, targets_version)},
    )


def file_meta(data: bytes, version: int) -> MetaFile:
    """How a timestamp names a snapshot, and a snapshot names targets: version, length, hash."""
    return MetaFile(version=version, length=len(data), hashes={"sha256": sha256(data).hexdigest()})


def build_timestamp(
    version: int, expires: datetime, snapshot_bytes: bytes, snapshot_version: int
) -> Timestamp:
    return Timestamp(
        version=version, expires=expires, snapshot_meta=file_meta(snapshot_bytes, snapshot_version)
    )


# Called after every `sign` with the role signed and the seconds it took; the server
# counts them for its metrics, and core stays free of any metrics library.
sign_observers: list[Callable[[str, float], None]] = []


def sign(signed: AnySigned, signers: Iterable[Signer]) -> Metadata[AnySigned]:
    """Wrap `signed` in a metadata envelope signed by every signer given."""
    started = time.perf_counter()
    md = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    report_signing(signed.type, time.perf_counter() - started)
    return md


def report_signing(role: str, seconds: float) -> None:
    """Tell the `sign_observers` that `role` was signed in `seconds`."""
    for observe in sign_observers:
        observe(role, seconds)


def to_bytes(md: Metadata[AnySigned]) -> bytes:
    """The bytes tufa stores and serves: rendered once, never re-encoded on the read path."""
    return md.to_bytes(_SERIALIZER)
