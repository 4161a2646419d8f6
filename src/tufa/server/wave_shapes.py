"""What the waves (waves.py) answer, as the API sends it: kept apart so that module
stays one reader's size."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from tufa.server.devices import ReleaseProgress
from tufa.server.rollout_health import RolloutJson

WaveStatus = Literal["active", "complete", "cancelled"]


class WaveSummary(ReleaseProgress):
    """A wave as listed: everything but its metadata."""

    name: str
    tag: str
    version: str
    status: WaveStatus
    targets_version: int
    signed: bool
    signed_by: list[str]
    targets: list[str]
    expires: str
    # Devices served the wave whose reports show them fed old metadata (ADR 0018).
    devices_stale: int
    created_at: str
    finished_at: str | None
    # The staged plan it follows (`tufa waves rollout --plan`), or None.
    rollout: RolloutJson | None


class WaveJson(WaveSummary):
    # The signed production targets, as python-tuf writes them.
    metadata: dict[str, Any]


class DeviceRef(TypedDict):
    id: str
    name: str


class RolloutResult(TypedDict):
    """The devices a rollout picked (a dry run picks them without serving them)."""

    wave: str
    devices: list[DeviceRef]
    dry_run: bool
