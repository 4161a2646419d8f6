"""Waves: releases on demand to production devices.

A wave is the production targets of one tag, grown by one CI build: built by the
server (`prepare`), signed by the owner's offline targets key(s) on their machine,
countersigned by the server's online key, and served in a view of its own to the
devices a rollout picks. `complete` makes it the tag's production targets for every
device of the tag; `cancel` stops further rollouts, and the devices that got it keep
being served it until a newer release of their tag exists, so no version they have
seen ever goes down.

Which devices are served a wave, and how far it reached them, are queries of the fleet
(devices.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from securesystemslib.signer import Signature
from sqlalchemy import Connection, insert, select, update
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from tufa.core.clock import iso
from tufa.core.metadata import TARGETS, Channel, build_targets, expiry, to_bytes
from tufa.core.selection import custom_of, tags_of, target_version, version_key
from tufa.server import ci_views, devices
from tufa.server.db import channels, targets, waves
from tufa.server.exceptions import Conflict, InvalidInput, NotFound, RuleViolated
from tufa.server.publishing import refuse_oversized_targets
from tufa.server.rollout_health import RolloutJson, rollout_json
from tufa.server.rollout_plans import (
    COMPLETED,
    NAME,
    end_plan,
    find_plan,
    record_served,
    refuse_if_planned,
    rollout_limit,
)
from tufa.server.signatures import verify_signature
from tufa.server.staleness import stale_device_ids
from tufa.server.state import ServerState
from tufa.server.views import tag_view, wave_view
from tufa.server.wave_shapes import RolloutResult, WaveJson, WaveStatus, WaveSummary
from tufa.server.webhooks import emit

ACTIVE: Final = "active"
COMPLETE: Final = "complete"
CANCELLED: Final = "cancelled"
WAVE_NAME = NAME  # waves and device groups are named alike
MAX_EXPIRES_DAYS = 3650
PROD = Channel.PROD


class Waves:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.repo = state.repo

    # -- building and signing --------------------------------------------------------

    def _prod_root(self, conn: Connection, factory_id: int) -> Root:
        return self.repo.root(conn, factory_id, PROD).signed

    def _next_version(self, conn: Connection, factory_id: int) -> int:
        counter = conn.execute(
            select(channels.c.targets_version).where(
                channels.c.factory_id == factory_id, channels.c.channel == PROD
            )
        ).scalar_one()
        return int(counter) + 1

    def prepare(
        self,
        conn: Connection,
        factory_id: int,
        tag: str,
        version: str,
        prune: list[str],
        expires_days: int,
    ) -> Targets:
        """The production targets a wave for build `version` of `tag` would serve, for
        the owner to sign."""
        if not 1 <= expires_days <= MAX_EXPIRES_DAYS:
            raise InvalidInput(f"'expires_days' must be 1 to {MAX_EXPIRES_DAYS}")
        built = build_targets(
            self._next_version(conn, factory_id),
            expiry(self.state.settings.clock.now(), timedelta(days=expires_days)),
            self._content(conn, factory_id, tag, version, prune),
        )
        # Checked before anyone signs; the signatures fit in the room the limit leaves.
        _refuse_oversized(tag, len(to_bytes(Metadata(built))))
        return built

    def _content(
        self, conn: Connection, factory_id: int, tag: str, version: str, prune: list[str]
    ) -> dict[str, TargetFile]:
        """The tag's production targets, less pruned versions, plus build `version`."""
        attempted = conn.execute(
            select(waves.c.version).where(waves.c.factory_id == factory_id, waves.c.tag == tag)
        ).scalars()
        highest = max(attempted, key=version_key, default=None)
        if highest is not None and version_key(version) <= version_key(highest):
            raise InvalidInput(
                f"version {version} of tag {tag!r} must be higher than every version released "
                f"or attempted for it (highest so far: {highest})"
            )
        build = {
            name: _released_for(target, tag)
            for name, target in ci_views.listed(conn, factory_id, version=version).items()
            if tag in tags_of(target)
        }
        if not build:
            raise InvalidInput(
                f"no CI target of version {version} has tag {tag!r}; publish the build with "
                "`tufa targets add` first"
            )
        released = self.repo.read_file(conn, factory_id, PROD, TARGETS, None, tag_view(tag))
        assert released is not None
        current = Metadata[Targets].from_bytes(released.body).signed.targets
        kept = {
            name: target for name, target in current.items() if target_version(target) not in prune
        }
        return {**kept, **build}

    def create(
        self,
        conn: Connection,
        factory_id: int,
        name: str,
        tag: str,
        version: str,
        prune: list[str],
        md: Metadata[Targets],
    ) -> WaveJson:
        """Store a wave signed offline, after checking it is exactly what `prepare` builds."""
        self.state.db.lock_channel(conn, factory_id, PROD)
        if not WAVE_NAME.fullmatch(name):
            raise InvalidInput("wave names are 1-64 letters, digits, '.', '_' or '-'")
        if self.row(conn, factory_id, name, required=False) is not None:
            raise Conflict(f"a wave named {name!r} exists already; waves are never reused")
        active = self._active_for(conn, factory_id, tag)
        if active is not None:
            raise Conflict(
                f"wave {active!r} is active for tag {tag!r}: complete or cancel it first"
            )
        expected = self._content(conn, factory_id, tag, version, prune)
        expected_version = self._next_version(conn, factory_id)
        if md.signed.targets != expected or md.signed.version != expected_version:
            raise RuleViolated(
                "the signed targets are not what this wave must serve (the current production "
                f"targets of {tag!r} plus build {version}, version {expected_version}); run "
                "`tufa waves init` again",
            )
        now = self.state.settings.clock.now()
        if not now < md.signed.expires <= now + timedelta(days=MAX_EXPIRES_DAYS):
            raise InvalidInput(f"a wave must expire within {MAX_EXPIRES_DAYS} days from now")
        self._check_offline_signatures(conn, factory_id, md)
        md.sign(self.repo.online_signer(conn, factory_id, PROD, TARGETS), append=True)
        _refuse_oversized(tag, len(to_bytes(md)))
        counter = self.repo.bump(conn, factory_id, PROD, TARGETS)[TARGETS]
        if counter != md.signed.version:
            raise Conflict("production targets changed meanwhile; run `tufa waves init` again")
        conn.execute(
            insert(waves).values(
                factory_id=factory_id,
                name=name,
                tag=tag,
                version=version,
                targets_version=md.signed.version,
                status=ACTIVE,
                targets=md.to_bytes(),
                created_at=self.state.settings.clock.now(),
            )
        )
        conn.execute(
            update(targets)
            .where(
                targets.c.factory_id == factory_id,
                targets.c.name.in_(list(md.signed.targets)),
                targets.c.released_at.is_(None),
            )
            .values(released_at=self.state.settings.clock.now())
        )
        self._publish_if_signed(conn, factory_id, name, md)
        return self.describe(conn, factory_id, name)

    def _check_offline_signatures(
        self, conn: Connection, factory_id: int, md: Metadata[Targets]
    ) -> None:
        """Every signature but the server's must be a valid offline targets signature."""
        root = self._prod_root(conn, factory_id)
        online = self.repo.online_keyids(conn, factory_id)[PROD][TARGETS]
        offline = set(root.roles[TARGETS].keyids) - {online}
        offline_signatures = [s for s in md.signatures.values() if s.keyid != online]
        if not offline_signatures:
            raise InvalidInput("a wave must be signed with an offline targets key (-k ARCHIVE)")
        for sig in offline_signatures:
            if sig.keyid not in offline:
                raise InvalidInput(
                    f"key {sig.keyid} is not an offline targets key of the production root"
                )
            verify_signature(root.keys[sig.keyid], sig, md.signed_bytes, "wave's targets")

    def _signed_enough(self, conn: Connection, factory_id: int, md: Metadata[Targets]) -> bool:
        try:
            self._prod_root(conn, factory_id).verify_delegate(
                TARGETS, md.signed_bytes, md.signatures
            )
        except UnsignedMetadataError:
            return False
        return True

    def _publish_if_signed(
        self, conn: Connection, factory_id: int, name: str, md: Metadata[Targets]
    ) -> None:
        if self._signed_enough(conn, factory_id, md):
            now = self.state.settings.clock.now()
            self.repo.store(conn, factory_id, PROD, md, wave_view(name))
            self.repo.publish_snapshot_and_timestamp(
                conn, factory_id, PROD, md.signed.version, now, wave_view(name)
            )

    def add_signatures(
        self, conn: Connection, factory_id: int, name: str, signatures: list[Signature]
    ) -> WaveJson:
        self.state.db.lock_channel(conn, factory_id, PROD)
        row = self.row(conn, factory_id, name)
        if row.status != ACTIVE:
            raise Conflict(f"wave {name!r} is {row.status}")
        md = Metadata[Targets].from_bytes(row.targets)
        was_signed = self._signed_enough(conn, factory_id, md)
        for sig in signatures:
            md.signatures[sig.keyid] = sig
        self._check_offline_signatures(conn, factory_id, md)
        conn.execute(
            update(waves)
            .where(waves.c.factory_id == factory_id, waves.c.name == name)
            .values(targets=md.to_bytes())
        )
        if not was_signed:
            self._publish_if_signed(conn, factory_id, name, md)
        return self.describe(conn, factory_id, name)

    # -- rollout -------------------------------------------------------------------

    def rollout(
        self,
        conn: Connection,
        factory_id: int,
        name: str,
        group: str | None,
        device_ids: list[str] | None,
        limit: str | None,
        dry_run: bool,
    ) -> RolloutResult:
        """Serve the wave to more devices of its tag: a group, a list, a count or a share."""
        self.state.db.lock_channel(conn, factory_id, PROD)
        row = self.row(conn, factory_id, name)
        if row.status != ACTIVE:
            raise Conflict(f"wave {name!r} is {row.status}; only an active wave rolls out")
        refuse_if_planned(conn, factory_id, name)
        self.require_signed(conn, factory_id, row)
        candidates = devices.production_devices(
            conn,
            factory_id,
            row.tag,
            not_in_view=wave_view(name),
            group=group,
            idents=device_ids,
        )
        if device_ids is not None:
            matched = {d.id for d in candidates} | {d.name for d in candidates}
            already = devices.served(conn, factory_id, wave_view(name))
            unknown = sorted(set(device_ids) - matched - already)
            if unknown:
                raise NotFound(f"not production devices of tag {row.tag!r}: {', '.join(unknown)}")
        chosen = candidates[: rollout_limit(limit, len(candidates))]
        result: RolloutResult = {
            "wave": name,
            "devices": [{"id": d.id, "name": d.name} for d in chosen],
            "dry_run": dry_run,
        }
        if not dry_run:
            self.serve(conn, factory_id, row, [d.id for d in chosen], stage=None)
        return result

    def require_signed(self, conn: Connection, factory_id: int, row: Any) -> None:
        if not self._signed_enough(conn, factory_id, Metadata[Targets].from_bytes(row.targets)):
            raise Conflict(
                f"wave {row.name!r} needs more offline signatures first (`tufa waves sign`)"
            )

    def serve(
        self,
        conn: Connection,
        factory_id: int,
        row: Any,
        device_ids: list[str],
        stage: int | None,
        publish: bool = True,
    ) -> None:
        """Serve the wave of `row` to these devices, by a stage of its plan or (None) by
        the operator's choice, and record when (the health gate's silence clock).
        `publish=False` records devices the wave already serves."""
        now = self.state.settings.clock.now()
        served = devices.serve(conn, device_ids, wave_view(row.name), now)
        record_served(conn, factory_id, row.name, served, stage, now)
        # The wave's snapshot and timestamp are published again with new numbers, higher
        # than any version the devices saw in the view they come from.
        if publish and served:
            self.repo.publish_snapshot_and_timestamp(
                conn, factory_id, PROD, row.targets_version, now, wave_view(row.name)
            )

    def complete(self, conn: Connection, factory_id: int, name: str) -> WaveJson:
        """Make the wave the production targets of its tag, for every device of the tag."""
        self.state.db.lock_channel(conn, factory_id, PROD)
        row = self.row(conn, factory_id, name)
        if row.status != ACTIVE:
            raise Conflict(f"wave {name!r} is {row.status}")
        md = Metadata[Targets].from_bytes(row.targets)
        if not self._signed_enough(conn, factory_id, md):
            raise Conflict(f"wave {name!r} needs more offline signatures (`tufa waves sign`)")
        now = self.state.settings.clock.now()
        view = tag_view(row.tag)
        self.repo.store(conn, factory_id, PROD, md, view)
        self.repo.publish_snapshot_and_timestamp(
            conn, factory_id, PROD, md.signed.version, now, view
        )
        devices.serve_tag(conn, factory_id, row.tag, view, now)
        self._finish(conn, factory_id, name, COMPLETE)
        end_plan(conn, factory_id, name, COMPLETED)
        event = {"wave": name, "tag": row.tag, "version": row.version}
        emit(conn, factory_id, "wave.completed", event)
        return self.describe(conn, factory_id, name)

    def cancel(self, conn: Connection, factory_id: int, name: str) -> WaveJson:
        self.state.db.lock_channel(conn, factory_id, PROD)
        row = self.row(conn, factory_id, name)
        if row.status != ACTIVE:
            raise Conflict(f"wave {name!r} is {row.status}")
        self._finish(conn, factory_id, name, CANCELLED)
        end_plan(conn, factory_id, name, CANCELLED)
        return self.describe(conn, factory_id, name)

    def _finish(self, conn: Connection, factory_id: int, name: str, status: WaveStatus) -> None:
        conn.execute(
            update(waves)
            .where(waves.c.factory_id == factory_id, waves.c.name == name)
            .values(status=status, finished_at=self.state.settings.clock.now())
        )

    # -- reading -------------------------------------------------------------------

    def row(self, conn: Connection, factory_id: int, name: str, required: bool = True) -> Any:
        row = conn.execute(
            select(waves).where(waves.c.factory_id == factory_id, waves.c.name == name)
        ).first()
        if row is None and required:
            raise NotFound(f"no wave named {name!r}")
        return row

    def _active_for(self, conn: Connection, factory_id: int, tag: str) -> str | None:
        name: str | None = conn.execute(
            select(waves.c.name).where(
                waves.c.factory_id == factory_id, waves.c.tag == tag, waves.c.status == ACTIVE
            )
        ).scalar()
        return name

    def active(self, conn: Connection, factory_id: int) -> list[str]:
        return list(
            conn.execute(
                select(waves.c.name).where(
                    waves.c.factory_id == factory_id, waves.c.status == ACTIVE
                )
            ).scalars()
        )

    def describe(self, conn: Connection, factory_id: int, name: str) -> WaveJson:
        row = self.row(conn, factory_id, name)
        md = Metadata[Targets].from_bytes(row.targets)
        return {**self._summary(conn, factory_id, row, md), "metadata": md.to_dict()}

    def _summary(
        self, conn: Connection, factory_id: int, row: Any, md: Metadata[Targets]
    ) -> WaveSummary:
        # Once complete, the wave's release is what every device of its tag is served, so
        # its install counts cover them all.
        reached = None if row.status == COMPLETE else wave_view(row.name)
        served = devices.served_ids(conn, factory_id, reached or tag_view(row.tag))
        return {
            "name": row.name,
            "tag": row.tag,
            "version": row.version,
            "status": row.status,
            "targets_version": row.targets_version,
            "signed": self._signed_enough(conn, factory_id, md),
            "signed_by": sorted(md.signatures),
            "targets": sorted(md.signed.targets),
            "expires": iso(md.signed.expires),
            **devices.release_progress(conn, factory_id, row.tag, row.version, reached),
            "devices_stale": len(stale_device_ids(conn, factory_id, served)),
            "created_at": iso(row.created_at),
            "finished_at": iso(row.finished_at),
            "rollout": self._rollout(conn, factory_id, row),
        }

    def _rollout(self, conn: Connection, factory_id: int, row: Any) -> RolloutJson | None:
        plan = find_plan(conn, factory_id, row.name)
        if plan is None:
            return None
        now = self.state.settings.clock.now()
        return rollout_json(conn, factory_id, row.name, row.version, plan, now)

    def list(self, conn: Connection, factory_id: int) -> list[WaveSummary]:
        rows = conn.execute(
            select(waves).where(waves.c.factory_id == factory_id).order_by(waves.c.created_at)
        ).all()
        return [
            self._summary(conn, factory_id, r, Metadata[Targets].from_bytes(r.targets))
            for r in rows
        ]


def _released_for(target: TargetFile, tag: str) -> TargetFile:
    """A CI target as a production release of `tag` alone: its custom `tags` names that
    tag only. Every view of the production channel is signed by the same keys, so anyone
    in the middle can serve a device of one tag another tag's view; a device finds
    nothing there to install, even of a build CI had published for both tags."""
    custom = {**custom_of(target), "tags": [tag]}
    fields = {**target.unrecognized_fields, "custom": custom}
    return TargetFile(target.length, dict(target.hashes), target.path, fields)


def _refuse_oversized(tag: str, size: int) -> None:
    refuse_oversized_targets(
        size,
        f"the production targets of tag {tag!r}",
        "leave old versions out of the wave with `tufa waves init NAME VERSION TAG -k ARCHIVE "
        "--prune V1,V2` (devices keep what they installed)",
    )
