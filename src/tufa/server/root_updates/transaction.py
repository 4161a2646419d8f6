"""The steps of a root update (see the package's docstring), each run in its caller's
transaction: a step that refuses changes nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securesystemslib.signer import Signature
from sqlalchemy import Connection
from tuf.api.metadata import Metadata, Root

from tufa.core.metadata import ONLINE_ROLES, SNAPSHOT, TARGETS, TIMESTAMP, Channel
from tufa.core.root_update import RootKeyPairs, StagedRoots
from tufa.server.exceptions import Conflict, InvalidInput
from tufa.server.online_keys import shares_online_keys
from tufa.server.root_updates import checks, staged, status
from tufa.server.root_updates.status import Applied, Cancelled, RootUpdateStatus
from tufa.server.state import ServerState
from tufa.server.stored_files import StoredFile
from tufa.server.waves import Waves

MAX_MESSAGE = 200


class RootUpdates:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.repo = state.repo

    def describe(self, conn: Connection, factory_id: int) -> RootUpdateStatus:
        return status.describe(self.repo, conn, factory_id, staged.load(conn, factory_id))

    def init(self, conn: Connection, factory_id: int, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            raise InvalidInput(f"field 'message' must be at most {MAX_MESSAGE} characters")
        existing = staged.open_message(conn, factory_id)
        if existing is not None:
            raise Conflict(
                f"a root update is already open ({existing!r}); apply it with "
                "`tufa keys updates apply` or drop it with `tufa keys updates cancel`"
            )
        roots = self.repo.roots(conn, factory_id)
        for md in roots.values():
            md.signed.version += 1
            md.signatures.clear()
        staged.create(
            conn,
            factory_id,
            message,
            self.state.settings.clock.now(),
            roots,
            self.repo.root_key_pairs(conn, factory_id),
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
        update = staged.load(conn, factory_id)
        pairs = update.pairs if pairs is None else pairs
        new: dict[Channel, Metadata[Root]] = {}
        for channel, signed in roots.items():
            md = checks.parse_staged(signed, f"staged {channel} root is not a valid root")
            old = update.roots[channel]
            if md.signed_bytes == old.signed_bytes and pairs == update.pairs:
                md.signatures.update(old.signatures)
            new[channel] = md
        current = self.repo.roots(conn, factory_id)
        self._refuse_during_wave(
            conn, factory_id, current[Channel.PROD].signed, new[Channel.PROD].signed
        )
        checks.check_roots(
            current,
            new,
            self.repo.online_keyids_after(conn, factory_id),
            pairs,
            self.state.settings.clock.now(),
        )
        checks.refuse_repaired(self.repo.root_key_pairs(conn, factory_id), pairs)
        current_targets, versions = self._prod_targets_in_force(conn, factory_id)
        staged_targets = {
            view: checks.check_staged_targets(
                view, signed, update.prod_targets.get(view), current_targets, versions
            )
            for view, signed in prod_targets.items()
        }
        staged.save(conn, factory_id, new, staged_targets, pairs)

    def rotate_online_keys(
        self, conn: Connection, factory_id: int, roles: list[str], channels: list[Channel]
    ) -> None:
        """Generate new online keys (pending until apply) and put them in the staged roots."""
        staged.load(conn, factory_id)
        unknown = set(roles) - set(ONLINE_ROLES)
        if not roles or unknown:
            raise InvalidInput(f"field 'roles' must list some of {', '.join(ONLINE_ROLES)}")
        if not channels:
            raise InvalidInput("field 'channels' must list 'ci', 'prod' or both")
        self._stage_online_keys(
            conn, factory_id, {channel: sorted(set(roles)) for channel in channels}
        )

    def _stage_online_keys(
        self, conn: Connection, factory_id: int, roles: Mapping[Channel, list[str]]
    ) -> None:
        update = staged.load(conn, factory_id)
        edit = StagedRoots({c: md.signed for c, md in update.roots.items()}, update.pairs)
        before = self.repo.online_keyids_after(conn, factory_id)
        for channel, channel_roles in roles.items():
            for role in channel_roles:
                new = self.repo.stage_online_key(conn, factory_id, channel, role)
                edit.replace_online_key(channel, role, before[channel][role], new)
        for md in update.roots.values():
            md.signatures.clear()
        staged.save(conn, factory_id, update.roots)

    def add_signatures(
        self,
        conn: Connection,
        factory_id: int,
        roots: Mapping[Channel, list[Signature]],
        prod_targets: Mapping[str, list[Signature]],
    ) -> None:
        """Accept only signatures that verify, by keys that may sign what they sign."""
        update = staged.load(conn, factory_id)
        current = self.repo.roots(conn, factory_id)
        for channel, signatures in roots.items():
            checks.accept_root_signatures(
                channel, current[channel].signed, update.roots[channel], signatures
            )
        prod_root = update.roots[Channel.PROD].signed
        for view, signatures in prod_targets.items():
            if view not in update.prod_targets:
                raise InvalidInput(f"no re-signed production targets are staged for {view!r}")
            checks.accept_targets_signatures(prod_root, update.prod_targets[view], signatures)
        staged.save(conn, factory_id, update.roots, update.prod_targets)

    def cancel(self, conn: Connection, factory_id: int) -> Cancelled:
        staged.load(conn, factory_id)
        self.repo.drop_pending_keys(conn, factory_id)
        staged.drop(conn, factory_id)
        return {"cancelled": True}

    def apply(self, conn: Connection, factory_id: int) -> Applied:
        """Check every rule, then change everything together (the caller's transaction)."""
        for channel in Channel:
            self.state.db.lock_channel(conn, factory_id, channel)
        update = staged.load(conn, factory_id)
        now = self.state.settings.clock.now()
        current = self.repo.roots(conn, factory_id)
        after = self.repo.online_keyids_after(conn, factory_id)
        checks.check_roots(current, update.roots, after, update.pairs, now)
        checks.require_root_signatures(current, update.roots)
        prod_root = update.roots[Channel.PROD].signed
        self._refuse_during_wave(conn, factory_id, current[Channel.PROD].signed, prod_root)
        current_targets, versions = self._prod_targets_in_force(conn, factory_id)
        new_prod_targets = checks.prod_targets_after(
            prod_root, update.prod_targets, current_targets, versions, after[Channel.PROD][TARGETS]
        )
        self.repo.publish_roots(conn, factory_id, update.roots, update.pairs, new_prod_targets, now)
        staged.drop(conn, factory_id)
        return {"root_version": update.roots[Channel.CI].signed.version}

    def _prod_targets_in_force(
        self, conn: Connection, factory_id: int
    ) -> tuple[dict[str, StoredFile], dict[str, int]]:
        """The production targets each view serves, and the version each view's re-signed
        targets must take."""
        current = self.repo.live_files(conn, factory_id, Channel.PROD, TARGETS)
        counter = self.repo.counter(conn, factory_id, Channel.PROD, TARGETS)
        return current, checks.next_prod_targets_versions(counter, current)

    def _refuse_during_wave(
        self, conn: Connection, factory_id: int, current: Root, new: Root
    ) -> None:
        """Targets keys may not change while a wave is active: its offline signatures
        would no longer count, and re-signing it is the wave owner's decision."""
        if current.roles[TARGETS] == new.roles[TARGETS]:
            return
        active = Waves(self.state).active(conn, factory_id)
        if active:
            raise Conflict(
                f"wave {active[0]!r} is active: complete or cancel it before changing targets keys"
            )
