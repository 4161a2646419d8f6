"""The rules a new root version must satisfy, shared by the server (which enforces them
when a root update is applied) and the CLI (which checks them before uploading and
tells each key holder what is still missing).

Signature counting is python-tuf's own (`Root.get_root_verification_result`,
`Root.get_verification_result`), so a key id cannot count twice and only keys the
roots list are counted.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.keys import computed_keyid
from tufa.core.metadata import (
    MIN_PROD_TARGETS_THRESHOLD,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    Channel,
)

SUPPORTED_SCHEMES = {
    ("ed25519", "ed25519"),
    ("ecdsa", "ecdsa-sha2-nistp256"),
    ("rsa", "rsassa-pss-sha256"),
}


class RootUpdateError(ValueError):
    """A staged root breaks a rule; the message names the rule."""


def _without_targets_threshold(root: Root) -> dict[str, Any]:
    data = copy.deepcopy(root.to_dict())
    data["roles"][TARGETS].pop("threshold")
    return data


def check_staged_roots(
    current: Mapping[Channel, Root],
    staged: Mapping[Channel, Root],
    online_keyids: Mapping[str, str],
    now: datetime,
) -> None:
    """Raise RootUpdateError unless the staged CI and production roots obey tufa's rules.

    `online_keyids` maps targets/snapshot/timestamp to the server's online key ids that
    will be in force after the update.
    """
    for channel in Channel:
        new, old = staged[channel], current[channel]
        where = f"{channel.value} root"
        if new.version != old.version + 1:
            raise RootUpdateError(
                f"{where}: version must be {old.version + 1} (current + 1), not {new.version}"
            )
        if not new.consistent_snapshot:
            raise RootUpdateError(f"{where}: consistent_snapshot must stay on")
        if new.expires <= now:
            raise RootUpdateError(f"{where}: expires in the past ({new.expires.isoformat()})")
        for role_name, role in new.roles.items():
            if not 1 <= role.threshold <= len(role.keyids):
                raise RootUpdateError(
                    f"{where}: {role_name} threshold {role.threshold} cannot be met by its "
                    f"{len(role.keyids)} key(s)"
                )
        seen: dict[str, str] = {}
        for keyid, key in new.keys.items():
            # A key listed twice under two ids would let one private key count twice
            # towards a threshold, as python-tuf counts signatures by key id.
            if keyid != computed_keyid(key):
                raise RootUpdateError(
                    f"{where}: key id {keyid} is not the id TUF computes for its key "
                    f"({computed_keyid(key)})"
                )
            material = json.dumps(key.keyval, sort_keys=True)
            if material in seen:
                raise RootUpdateError(f"{where}: keys {seen[material]} and {keyid} are one key")
            seen[material] = keyid
            if (key.keytype, key.scheme) not in SUPPORTED_SCHEMES:
                raise RootUpdateError(
                    f"{where}: key {keyid} is {key.keytype}/{key.scheme}; supported are "
                    "ed25519, ecdsa-sha2-nistp256 and rsassa-pss-sha256"
                )
        for role_name in (SNAPSHOT, TIMESTAMP):
            if new.roles[role_name].keyids != [online_keyids[role_name]]:
                raise RootUpdateError(
                    f"{where}: the {role_name} role must list exactly the server's online "
                    f"{role_name} key {online_keyids[role_name]}"
                )
        if online_keyids[TARGETS] not in new.roles[TARGETS].keyids:
            raise RootUpdateError(
                f"{where}: the online targets key {online_keyids[TARGETS]} may not be removed"
            )
        online = set(online_keyids.values())
        if online & set(new.roles[ROOT].keyids):
            raise RootUpdateError(f"{where}: an online key cannot be a root key")
    ci, prod = staged[Channel.CI], staged[Channel.PROD]
    if ci.roles[TARGETS].threshold != 1:
        raise RootUpdateError("ci root: the targets threshold must be 1 (the online key alone)")
    if prod.roles[TARGETS].threshold < MIN_PROD_TARGETS_THRESHOLD:
        raise RootUpdateError(
            "prod root: the targets threshold must be at least "
            f"{MIN_PROD_TARGETS_THRESHOLD} (the online key and an offline key)"
        )
    if _without_targets_threshold(ci) != _without_targets_threshold(prod):
        raise RootUpdateError(
            "the production root may differ from the CI root only in the targets threshold"
        )


def root_signing_status(current: Root, staged: Metadata[Root]) -> tuple[bool, dict[str, Any]]:
    """Who has signed the staged root, and how many more signatures each root needs."""
    result = staged.signed.get_root_verification_result(
        current, staged.signed_bytes, staged.signatures
    )
    return result.verified, {
        "old_root": _describe(result.first),
        "new_root": _describe(result.second),
    }


def prod_targets_signing_status(
    prod_root: Root, targets: Metadata[Targets], online_keyid: str
) -> tuple[bool, dict[str, Any]]:
    """Signing status of re-signed production targets, counting the online signature that
    the server adds when it applies the update."""
    result = prod_root.get_verification_result(TARGETS, targets.signed_bytes, targets.signatures)
    signed = set(result.signed) | {online_keyid}
    offline_signed = sorted(signed - {online_keyid})
    missing = max(0, result.threshold - len(signed))
    return missing == 0, {
        "threshold": result.threshold,
        "signed": offline_signed,
        "missing": missing,
        "can_sign": sorted(set(result.unsigned) - {online_keyid}),
    }


def _describe(result: Any) -> dict[str, Any]:
    return {
        "threshold": result.threshold,
        "signed": sorted(result.signed),
        "missing": result.missing,
        "can_sign": sorted(result.unsigned),
    }


def merge_signatures(md: Metadata[Any], signatures: Mapping[str, Signature]) -> None:
    """Add signatures to `md`; a later signature by the same key replaces the earlier."""
    md.signatures.update(signatures)
