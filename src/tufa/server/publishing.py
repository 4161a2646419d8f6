"""CI publishing: targets added (or pruned) and the CI channel re-signed in one step.

Each publish runs in one transaction holding the CI channel's lock, so concurrent
publishers (threads, processes, replicas on one PostgreSQL) are serialised: each one
builds on the targets the previous one published, none is lost, and snapshot and
timestamp always name a targets version that is stored and served.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update
from tuf.api.metadata import Metadata, TargetFile, Targets

from tufa.core.metadata import TARGETS, Channel, build_targets, expiry, sign
from tufa.core.selection import version_key
from tufa.server.blobs import SHA256_PATTERN
from tufa.server.db import targets as targets_table
from tufa.server.errors import bad_request, conflict
from tufa.server.inputs import refuse_unsignable_json
from tufa.server.state import ServerState

TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
# Versions are stored (targets, waves, device reports) in 64 characters.
VERSION_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
MAX_TARGETS_PER_PUBLISH = 1000
MAX_CUSTOM_DEPTH = 16


@dataclass(frozen=True)
class TargetSpec:
    """A target as CI describes it; `custom` is what devices select on."""

    name: str
    length: int
    sha256: str
    url: str | None
    custom: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.custom["version"])

    def target_file(self) -> TargetFile:
        return TargetFile(
            length=self.length,
            hashes={"sha256": self.sha256},
            path=self.name,
            unrecognized_fields={"custom": self.custom},
        )


def parse_target(data: Any, where: str) -> TargetSpec:
    """Check one target description from a request (at JSON path `where`, such as
    'targets[0]'); errors name the field."""
    if not isinstance(data, dict):
        raise bad_request("each target must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise bad_request(
            "target 'name' must be 1-255 letters, digits or . _ + - (no slashes), e.g. "
            "'rpi4-image-42'"
        )
    length, sha256, url = data.get("length"), data.get("sha256"), data.get("url")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise bad_request(f"target {name!r}: 'length' must be a non-negative integer")
    if not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256):
        raise bad_request(f"target {name!r}: 'sha256' must be 64 lowercase hex digits")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("https://", "http://"))
    ):
        raise bad_request(f"target {name!r}: 'url' must be an http(s) URL")
    custom = data.get("custom", {})
    if not isinstance(custom, dict):
        raise bad_request(f"target {name!r}: 'custom' must be a JSON object")
    # Shallower than any body may be, to leave room for the metadata around it in the
    # bodies that carry it later (a wave's signed targets, a root update's prod targets).
    refuse_unsignable_json(custom, f"{where}.custom", max_depth=MAX_CUSTOM_DEPTH)
    version = data.get("version")
    if not isinstance(version, str) or not VERSION_LABEL.fullmatch(version):
        raise bad_request(
            f"target {name!r}: 'version' must be up to 64 letters, digits or . _ : + - such as '42'"
        )
    hardware_ids = _labels(data.get("hardware_ids"), name, "hardware_ids")
    tags = _labels(data.get("tags"), name, "tags")
    fixed = {"version": version, "hardwareIds": hardware_ids, "tags": tags}
    if url is not None:
        fixed["url"] = url
    return TargetSpec(name, length, sha256, url, {**custom, **fixed})


def _labels(value: Any, name: str, field: str) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and LABEL.fullmatch(v) for v in value)
    ):
        raise bad_request(f"target {name!r}: '{field}' must be a non-empty list of short labels")
    return sorted(set(value))


@dataclass(frozen=True)
class PublishResult:
    added: list[str]
    unchanged: list[str]
    removed: list[str]
    targets_version: int


class CiPublisher:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.repo = state.repo

    def _current(self, conn: Connection, factory_id: int) -> Targets:
        stored = self.repo.read_file(conn, factory_id, Channel.CI.value, TARGETS, None)
        assert stored is not None
        return Metadata[Targets].from_bytes(stored.body).signed

    def add(self, factory_id: int, specs: list[TargetSpec]) -> PublishResult:
        if not specs or len(specs) > MAX_TARGETS_PER_PUBLISH:
            raise bad_request(f"give 1 to {MAX_TARGETS_PER_PUBLISH} targets per publish")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise bad_request("the same target name appears twice in one publish")
        for spec in specs:
            if spec.url is None and not self.state.blobs.exists(spec.sha256):
                raise bad_request(
                    f"target {spec.name!r}: no uploaded file has SHA-256 {spec.sha256}; upload "
                    "it first (`tufa targets add --file` does both)"
                )
        with self.state.db.write() as conn:
            self.state.db.lock_channel(conn, factory_id, Channel.CI.value)
            now = self.state.settings.clock.now()
            known = {
                row.name: row
                for row in conn.execute(
                    select(targets_table).where(
                        targets_table.c.factory_id == factory_id,
                        targets_table.c.name.in_(names),
                    )
                )
            }
            added, unchanged = [], []
            current = dict(self._current(conn, factory_id).targets)
            for spec in specs:
                row = known.get(spec.name)
                if row is not None:
                    if (row.length, row.sha256, row.url, json.loads(row.custom)) != (
                        spec.length,
                        spec.sha256,
                        spec.url,
                        spec.custom,
                    ):
                        raise conflict(
                            f"a different target named {spec.name!r} was already published; "
                            "targets never change: publish under a new name"
                        )
                    if row.pruned_at is None:
                        unchanged.append(spec.name)
                        continue
                    conn.execute(
                        update(targets_table)
                        .where(
                            targets_table.c.factory_id == factory_id,
                            targets_table.c.name == spec.name,
                        )
                        .values(pruned_at=None)
                    )
                else:
                    conn.execute(
                        insert(targets_table).values(
                            factory_id=factory_id,
                            name=spec.name,
                            length=spec.length,
                            sha256=spec.sha256,
                            url=spec.url,
                            custom=json.dumps(spec.custom, sort_keys=True),
                            version=spec.version,
                            created_at=now,
                        )
                    )
                current[spec.name] = spec.target_file()
                added.append(spec.name)
            version = self._publish(conn, factory_id, current, now) if added else 0
        return PublishResult(added, unchanged, [], version or self._version(factory_id))

    def prune(self, factory_id: int, keep: int) -> PublishResult:
        """Keep the `keep` highest versions per (hardware id, tag) in the CI targets."""
        if keep < 1:
            raise bad_request("'keep' must be at least 1")
        with self.state.db.write() as conn:
            self.state.db.lock_channel(conn, factory_id, Channel.CI.value)
            now = self.state.settings.clock.now()
            current = dict(self._current(conn, factory_id).targets)
            versions: dict[tuple[str, str], set[str]] = defaultdict(set)
            for target in current.values():
                custom = target.custom
                for hw in custom.get("hardwareIds", []):
                    for tag in custom.get("tags", []):
                        versions[hw, tag].add(str(custom.get("version")))
            kept = {
                key: set(sorted(found, key=version_key)[-keep:]) for key, found in versions.items()
            }
            removed = sorted(
                name
                for name, target in current.items()
                if not any(
                    str(target.custom.get("version")) in kept[hw, tag]
                    for hw in target.custom.get("hardwareIds", [])
                    for tag in target.custom.get("tags", [])
                )
            )
            for name in removed:
                del current[name]
            if removed:
                conn.execute(
                    update(targets_table)
                    .where(
                        targets_table.c.factory_id == factory_id,
                        targets_table.c.name.in_(removed),
                    )
                    .values(pruned_at=now)
                )
                version = self._publish(conn, factory_id, current, now)
            else:
                version = self._current(conn, factory_id).version
        return PublishResult([], [], removed, version)

    def _publish(
        self, conn: Connection, factory_id: int, listed: dict[str, TargetFile], now: datetime
    ) -> int:
        version = self.repo.bump(conn, factory_id, Channel.CI, TARGETS)[TARGETS]
        signed = sign(
            build_targets(version, expiry(now, self.state.settings.ci_targets_expiry), listed),
            [self.repo.online_signer(conn, factory_id, Channel.CI, TARGETS)],
        )
        self.repo.store(conn, factory_id, Channel.CI, signed)
        self.repo.publish_snapshot_and_timestamp(conn, factory_id, Channel.CI, version, now)
        return version

    def _version(self, factory_id: int) -> int:
        with self.state.db.read() as conn:
            return self._current(conn, factory_id).version
