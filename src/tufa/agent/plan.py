"""What a check decides: which verified target to install, or why none.

The agent never goes down: it takes a target only if its version is higher than the
one installed, and a release that failed to install is not tried again until a newer
one is published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from tuf.api.metadata import TargetFile

from tufa.agent.state import AgentError, AgentStatus, Release
from tufa.core.files import is_plain_name
from tufa.core.metadata import Channel
from tufa.core.selection import newest_for, target_version, version_key


class PlanJson(TypedDict):
    """`tufa-agent check --json` and `install-bundle --json`."""

    install: dict[str, Any] | None
    reason: str


@dataclass(frozen=True)
class Plan:
    """What a check found: the release to install, or why nothing is to be done."""

    release: Release | None
    reason: str
    target: TargetFile | None = None

    def to_json(self) -> PlanJson:
        return {"install": asdict(self.release) if self.release else None, "reason": self.reason}


def release_of(target: TargetFile) -> Release:
    # The name and the digest become file names on the device (slots, downloads): signed
    # or not, a path there would write or delete files outside them (the trusted root).
    sha256 = target.hashes.get("sha256", "")
    if (
        not is_plain_name(target.path)
        or len(sha256) != 64
        or any(c not in "0123456789abcdef" for c in sha256)
    ):
        raise AgentError(
            f"refused: target {target.path!r} (sha256 {sha256!r}) is not a plain file name "
            "with a SHA-256 digest, as the server publishes; nothing was downloaded"
        )
    return Release(
        version=target_version(target) or "",
        target=target.path,
        sha256=sha256,
        length=target.length,
    )


def _nothing_for(channel: Channel, hardware_id: str, tag: str) -> str:
    """Why a device of `channel` finds no target: a CI build reaches a production
    device only through a wave, so "nothing published" would mislead its owner."""
    if channel == Channel.PROD:
        return (
            f"nothing is released to production for hardware id {hardware_id!r} and tag "
            f"{tag!r} (a CI build reaches production devices through a wave: "
            "tufa waves init, then tufa waves rollout)"
        )
    return f"no target is published to CI for hardware id {hardware_id!r} and tag {tag!r}"


def plan_for(
    status: AgentStatus, channel: Channel, hardware_id: str, tag: str, targets: list[TargetFile]
) -> Plan:
    target = newest_for(targets, hardware_id, tag)
    if target is None:
        return Plan(None, _nothing_for(channel, hardware_id, tag))
    release = release_of(target)
    installed = status.installed
    if installed is not None and installed.sha256 == release.sha256:
        return Plan(None, f"version {installed.version} ({installed.target}) is up to date")
    if release.sha256 in status.failed:
        return Plan(
            None,
            f"version {release.version} ({release.target}) failed to install before; "
            "waiting for a newer version",
        )
    if installed is not None and version_key(release.version) <= version_key(installed.version):
        return Plan(
            None,
            f"refusing to move from version {installed.version} to {release.version} "
            f"({release.target}): the agent never installs a lower or equal version",
        )
    return Plan(release, f"version {release.version} ({release.target}) is to be installed", target)
