"""What the server refuses in a root update, beyond the rules both sides check
(`tufa.core.root_update`): content it cannot parse, re-paired root key halves,
production targets that change what devices install, missing signatures, and
signatures by keys that may not sign what they sign.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from securesystemslib.signer import Signature
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from tufa.core.metadata import ROOT, TARGETS, Channel
from tufa.core.root_update import (
    RootKeyPairs,
    RootUpdateError,
    check_staged_roots,
    prod_targets_signing_status,
    root_signing_status,
)
from tufa.server.exceptions import InvalidInput, NotSigned, RuleViolated
from tufa.server.online_keys import OnlineKeyids
from tufa.server.signatures import verify_signature
from tufa.server.stored_files import StoredFile

_SIGN_FIX = "sign with `tufa keys updates sign -k ARCHIVE`"


def parse_staged(signed: dict[str, Any], refusal: str) -> Metadata[Any]:
    """Staged metadata from the signed part the owner sent; `refusal` begins the message
    that refuses it."""
    try:
        return Metadata.from_dict({"signed": signed, "signatures": []})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInput(f"{refusal}: {e}") from e


def check_roots(
    current: Mapping[Channel, Metadata[Root]],
    staged: Mapping[Channel, Metadata[Root]],
    online_after: OnlineKeyids,
    pairs: RootKeyPairs,
    now: datetime,
) -> None:
    try:
        check_staged_roots(
            {c: md.signed for c, md in current.items()},
            {c: md.signed for c, md in staged.items()},
            online_after,
            pairs,
            now,
        )
    except RootUpdateError as e:
        raise RuleViolated(str(e)) from e


def refuse_repaired(current: RootKeyPairs, pairs: RootKeyPairs) -> None:
    """The halves of a root key in force stay together: which production half goes
    with which CI half is not signed, so it may not be changed by whoever stages."""
    partner_of = {**current, **{prod: ci for ci, prod in current.items()}}
    for ci, prod in pairs.items():
        for half, other in ((ci, prod), (prod, ci)):
            if half in partner_of and partner_of[half] != other:
                raise RuleViolated(
                    f"root key half {half} belongs with {partner_of[half]}, not {other}: "
                    "the two halves of a root key never change"
                )


def next_prod_targets_versions(counter: int, views: Iterable[str]) -> dict[str, int]:
    """The version each view's re-signed production targets must take: the next
    numbers of the channel's counter, views in sorted order."""
    return {view: counter + 1 + i for i, view in enumerate(sorted(views))}


def check_staged_targets(
    view: str,
    signed: dict[str, Any],
    previous: Metadata[Targets] | None,
    current: Mapping[str, StoredFile],
    versions: Mapping[str, int],
) -> Metadata[Targets]:
    """Re-signed production targets may change version and expiry, never content:
    a key update must not change what production devices install. Signatures of the
    `previous` staging survive if it signed the same bytes."""
    if view not in current:
        raise InvalidInput(f"there are no production targets for view {view!r}")
    md: Metadata[Targets] = parse_staged(signed, "staged production targets are not valid targets")
    in_force = Metadata[Targets].from_bytes(current[view].body).signed
    if md.signed.targets != in_force.targets or md.signed.delegations != in_force.delegations:
        raise RuleViolated(
            "re-signed production targets must list exactly the current production "
            "targets; releases go through waves"
        )
    if md.signed.version != versions[view]:
        raise RuleViolated(f"re-signed production targets must have version {versions[view]}")
    if previous is not None and previous.signed_bytes == md.signed_bytes:
        md.signatures.update(previous.signatures)
    return md


def require_root_signatures(
    current: Mapping[Channel, Metadata[Root]], staged: Mapping[Channel, Metadata[Root]]
) -> None:
    for channel in Channel:
        verified, status = root_signing_status(current[channel].signed, staged[channel])
        if not verified:
            raise NotSigned(
                f"the staged {channel} root needs {status['old_root']['missing']} more "
                f"signature(s) by keys of the current root and {status['new_root']['missing']} "
                f"by keys of the new root; {_SIGN_FIX}"
            )


def prod_targets_after(
    prod_root: Root,
    staged: Mapping[str, Metadata[Targets]],
    current: Mapping[str, StoredFile],
    versions: Mapping[str, int],
    online_keyid: str,
) -> dict[str, Metadata[Targets]]:
    """Production targets that must be stored with the new root: the staged re-signed
    ones, each with its offline signatures complete. Current targets that the new root
    no longer accepts must have a staged replacement."""
    replacements: dict[str, Metadata[Targets]] = {}
    for view, stored in current.items():
        if view in staged:
            # Production targets may have moved on since staging; re-check.
            check_staged_targets(view, staged[view].signed.to_dict(), None, current, versions)
            md = staged[view]
            complete, status = prod_targets_signing_status(prod_root, md, online_keyid)
            if not complete:
                raise NotSigned(
                    f"the re-signed production targets need {status['missing']} more "
                    f"offline targets signature(s); {_SIGN_FIX}"
                )
            replacements[view] = md
            continue
        in_force = Metadata[Targets].from_bytes(stored.body)
        try:
            prod_root.verify_delegate(TARGETS, in_force.signed_bytes, in_force.signatures)
        except UnsignedMetadataError as e:
            raise RuleViolated(
                "the current production targets would not verify under the new production "
                "root: stage re-signed production targets in this update (the key "
                "commands do this) and sign them with an offline targets key"
            ) from e
    return replacements


def accept_root_signatures(
    channel: Channel, current: Root, staged: Metadata[Root], signatures: Iterable[Signature]
) -> None:
    """Add signatures by root keys of the current or the staged root that verify."""
    allowed = {**current.keys, **staged.signed.keys}
    root_keyids = set(current.roles[ROOT].keyids) | set(staged.signed.roles[ROOT].keyids)
    for sig in signatures:
        if sig.keyid not in root_keyids:
            raise InvalidInput(
                f"key {sig.keyid} is not a root key of the current or the staged {channel} root"
            )
        verify_signature(allowed[sig.keyid], sig, staged.signed_bytes, f"staged {channel} root")
        staged.signatures[sig.keyid] = sig


def accept_targets_signatures(
    prod_root: Root, targets: Metadata[Targets], signatures: Iterable[Signature]
) -> None:
    """Add signatures by targets keys of the staged production root that verify."""
    for sig in signatures:
        if sig.keyid not in prod_root.roles[TARGETS].keyids:
            raise InvalidInput(
                f"key {sig.keyid} is not a targets key of the staged production root"
            )
        verify_signature(prod_root.keys[sig.keyid], sig, targets.signed_bytes, "staged targets")
        targets.signatures[sig.keyid] = sig
