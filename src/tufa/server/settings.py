"""Server settings: where data lives, how long online metadata is valid, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tufa.core.keys import KeyType
from tufa.core.metadata import OFFLINE_EXPIRY_WARNING


class Clock:
    """The server's idea of now; replaceable so tests can move time instead of sleeping."""

    def now(self) -> datetime:
        return datetime.now(UTC).replace(microsecond=0)


class OffsetClock(Clock):
    """Real time plus a number of seconds read from a file on every call.

    Lets a test move a running server's clock forward (write `86400` to the file) to
    stage expiry without waiting for it.
    """

    def __init__(self, offset_file: Path) -> None:
        self.offset_file = offset_file

    def now(self) -> datetime:
        try:
            offset = float(self.offset_file.read_text().strip() or 0)
        except FileNotFoundError:
            offset = 0.0
        return super().now() + timedelta(seconds=offset)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    db_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    timestamp_expiry: timedelta = timedelta(days=1)
    snapshot_expiry: timedelta = timedelta(days=7)
    ci_targets_expiry: timedelta = timedelta(days=30)
    root_expiry: timedelta = timedelta(days=365)
    prod_targets_expiry: timedelta = timedelta(days=365)
    # Offline-signed metadata closer to expiry than this is reported loudly.
    offline_expiry_warning: timedelta = OFFLINE_EXPIRY_WARNING
    # The re-signer wakes up this often and re-signs what has less than half its
    # validity period left, so a missed run or two never lets anything expire.
    resign_interval: timedelta = timedelta(minutes=1)
    # How often the background task looks at staged rollouts, to halt or advance them.
    rollout_interval: timedelta = timedelta(seconds=15)
    resign_enabled: bool = True
    max_body_bytes: int = 1024 * 1024
    max_blob_bytes: int = 16 * 1024**3
    blob_dir: Path | None = None
    clock: Clock = field(default_factory=Clock)
    master_key_file: Path | None = None
    online_key_type: KeyType = KeyType.ED25519
    # How the poll path learns that a factory changed on PostgreSQL (ADR 0014): "query",
    # a read after each request arrived, or "notify", LISTEN/NOTIFY.
    poll_invalidation: str = "query"
    # SHA-256 (hex) of the token that may read /metrics besides the operator token.
    metrics_token_sha256: str | None = None
    # A log line for every request; refusals are logged either way.
    access_log: bool = True

    @property
    def blob_path(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    def expiry_for(self, role: str) -> timedelta:
        return {
            "timestamp": self.timestamp_expiry,
            "snapshot": self.snapshot_expiry,
            "targets": self.ci_targets_expiry,
            "root": self.root_expiry,
        }[role]
