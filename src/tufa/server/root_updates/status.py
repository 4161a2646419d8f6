"""The open root update as the CLI sees it (`GET .../keys/updates`): current and staged
metadata, key ids, and the signing status as the server computes it (the CLI
recomputes it locally, and tells each key holder what is still missing)."""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

from sqlalchemy import Connection

from tufa.core.clock import iso
from tufa.core.metadata import TARGETS, Channel
from tufa.core.root_update import (
    RootKeyPairJson,
    RootSigningCount,
    SigningCount,
    pairs_to_json,
    prod_targets_signing_status,
    root_signing_status,
)
from tufa.server.online_keys import OnlineKeyids
from tufa.server.repository import Repository
from tufa.server.root_updates.checks import next_prod_targets_versions
from tufa.server.root_updates.staged import StagedUpdate

# Signed metadata as JSON ({"signed": ..., "signatures": [...]}).
MetadataJson = dict[str, Any]


class RootKeyPairsStatus(TypedDict):
    current: list[RootKeyPairJson]
    staged: list[RootKeyPairJson]


class SigningStatus(TypedDict):
    # Per channel: the old and the new root's threshold, signers and who may still sign.
    ci: RootSigningCount
    prod: RootSigningCount
    # Per view: offline signatures of the re-signed production targets.
    prod_targets: dict[str, SigningCount]


class RootUpdateStatus(TypedDict):
    message: str
    created_at: str
    current: dict[Channel, MetadataJson]
    staged: dict[Channel, MetadataJson]
    current_prod_targets: dict[str, MetadataJson]
    prod_targets: dict[str, MetadataJson]
    next_prod_targets_versions: dict[str, int]
    online_keys: OnlineKeyids
    pending_online_keys: OnlineKeyids
    root_key_pairs: RootKeyPairsStatus
    status: SigningStatus


class Cancelled(TypedDict):
    cancelled: Literal[True]


class Applied(TypedDict):
    root_version: int


def describe(
    repo: Repository, conn: Connection, factory_id: int, staged: StagedUpdate
) -> RootUpdateStatus:
    current = repo.roots(conn, factory_id)
    current_targets = repo.live_files(conn, factory_id, Channel.PROD, TARGETS)
    online_after = repo.online_keyids_after(conn, factory_id)
    roots = {c: root_signing_status(current[c].signed, staged.roots[c])[1] for c in Channel}
    prod_root = staged.roots[Channel.PROD].signed
    online_targets = online_after[Channel.PROD][TARGETS]
    return {
        "message": staged.message,
        "created_at": iso(staged.created_at),
        "current": {c: md.to_dict() for c, md in current.items()},
        "staged": {c: md.to_dict() for c, md in staged.roots.items()},
        "current_prod_targets": {
            view: json.loads(stored.body) for view, stored in current_targets.items()
        },
        "prod_targets": {view: md.to_dict() for view, md in staged.prod_targets.items()},
        "next_prod_targets_versions": next_prod_targets_versions(
            repo.counter(conn, factory_id, Channel.PROD, TARGETS), current_targets
        ),
        "online_keys": repo.online_keyids(conn, factory_id),
        "pending_online_keys": repo.online_keyids(conn, factory_id, pending=True),
        "root_key_pairs": {
            "current": pairs_to_json(repo.root_key_pairs(conn, factory_id)),
            "staged": pairs_to_json(staged.pairs),
        },
        "status": {
            "ci": roots[Channel.CI],
            "prod": roots[Channel.PROD],
            "prod_targets": {
                view: prod_targets_signing_status(prod_root, md, online_targets)[1]
                for view, md in staged.prod_targets.items()
            },
        },
    }
