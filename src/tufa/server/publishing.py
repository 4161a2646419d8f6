"""CI publishing: targets added (pruned, deleted) and the CI channel re-signed in one step.

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

from sqlalchemy import Connection, select, update
from tuf.api.metadata import TargetFile
from tuf.ngclient import UpdaterConfig

from tufa.core.metadata import TARGETS, Channel
from tufa.core.selection import target_version, version_key
from tufa.server import ci_views
from tufa.server.blobs import SHA256_PATTERN, owned_lengths
from tufa.server.db import ci_view_targets
from tufa.server.db import targets as targets_table
from tufa.server.exceptions import Conflict, InvalidInput, NotFound, TargetsTooLarge
from tufa.server.inputs import refuse_unsignable_json
from tufa.server.sql_types import insert_rows, one_of, rows_of
from tufa.server.state import ServerState

TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
# Versions are stored (targets, waves, device reports) in 64 characters.
VERSION_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
# A publish re-signs only the views it changes, so its cost follows its size (ADR 0016).
MAX_TARGETS_PER_PUBLISH = 10_000
# The body of such a publish: room for 10,000 targets of about 3 KB each.
MAX_PUBLISH_BYTES = 32 * 1024 * 1024
# Per target, so that one CI token cannot fill the targets metadata every device
# downloads with a few huge entries (the total is bounded below too).
MAX_URL_LENGTH = 2048
MAX_LABELS = 64  # hardware ids, and tags
# (hardware id, tag) pairs of one target: each is a CI view the target is signed into.
MAX_VIEWS_PER_TARGET = 64
MAX_CUSTOM_BYTES = 4096  # as compact JSON
# Levels of objects and lists, the custom object itself being one: also leaves room for
# the metadata around it in the bodies that carry it later (a wave's signed targets, a
# root update's production targets), which may nest at most MAX_JSON_DEPTH.
MAX_CUSTOM_DEPTH = 8
# Keys of `custom` that tufa writes from the target's own fields: devices select on them
# and tufa-agent downloads from custom "url", so nobody may set them any other way.
RESERVED_CUSTOM = {
    "version": "version",
    "hardwareIds": "hardware_ids",
    "tags": "tags",
    "url": "url",
}
# Every device must be able to download every targets file published: python-tuf's
# ngclient refuses one longer than UpdaterConfig.targets_max_length (5,000,000 bytes) by
# default, tufa-agent one longer than 8 MiB. Publishes stop short of the lower limit,
# leaving room for the signatures a later key rotation may add to the same targets.
NGCLIENT_TARGETS_MAX_LENGTH = UpdaterConfig().targets_max_length
MAX_TARGETS_BYTES = NGCLIENT_TARGETS_MAX_LENGTH - 64 * 1024
PRUNE_ADVICE = (
    "remove targets from the CI channel first: `tufa targets prune --keep N` keeps the N "
    "newest versions per hardware id and tag, `tufa targets delete NAME...` removes the "
    "targets named"
)


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
        raise InvalidInput("each target must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise InvalidInput(
            "target 'name' must be 1-255 letters, digits or . _ + - (no slashes), e.g. "
            "'rpi4-image-42'"
        )
    length, sha256, url = data.get("length"), data.get("sha256"), data.get("url")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise InvalidInput(f"target {name!r}: 'length' must be a non-negative integer")
    if not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256):
        raise InvalidInput(f"target {name!r}: 'sha256' must be 64 lowercase hex digits")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("https://", "http://"))
    ):
        raise InvalidInput(f"target {name!r}: 'url' must be an http(s) URL")
    if url is not None and len(url) > MAX_URL_LENGTH:
        raise InvalidInput(
            f"target {name!r}: 'url' may be at most {MAX_URL_LENGTH} characters (it has {len(url)})"
        )
    custom = _custom(data.get("custom", {}), name, f"{where}.custom")
    version = data.get("version")
    if not isinstance(version, str) or not VERSION_LABEL.fullmatch(version):
        raise InvalidInput(
            f"target {name!r}: 'version' must be up to 64 letters, digits or . _ : + - such as '42'"
        )
    hardware_ids = _labels(data.get("hardware_ids"), name, "hardware_ids")
    tags = _labels(data.get("tags"), name, "tags")
    if len(hardware_ids) * len(tags) > MAX_VIEWS_PER_TARGET:
        raise InvalidInput(
            f"target {name!r}: 'hardware_ids' times 'tags' may be at most "
            f"{MAX_VIEWS_PER_TARGET} pairs (it has {len(hardware_ids)} x {len(tags)}): each "
            "pair's devices are served a view of their own, which every publish of the "
            "target signs again; publish it as several targets"
        )
    fixed = {"version": version, "hardwareIds": hardware_ids, "tags": tags}
    if url is not None:
        fixed["url"] = url
    return TargetSpec(name, length, sha256, url, {**custom, **fixed})


def _labels(value: Any, name: str, field: str) -> list[str]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_LABELS
        or not all(isinstance(v, str) and LABEL.fullmatch(v) for v in value)
    ):
        raise InvalidInput(
            f"target {name!r}: '{field}' must be a list of 1 to {MAX_LABELS} labels of up to "
            "128 letters, digits or . _ : + -"
        )
    return sorted(set(value))


def _custom(value: Any, name: str, where: str) -> dict[str, Any]:
    """The extra custom metadata of a target (at JSON path `where`): a small JSON
    object, no reserved key."""
    if not isinstance(value, dict):
        raise InvalidInput(f"target {name!r}: 'custom' must be a JSON object")
    for key, field in RESERVED_CUSTOM.items():
        if key in value:
            meaning = (
                ": a target with 'url' is an external one that devices download from there "
                "(give 'sha256' and 'length' too); without it they download the uploaded file "
                "from this server"
                if key == "url"
                else ""
            )
            raise InvalidInput(
                f"target {name!r}: 'custom.{key}' is written by tufa from the target's "
                f"'{field}' field; give it there instead{meaning}"
            )
    refuse_unsignable_json(value, where, max_depth=MAX_CUSTOM_DEPTH)
    size = len(json.dumps(value, separators=(",", ":")))
    if size > MAX_CUSTOM_BYTES:
        raise InvalidInput(
            f"target {name!r}: 'custom' may be at most {MAX_CUSTOM_BYTES} bytes as compact "
            f"JSON (it has {size}); keep large data in the target file itself"
        )
    return value


def refuse_oversized_targets(size: int, what: str, advice: str) -> None:
    """Refuse a publish whose targets metadata some device could not download."""
    if size > MAX_TARGETS_BYTES:
        raise TargetsTooLarge(
            f"{what} would be {size} bytes, more than the {MAX_TARGETS_BYTES} that every "
            f"device accepts (python-tuf's ngclient refuses more than "
            f"{NGCLIENT_TARGETS_MAX_LENGTH} by default): {advice}. Nothing was published",
        )


def _version(target: TargetFile) -> str:
    """The target's version; every published target has one (parse_target)."""
    return target_version(target) or ""


