"""Root updates as transactions: init, stage edits, collect signatures, apply or cancel.

The owner's offline keys never reach the server: the CLI edits the staged roots and
signs them locally. The server checks each step against the rules in
`tufa.core.root_update` and applies an update atomically: both roots, the owner's root
key pairs, re-signed production targets, promoted online keys, and fresh CI targets,
snapshots and timestamps change in one transaction, or nothing does.

A factory created before the channels were separated (ADR 0009) has online keys both
channels share. Its next update gives them keys of their own: `init` stages new online
keys for CI (targets, snapshot, timestamp) and for production (snapshot, timestamp;
production keeps its online targets key, so its offline-signed targets stay valid).
The owner's edits must also give each channel its own half of every root key, which
`rotate-root` does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from securesystemslib.signer import Signature
from sqlalchemy import Connection, delete, insert, select, update
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.clock import iso
from tufa.core.keys import KeyPair
from tufa.core.metadata import (
    ONLINE_ROLES,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    Channel,
    to_bytes,
)
from tufa.core.root_update import (
    RootKeyPairs,
    RootUpdateError,
    StagedRoots,
    check_staged_roots,
    pairs_from_json,
    pairs_to_json,
    prod_targets_signing_status,
    root_signing_status,
)
from tufa.server.db import channels, online_keys, root_key_pairs, root_updates
from tufa.server.errors import ApiError, bad_request, conflict, not_found
from tufa.server.repository import OnlineKeyids
from tufa.server.signatures import verify_signature
from tufa.server.state import ServerState
from tufa.server.waves import Waves

MAX_MESSAGE = 200


def _refused(error: RootUpdateError) -> ApiError:
    return ApiError(400, "rule_violated", str(error))


def _no_update() -> ApiError:
    return not_found("no root update is open; start one with `tufa keys updates init`")


def _load_root(body: bytes) -> Metadata[Root]:
    return Metadata[Root].from_bytes(body)


def _staged_roots(row: Any) -> dict[Channel, Metadata[Root]]:
    return {Channel.CI: _load_root(row.ci_root), Channel.PROD: _load_root(row.prod_root)}


def _staged_pairs(row: Any) -> RootKeyPairs:
    return pairs_from_json(json.loads(row.root_key_pairs))


def _save_staged(
    conn: Connection,
    factory_id: int,
    roots: Mapping[Channel, Metadata[Root]],
    prod_targets: dict[str, Any] | None = None,
    pairs: RootKeyPairs | None = None,
) -> None:
    """Store the staged roots (and re-signed production targets and root key pairs,
    when given)."""
    values: dict[str, Any] = {
        "ci_root": to_bytes(roots[Channel.CI]),
        "prod_root": to_bytes(roots[Channel.PROD]),
    }
    if prod_targets is not None:
        values["prod_targets"] = json.dumps(prod_targets)
    if pairs is not None:
        values["root_key_pairs"] = json.dumps(pairs_to_json(pairs))
    conn.execute(update(root_updates).where(root_updates.c.factory_id == factory_id).values(values))


def shares_online_keys(online: OnlineKeyids) -> bool:
    """Whether the channels still sign with the same online keys (factories created
    before ADR 0009, until their next root update)."""
    return bool(set(online[Channel.CI].values()) & set(online[Channel.PROD].values()))


def current_root_key_pairs(conn: Connection, factory_id: int) -> RootKeyPairs:
    rows = conn.execute(
        select(root_key_pairs.c.ci_keyid, root_key_pairs.c.prod_keyid).where(
            root_key_pairs.c.factory_id == factory_id
        )
    ).all()
    return dict(rows)


class RootUpdates:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.repo = state.repo

    # -- reading ---------------------------------------------------------------------

    def _current_roots(self, conn: Connection, factory_id: int) -> dict[Channel, Metadata[Root]]:
        return {channel: self.repo.root(conn, factory_id, channel) for channel in Channel}

    def _current_prod_targets(self, conn: Connection, factory_id: int) -> dict[str, bytes]:
        """The production targets of every view that serves devices (default, tags, waves)."""
        found = {}
        for view in self.repo.live_views(conn, factory_id, Channel.PROD.value):
            stored = self.repo.read_file(conn, factory_id, Channel.PROD.value, TARGETS, None, view)
            assert stored is not None
            found[view] = stored.body
        return found

    def _row(self, conn: Connection, factory_id: int) -> Any:
        row = conn.execute(
            select(root_updates).where(root_updates.c.factory_id == factory_id)
        ).first()
        if row is None:
            raise _no_update()
        return row

    def _pending_keyids(self, conn: Connection, factory_id: int) -> OnlineKeyids:
        return self.repo.online_keyids(conn, factory_id, pending=True)

    def _keyids_after(self, conn: Connection, factory_id: int) -> OnlineKeyids:
        in_force = self.repo.online_keyids(conn, factory_id)
        pending = self._pending_keyids(conn, factory_id)
        return {channel: {**in_force[channel], **pending[channel]} for channel in Channel}

    def _next_prod_targets_versions(self, conn: Connection, factory_id: int) -> dict[str, int]:
        """The version each view's re-signed production targets must take: the next
        numbers of the channel's counter, views in sorted order."""
        counter = conn.execute(
            select(channels.c.targets_version).where(
                channels.c.factory_id == factory_id, channels.c.channel == Channel.PROD.value
            )
        ).scalar_one()
        views = sorted(self._current_prod_targets(conn, factory_id))
        return {view: int(counter) + 1 + i for i, view in enumerate(views)}

    def describe(self, conn: Connection, factory_id: int) -> dict[str, Any]:
        """The open update as the CLI sees it: current and staged metadata, key ids, and
        the signing status as the server computes it (the CLI recomputes it locally)."""
        row = self._row(conn, factory_id)
        current = self._current_roots(conn, factory_id)
        staged = _staged_roots(row)
        staged_targets = {
            view: Metadata[Targets].from_dict(data)
            for view, data in json.loads(row.prod_targets).items()
        }
        after = self._keyids_after(conn, factory_id)
        status: dict[str, Any] = {}
        for channel in Channel:
            _, status[channel.value] = root_signing_status(current[channel].signed, staged[channel])
        status["prod_targets"] = {
            view: prod_targets_signing_status(
                staged[Channel.PROD].signed, md, after[Channel.PROD][TARGETS]
            )[1]
            for view, md in staged_targets.items()
        }
        return {
            "message": row.message,
            "created_at": iso(row.created_at),
            "current": {c.value: md.to_dict() for c, md in current.items()},
            "staged": {c.value: md.to_dict() for c, md in staged.items()},
            "current_prod_targets": {
                view: json.loads(body)
                for view, body in self._current_prod_targets(conn, factory_id).items()
            },
            "prod_targets": {view: md.to_dict() for view, md in staged_targets.items()},
            "next_prod_targets_versions": self._next_prod_targets_versions(conn, factory_id),
            "online_keys": _by_channel(self.repo.online_keyids(conn, factory_id)),
            "pending_online_keys": _by_channel(self._pending_keyids(conn, factory_id)),
            "root_key_pairs": {
                "current": pairs_to_json(current_root_key_pairs(conn, factory_id)),
                "staged": pairs_to_json(_staged_pairs(row)),
            },
            "status": status,
        }

    # -- steps -----------------------------------------------------------------------

    def init(self, conn: Connection, factory_id: int, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            raise bad_request(f"field 'message' must be at most {MAX_MESSAGE} characters")
        existing = conn.execute(
            select(root_updates.c.message).where(root_updates.c.factory_id == factory_id)
        ).first()
        if existing is not None:
            raise conflict(
                f"a root update is already open ({existing.message!r}); apply it with "
                "`tufa keys updates apply` or drop it with `tufa keys updates cancel`"
            )
        current = self._current_roots(conn, factory_id)
        for md in current.values():
            md.signed.version += 1
            md.signatures.clear()
        conn.execute(
            insert(root_updates).values(
                factory_id=factory_id,
                message=message,
                created_at=self.state.settings.clock.now(),
                ci_root=to_bytes(current[Channel.CI]),
                prod_root=to_bytes(current[Channel.PROD]),
                prod_targets="{}",
                root_key_pairs=json.dumps(pairs_to_json(current_root_key_pairs(conn, factory_id))),
            )
        )
        if shares_online_keys(self.repo.online_keyids(conn, factory_id)):
            self._stage_online_keys(
                conn,
                factory_id,
                {Channel.CI: list(ONLINE_ROLES), Channel.PROD: [SNAPSHOT, TIMESTAMP]},
            )

    def stage(
        self,
        conn: Connection,
        factory_id: int,
        roots: Mapping[Channel, dict[str, Any]],
        prod_targets: Mapping[str, dict[str, Any]],
        pairs: RootKeyPairs | None,
    ) -> None:
        """Replace the staged content (the root key pairs stay as staged unless given).
        Signatures survive only where the signed part and the pairs are unchanged, so
        nobody's signature ever covers something they did not see."""
        row = self._row(conn, factory_id)
        staged_pairs = _staged_pairs(row)
        pairs = staged_pairs if pairs is None else pairs
        old = _staged_roots(row)
        new: dict[Channel, Metadata[Root]] = {}
        for channel, signed in roots.items():
            try:
                md = Metadata[Root].from_dict({"signed": signed, "signatures": []})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise bad_request(f"staged {channel.value} root is not a valid root: {e}") from e
            if md.signed_bytes == old[channel].signed_bytes and pairs == staged_pairs:
                md.signatures.update(old[channel].signatures)
            new[channel] = md
        current = self._current_roots(conn, factory_id)
        self._refuse_during_wave(
            conn, factory_id, current[Channel.PROD].signed, new[Channel.PROD].signed
        )
        try:
            check_staged_roots(
                {c: md.signed for c, md in current.items()},
                {c: md.signed for c, md in new.items()},
                self._keyids_after(conn, factory_id),
                pairs,
                self.state.settings.clock.now(),
            )
        except RootUpdateError as e:
            raise _refused(e) from e
        self._refuse_repaired(conn, factory_id, pairs)
        kept_targets = json.loads(row.prod_targets)
        staged_targets: dict[str, Any] = {}
        for view, signed in prod_targets.items():
            staged_targets[view] = self._check_staged_targets(
                conn, factory_id, view, signed, kept_targets.get(view)
            )
        _save_staged(conn, factory_id, new, staged_targets, pairs)

    @staticmethod
    def _refuse_repaired(conn: Connection, factory_id: int, pairs: RootKeyPairs) -> None:
        """The halves of a root key in force stay together: which production half goes
        with which CI half is not signed, so it may not be changed by whoever stages."""
        current = current_root_key_pairs(conn, factory_id)
        partner_of = {**current, **{prod: ci for ci, prod in current.items()}}
        for ci, prod in pairs.items():
            for half, other in ((ci, prod), (prod, ci)):
                if half in partner_of and partner_of[half] != other:
                    raise ApiError(
                        400,
                        "rule_violated",
                        f"root key half {half} belongs with {partner_of[half]}, not {other}: "
                        "the two halves of a root key never change",
                    )

    def _check_staged_targets(
        self,
        conn: Connection,
        factory_id: int,
        view: str,
        signed: dict[str, Any],
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Re-signed production targets may change version and expiry, never content:
        a key update must not change what production devices install."""
        current_body = self._current_prod_targets(conn, factory_id).get(view)
        if current_body is None:
            raise bad_request(f"there are no production targets for view {view!r}")
        try:
            md = Metadata[Targets].from_dict({"signed": signed, "signatures": []})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise bad_request(f"staged production targets are not valid targets: {e}") from e
        current = Metadata[Targets].from_bytes(current_body).signed
        if md.signed.targets != current.targets or md.signed.delegations != current.delegations:
            raise ApiError(
                400,
                "rule_violated",
                "re-signed production targets must list exactly the current production "
                "targets; releases go through waves",
            )
        expected = self._next_prod_targets_versions(conn, factory_id)[view]
        if md.signed.version != expected:
            raise ApiError(
                400,
                "rule_violated",
                f"re-signed production targets must have version {expected}",
            )
        if previous is not None:
            kept = Metadata[Targets].from_dict(previous)
            if kept.signed_bytes == md.signed_bytes:
                md.signatures.update(kept.signatures)
        return md.to_dict()

    def rotate_online_keys(
        self, conn: Connection, factory_id: int, roles: list[str], channels: list[Channel]
    ) -> None:
        """Generate new online keys (pending until apply) and put them in the staged roots."""
        self._row(conn, factory_id)
        unknown = set(roles) - set(ONLINE_ROLES)
        if not roles or unknown:
            raise bad_request(f"field 'roles' must list some of {', '.join(ONLINE_ROLES)}")
        if not channels:
            raise bad_request("field 'channels' must list 'ci', 'prod' or both")
        self._stage_online_keys(
            conn, factory_id, {channel: sorted(set(roles)) for channel in channels}
        )

    def _stage_online_keys(
        self, conn: Connection, factory_id: int, roles: Mapping[Channel, list[str]]
    ) -> None:
        row = self._row(conn, factory_id)
        staged = _staged_roots(row)
        edit = StagedRoots({c: md.signed for c, md in staged.items()}, _staged_pairs(row))
        before = self._keyids_after(conn, factory_id)
        now = self.state.settings.clock.now()
        for channel, channel_roles in roles.items():
            for role in channel_roles:
                pair = KeyPair.generate(self.state.settings.online_key_type)
                self.repo.retire_online_key(conn, factory_id, channel, role, now, pending=True)
                self.repo.store_online_key(conn, factory_id, channel, role, pair, pending=True)
                edit.replace_online_key(channel, role, before[channel][role], pair.public)
        for md in staged.values():
            md.signatures.clear()
        _save_staged(conn, factory_id, staged)

    def add_signatures(
        self,
        conn: Connection,
        factory_id: int,
        roots: Mapping[Channel, list[Signature]],
        prod_targets: Mapping[str, list[Signature]],
    ) -> None:
        """Accept only signatures that verify, by keys that may sign what they sign."""
        row = self._row(conn, factory_id)
        current = self._current_roots(conn, factory_id)
        staged = _staged_roots(row)
        for channel, signatures in roots.items():
            md = staged[channel]
            allowed = {**current[channel].signed.keys, **md.signed.keys}
            root_keyids = set(current[channel].signed.roles[ROOT].keyids) | set(
                md.signed.roles[ROOT].keyids
            )
            for sig in signatures:
                if sig.keyid not in root_keyids:
                    raise bad_request(
                        f"key {sig.keyid} is not a root key of the current or the staged "
                        f"{channel.value} root"
                    )
                verify_signature(
                    allowed[sig.keyid], sig, md.signed_bytes, f"staged {channel.value} root"
                )
                md.signatures[sig.keyid] = sig
        staged_targets = json.loads(row.prod_targets)
        prod_root = staged[Channel.PROD].signed
        for view, signatures in prod_targets.items():
            if view not in staged_targets:
                raise bad_request(f"no re-signed production targets are staged for {view!r}")
            targets = Metadata[Targets].from_dict(staged_targets[view])
            for sig in signatures:
                if sig.keyid not in prod_root.roles[TARGETS].keyids:
                    raise bad_request(
                        f"key {sig.keyid} is not a targets key of the staged production root"
                    )
                verify_signature(
                    prod_root.keys[sig.keyid], sig, targets.signed_bytes, "staged targets"
                )
                targets.signatures[sig.keyid] = sig
            staged_targets[view] = targets.to_dict()
        _save_staged(conn, factory_id, staged, staged_targets)

    def cancel(self, conn: Connection, factory_id: int) -> dict[str, Any]:
        self._row(conn, factory_id)
        conn.execute(
            delete(online_keys).where(
                online_keys.c.factory_id == factory_id, online_keys.c.pending.is_(True)
            )
        )
        conn.execute(delete(root_updates).where(root_updates.c.factory_id == factory_id))
        return {"cancelled": True}

    def apply(self, conn: Connection, factory_id: int) -> dict[str, int]:
        """Check every rule, then change everything together (the caller's transaction)."""
        for channel in Channel:
            self.state.db.lock_channel(conn, factory_id, channel.value)
        row = self._row(conn, factory_id)
        now = self.state.settings.clock.now()
        current = self._current_roots(conn, factory_id)
        staged = _staged_roots(row)
        pairs = _staged_pairs(row)
        after = self._keyids_after(conn, factory_id)
        try:
            check_staged_roots(
                {c: md.signed for c, md in current.items()},
                {c: md.signed for c, md in staged.items()},
                after,
                pairs,
                now,
            )
        except RootUpdateError as e:
            raise _refused(e) from e
        for channel in Channel:
            verified, status = root_signing_status(current[channel].signed, staged[channel])
            if not verified:
                raise ApiError(
                    400,
                    "not_signed",
                    f"the staged {channel.value} root needs "
                    f"{status['old_root']['missing']} more signature(s) by keys of the current "
                    f"root and {status['new_root']['missing']} by keys of the new root; sign "
                    "with `tufa keys updates sign -k ARCHIVE`",
                )
        prod_root = staged[Channel.PROD].signed
        self._refuse_during_wave(conn, factory_id, current[Channel.PROD].signed, prod_root)
        new_prod_targets = self._prod_targets_after(
            conn, factory_id, prod_root, json.loads(row.prod_targets)
        )
        self._promote_pending_keys(conn, factory_id, now)
        conn.execute(delete(root_key_pairs).where(root_key_pairs.c.factory_id == factory_id))
        conn.execute(
            insert(root_key_pairs),
            [
                {"factory_id": factory_id, "ci_keyid": ci, "prod_keyid": prod}
                for ci, prod in sorted(pairs.items())
            ],
        )
        for channel in Channel:
            self.repo.store(conn, factory_id, channel, staged[channel])
        conn.execute(
            update(channels)
            .where(channels.c.factory_id == factory_id)
            .values(root_version=staged[Channel.CI].signed.version)
        )
        prod_versions = {
            view: Metadata[Targets].from_bytes(body).signed.version
            for view, body in self._current_prod_targets(conn, factory_id).items()
        }
        for view, targets in sorted(new_prod_targets.items()):
            targets.sign(
                self.repo.online_signer(conn, factory_id, Channel.PROD, TARGETS), append=True
            )
            prod_root.verify_delegate(TARGETS, targets.signed_bytes, targets.signatures)
            counter = self.repo.bump(conn, factory_id, Channel.PROD, TARGETS)[TARGETS]
            if counter != targets.signed.version:
                raise conflict(
                    "production targets changed while this update was open; stage and sign "
                    "the re-signed production targets again"
                )
            self.repo.store(conn, factory_id, Channel.PROD, targets, view)
            prod_versions[view] = counter
        ci_targets = self.repo.resign_ci_targets(conn, factory_id, now)
        self.repo.publish_snapshot_and_timestamp(conn, factory_id, Channel.CI, ci_targets, now)
        for view, version in sorted(prod_versions.items()):
            self.repo.publish_snapshot_and_timestamp(
                conn, factory_id, Channel.PROD, version, now, view
            )
        conn.execute(delete(root_updates).where(root_updates.c.factory_id == factory_id))
        return {"root_version": staged[Channel.CI].signed.version}

    def _refuse_during_wave(
        self, conn: Connection, factory_id: int, current: Root, staged: Root
    ) -> None:
        """Targets keys may not change while a wave is active: its offline signatures
        would no longer count, and re-signing it is the wave owner's decision."""
        if current.roles[TARGETS] == staged.roles[TARGETS]:
            return
        active = Waves(self.state).active(conn, factory_id)
        if active:
            raise conflict(
                f"wave {active[0]!r} is active: complete or cancel it before changing targets keys"
            )

    def _prod_targets_after(
        self,
        conn: Connection,
        factory_id: int,
        prod_root: Root,
        staged_targets: dict[str, Any],
    ) -> dict[str, Metadata[Targets]]:
        """Production targets that must be stored with the new root: the staged re-signed
        ones, each with its offline signatures complete. Current targets that the new root
        no longer accepts must have a staged replacement."""
        replacements: dict[str, Metadata[Targets]] = {}
        online_keyid = self._keyids_after(conn, factory_id)[Channel.PROD][TARGETS]
        for view, body in self._current_prod_targets(conn, factory_id).items():
            if view in staged_targets:
                # Production targets may have moved on since staging; re-check.
                self._check_staged_targets(
                    conn, factory_id, view, copy.deepcopy(staged_targets[view]["signed"]), None
                )
                md = Metadata[Targets].from_dict(staged_targets[view])
                complete, status = prod_targets_signing_status(prod_root, md, online_keyid)
                if not complete:
                    raise ApiError(
                        400,
                        "not_signed",
                        f"the re-signed production targets need {status['missing']} more "
                        "offline targets signature(s); sign with `tufa keys updates sign -k "
                        "ARCHIVE`",
                    )
                replacements[view] = md
                continue
            current = Metadata[Targets].from_bytes(body)
            try:
                prod_root.verify_delegate(TARGETS, current.signed_bytes, current.signatures)
            except UnsignedMetadataError as e:
                raise ApiError(
                    400,
                    "rule_violated",
                    "the current production targets would not verify under the new production "
                    "root: stage re-signed production targets in this update (the key "
                    "commands do this) and sign them with an offline targets key",
                ) from e
        return replacements

    def _promote_pending_keys(self, conn: Connection, factory_id: int, now: Any) -> None:
        for channel, roles in self._pending_keyids(conn, factory_id).items():
            for role in roles:
                self.repo.retire_online_key(conn, factory_id, channel, role, now)
        conn.execute(
            update(online_keys)
            .where(online_keys.c.factory_id == factory_id, online_keys.c.pending.is_(True))
            .values(pending=False)
        )


def _by_channel(keyids: OnlineKeyids) -> dict[str, dict[str, str]]:
    return {channel.value: dict(roles) for channel, roles in keyids.items()}