@dataclass(frozen=True)
class PublishResult:
    added: list[str]
    unchanged: list[str]
    removed: list[str]
    # The newest CI targets version this publish signed (with several views, the
    # highest), or the channel's current one when nothing changed.
    targets_version: int


@dataclass(frozen=True)
class PublishCheck:
    """What a publish of the same targets would do now (`CiPublisher.check`)."""

    added: list[str]
    unchanged: list[str]
    # SHA-256 of each file the publish needs that this factory has not uploaded.
    missing_uploads: list[str]


class CiPublisher:
    """Adds, prunes and deletes CI targets; each re-signs only the views it changes."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.repo = state.repo

    def add(self, factory_id: int, specs: list[TargetSpec]) -> PublishResult:
        _refuse_unpublishable(specs)
        with self.state.db.write() as conn:
            self.state.db.lock_channel(conn, factory_id, Channel.CI)
            missing = _missing_uploads(conn, factory_id, specs)
            if missing:
                raise InvalidInput(
                    f"target {missing[0].name!r}: 'sha256': this factory has no uploaded file "
                    f"with SHA-256 {missing[0].sha256}; upload it first (`tufa targets add "
                    "--file` does both), or give the 'url' devices download it from"
                )
            now = self.state.settings.clock.now()
            new, relisted, unchanged = _sorted(conn, factory_id, specs)
            insert_rows(
                conn,
                targets_table,
                [
                    {
                        "factory_id": factory_id,
                        "name": spec.name,
                        "length": spec.length,
                        "sha256": spec.sha256,
                        "url": spec.url,
                        "custom": json.dumps(spec.custom, sort_keys=True),
                        "version": spec.version,
                        "created_at": now,
                        **ci_views.entry_columns(spec.target_file()),
                    }
                    for spec in new
                ],
            )
            if relisted:
                conn.execute(
                    update(targets_table)
                    .where(
                        targets_table.c.factory_id == factory_id,
                        one_of(conn, targets_table.c.name, [spec.name for spec in relisted]),
                    )
                    .values(pruned_at=None)
                )
            added = new + relisted
            listed = {spec.name: ci_views.views_of(spec.custom) for spec in added}
            ci_views.list_in_views(conn, factory_id, listed)
            version = self._publish(conn, factory_id, set().union(*listed.values()), now)
        return PublishResult([spec.name for spec in added], unchanged, [], version)

    def check(self, factory_id: int, specs: list[TargetSpec]) -> PublishCheck:
        """What `add` would do with `specs`, refusing what it would refuse, except that
        files not uploaded yet are listed instead: an uploader asks this first, so that
        it sends only the files a publish needs, and none for a target that is refused."""
        _refuse_unpublishable(specs)
        with self.state.db.read() as conn:
            missing = _missing_uploads(conn, factory_id, specs)
            new, relisted, unchanged = _sorted(conn, factory_id, specs)
        return PublishCheck(
            [spec.name for spec in new + relisted],
            unchanged,
            sorted({spec.sha256 for spec in missing}),
        )

    def prune(self, factory_id: int, keep: int) -> PublishResult:
        """Keep the `keep` highest versions per (hardware id, tag) in the CI targets."""
        if keep < 1:
            raise InvalidInput("'keep' must be at least 1")
        with self.state.db.write() as conn:
            self.state.db.lock_channel(conn, factory_id, Channel.CI)
            listed = conn.execute(
                select(ci_view_targets.c.view, targets_table.c.name, targets_table.c.version)
                .join(
                    targets_table,
                    (targets_table.c.factory_id == ci_view_targets.c.factory_id)
                    & (targets_table.c.name == ci_view_targets.c.name),
                )
                .where(ci_view_targets.c.factory_id == factory_id)
            ).all()
            versions: dict[str, set[str]] = defaultdict(set)
            for view, _, version in listed:
                versions[view].add(version)
            kept = {
                view: set(sorted(found, key=version_key)[-keep:])
                for view, found in versions.items()
            }
            names = {name for _, name, _ in listed}
            kept_names = {name for view, name, version in listed if version in kept[view]}
            removed = sorted(names - kept_names)
            version = self._remove(conn, factory_id, removed)
        return PublishResult([], [], removed, version)

    def delete(self, factory_id: int, names: list[str]) -> PublishResult:
        """Remove the targets `names` from the CI targets, all in one publish or none.

        Production views are signed offline and keep their own list: a target they list
        stays served to their devices, and its file stays stored."""
        if not names or len(names) > MAX_TARGETS_PER_PUBLISH:
            raise InvalidInput(f"'names' must list 1 to {MAX_TARGETS_PER_PUBLISH} target names")
        if len(set(names)) != len(names):
            raise InvalidInput("'names' lists the same target twice")
        with self.state.db.write() as conn:
            self.state.db.lock_channel(conn, factory_id, Channel.CI)
            listed = set(
                conn.execute(
                    select(targets_table.c.name).where(
                        targets_table.c.factory_id == factory_id,
                        one_of(conn, targets_table.c.name, names),
                        targets_table.c.pruned_at.is_(None),
                    )
                ).scalars()
            )
            missing = sorted(set(names) - listed)
            if missing:
                raise NotFound(
                    f"not in the CI targets: {', '.join(missing)}; nothing was deleted "
                    "(`tufa targets list` shows what is)"
                )
            version = self._remove(conn, factory_id, sorted(names))
        return PublishResult([], [], sorted(names), version)

    def _remove(self, conn: Connection, factory_id: int, names: list[str]) -> int:
        """Take `names` out of the CI targets (recording when), and publish the views
        that listed them."""
        now = self.state.settings.clock.now()
        if not names:
            return self._publish(conn, factory_id, set(), now)
        conn.execute(
            update(targets_table)
            .where(
                targets_table.c.factory_id == factory_id,
                one_of(conn, targets_table.c.name, names),
            )
            .values(pruned_at=now)
        )
        return self._publish(conn, factory_id, ci_views.unlist(conn, factory_id, names), now)

    def _publish(self, conn: Connection, factory_id: int, views: set[str], now: datetime) -> int:
        """Publish `views`, refusing any that some device could not download; return the
        newest CI targets version (the channel's current one if `views` is empty)."""
        published = ci_views.publish(self.repo, conn, factory_id, views, now)
        for view, (_, size) in published.items():
            refuse_oversized_targets(
                size, f"the CI targets of {ci_views.describe(view)}", PRUNE_ADVICE
            )
        return self.repo.counter(conn, factory_id, Channel.CI, TARGETS)


def _refuse_unpublishable(specs: list[TargetSpec]) -> None:
    if not specs or len(specs) > MAX_TARGETS_PER_PUBLISH:
        raise InvalidInput(f"give 1 to {MAX_TARGETS_PER_PUBLISH} targets per publish")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidInput("the same target name appears twice in one publish")


def _missing_uploads(
    conn: Connection, factory_id: int, specs: list[TargetSpec]
) -> list[TargetSpec]:
    """The targets served from this server whose file this factory has not uploaded. A
    file it uploaded must have the target's length. The answer is the same whether or
    not another factory holds the file (ADR 0010)."""
    hosted = [spec for spec in specs if spec.url is None]
    owned = owned_lengths(conn, factory_id, (spec.sha256 for spec in hosted))
    for spec in hosted:
        if spec.sha256 in owned and owned[spec.sha256] != spec.length:
            raise InvalidInput(
                f"target {spec.name!r}: 'length' is {spec.length}, but the uploaded file "
                f"with SHA-256 {spec.sha256} has {owned[spec.sha256]} bytes"
            )
    return [spec for spec in hosted if spec.sha256 not in owned]


def _sorted(
    conn: Connection, factory_id: int, specs: list[TargetSpec]
) -> tuple[list[TargetSpec], list[TargetSpec], list[str]]:
    """`specs` as new targets, unlisted ones to list again, and the names of those
    listed as they are; a different target under a published name is refused."""
    names = [spec.name for spec in specs]
    known = {
        row.name: row
        for row in conn.execute(
            rows_of(conn, targets_table, factory_id, targets_table.c.name, names)
        )
    }
    new, relisted, unchanged = [], [], []
    for spec in specs:
        row = known.get(spec.name)
        if row is None:
            new.append(spec)
        elif (row.length, row.sha256, row.url, json.loads(row.custom)) != (
            spec.length,
            spec.sha256,
            spec.url,
            spec.custom,
        ):
            raise Conflict(
                f"a different target named {spec.name!r} was already published; "
                "targets never change: publish under a new name"
            )
        elif row.pruned_at is None:
            unchanged.append(spec.name)
        else:
            relisted.append(spec)
    return new, relisted, unchanged
