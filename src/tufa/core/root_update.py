"""The rules a new root version must satisfy, shared by the server (which enforces them
when a root update is applied) and the CLI (which checks them before uploading and
tells each key holder what is still missing).

Signature counting is python-tuf's own (`Root.get_root_verification_result`,
`Root.get_verification_result`), so a key id cannot count twice and only keys the
roots list are counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from securesystemslib.signer import Key, Signature
from tuf.api.metadata import Metadata, Root, Targets, VerificationResult

from tufa.core.keys import computed_keyid, is_canonical, public_key_der
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


# The CI half's key id -> the production half's key id, for every root key of the owner.
RootKeyPairs = dict[str, str]


class RootKeyPairJson(TypedDict):
    ci: str
    prod: str


class SigningCount(TypedDict):
    """Signatures of one piece of metadata against the threshold its root sets; the
    server and the CLI both compute it, so key holders see the server's count."""

    threshold: int
    signed: list[str]
    missing: int
    can_sign: list[str]


class RootSigningCount(TypedDict):
    """A staged root needs the threshold of both the current and the new root."""

    old_root: SigningCount
    new_root: SigningCount


# What a factory created before the channels were separated must do once (ADR 0009).
SEPARATE_CHANNELS_FIX = (
    "run `tufa keys rotate-root ARCHIVE` (or, in an open update, `tufa keys updates "
    "rotate-offline-key -r root -k ARCHIVE`): the new root key has one half per channel"
)


def server_generated_roles(first: Root, current: Root, online_targets_keyid: str) -> list[str]:
    """The offline roles (root, targets) whose keys in the `current` production root are
    still ones of its version 1 (`first`): the keys the server generated at creation
    and held until the owner downloaded the archive."""
    current_offline = {
        ROOT: set(current.roles[ROOT].keyids),
        TARGETS: offline_targets_keyids(current, online_targets_keyid),
    }
    return [
        role for role in (ROOT, TARGETS) if current_offline[role] & set(first.roles[role].keyids)
    ]


def server_generated_keys_warning(roles: list[str]) -> str:
    names = {ROOT: "root key", TARGETS: "offline targets key"}
    keys = " and the ".join(names[role] for role in roles)
    fixes = " and ".join(f"`tufa keys rotate-{role} ARCHIVE`" for role in roles)
    return (
        f"production devices still trust the {keys} the server generated when it created "
        f"this factory (it held them until the archive was downloaded): take ownership "
        f"with {fixes}"
    )


def shared_keys_warning(count: int) -> str:
    return (
        f"the CI and production channels still share {count} key(s) (this factory was "
        "created before tufa separated its channels): anyone in the middle could serve "
        f"production devices the CI channel's files. To separate them, {SEPARATE_CHANNELS_FIX}"
    )


def _material(key: Key) -> bytes:
    """The public key itself, whatever its JSON: what "one key" means for the rules."""
    try:
        return public_key_der(key)
    except ValueError:
        # Unreadable (refused by the rules for staged roots): compare as written.
        return json.dumps(key.keyval, sort_keys=True).encode()


def offline_targets_keyids(root: Root, online_targets_keyid: str) -> set[str]:
    return set(root.roles[TARGETS].keyids) - {online_targets_keyid}


def _roles_of(root: Root) -> dict[bytes, set[str]]:
    """Each key's material -> the roles of `root` that list it."""
    found: dict[bytes, set[str]] = {}
    for role_name, role in root.roles.items():
        for keyid in role.keyids:
            found.setdefault(_material(root.keys[keyid]), set()).add(role_name)
    return found


def root_keys_shared(ci: Root, prod: Root) -> bool:
    """Whether a key is a root key of both roots: then a root one channel's root keys
    sign verifies for a client that trusts the other channel's root."""
    ci_root = {_material(ci.keys[k]) for k in ci.roles[ROOT].keyids}
    return any(_material(prod.keys[k]) in ci_root for k in prod.roles[ROOT].keyids)


def shared_keyids(ci: Root, prod: Root, online: Mapping[Channel, Mapping[str, str]]) -> list[str]:
    """Keys (by what they are, not how they are written) that both channels' roots list,
    other than the owner's offline targets keys listed by the targets role alone: each
    one lets a file of one channel verify for a client of the other."""
    offline = {
        _material(root.keys[keyid])
        for channel, root in ((Channel.CI, ci), (Channel.PROD, prod))
        for keyid in offline_targets_keyids(root, online[channel][TARGETS])
    }
    ci_roles, prod_roles = _roles_of(ci), _roles_of(prod)
    shared = {
        material
        for material in ci_roles.keys() & prod_roles.keys()
        if not (material in offline and ci_roles[material] == prod_roles[material] == {TARGETS})
    }
    return sorted(keyid for keyid, key in ci.keys.items() if _material(key) in shared)


def _check_channel(
    new: Root, old: Root, where: str, online_keyids: Mapping[str, str], now: datetime
) -> None:
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
    seen: dict[bytes, str] = {}
    for keyid, key in new.keys.items():
        # A key listed twice under two ids would let one private key count twice
        # towards a threshold, as python-tuf counts signatures by key id.
        if keyid != computed_keyid(key):
            raise RootUpdateError(
                f"{where}: key id {keyid} is not the id TUF computes for its key "
                f"({computed_keyid(key)})"
            )
        if (key.keytype, key.scheme) not in SUPPORTED_SCHEMES:
            raise RootUpdateError(
                f"{where}: key {keyid} is {key.keytype}/{key.scheme}; supported are "
                "ed25519, ecdsa-sha2-nistp256 and rsassa-pss-sha256"
            )
        # The same public key written another way (upper-case hex, other PEM wrapping)
        # has another valid key id: refused, so that one key has one id.
        if not is_canonical(key):
            raise RootUpdateError(
                f"{where}: key {keyid} is not written as python-tuf writes that public key "
                "(the same key written otherwise has another key id)"
            )
        material = _material(key)
        if material in seen:
            raise RootUpdateError(f"{where}: keys {seen[material]} and {keyid} are one key")
        seen[material] = keyid
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
    if set(online_keyids.values()) & set(new.roles[ROOT].keyids):
        raise RootUpdateError(f"{where}: an online key cannot be a root key")
    both = set(new.roles[ROOT].keyids) & offline_targets_keyids(new, online_keyids[TARGETS])
    if both:
        raise RootUpdateError(
            f"{where}: key {min(both)} is both a root key and an offline targets key; a root "
            "key signs roots only (and the targets keys are in both channels' roots)"
        )


def check_staged_roots(
    current: Mapping[Channel, Root],
    staged: Mapping[Channel, Root],
    online_keyids: Mapping[Channel, Mapping[str, str]],
    pairs: Mapping[str, str],
    now: datetime,
) -> None:
    """Raise RootUpdateError unless the staged CI and production roots obey tufa's rules.

    `online_keyids` maps each channel's targets/snapshot/timestamp to the server's online
    key ids that will be in force after the update; `pairs` maps the CI half of each
    owner root key to its production half.
    """
    for channel in Channel:
        _check_channel(
            staged[channel], current[channel], f"{channel} root", online_keyids[channel], now
        )
    ci, prod = staged[Channel.CI], staged[Channel.PROD]
    if ci.roles[TARGETS].threshold != 1:
        raise RootUpdateError("ci root: the targets threshold must be 1 (the online key alone)")
    if prod.roles[TARGETS].threshold < MIN_PROD_TARGETS_THRESHOLD:
        raise RootUpdateError(
            "prod root: the targets threshold must be at least "
            f"{MIN_PROD_TARGETS_THRESHOLD} (the online key and an offline key)"
        )
    if (ci.version, ci.expires) != (prod.version, prod.expires):
        raise RootUpdateError(
            "the CI and production roots must have the same version and expiry: one owner "
            "governs both channels"
        )
    if ci.roles[ROOT].threshold != prod.roles[ROOT].threshold:
        raise RootUpdateError(
            "the CI and production roots must have the same root threshold (each root key "
            "has a half in each)"
        )
    ci_offline = offline_targets_keyids(ci, online_keyids[Channel.CI][TARGETS])
    if ci_offline != offline_targets_keyids(prod, online_keyids[Channel.PROD][TARGETS]):
        raise RootUpdateError("the CI and production roots must list the same offline targets keys")
    ci_root_keys, prod_root_keys = set(ci.roles[ROOT].keyids), set(prod.roles[ROOT].keyids)
    if set(pairs) != ci_root_keys or sorted(pairs.values()) != sorted(prod_root_keys):
        raise RootUpdateError(
            "every root key must be a pair: its CI half in the CI root, its production half "
            "in the production root (the staged root key pairs do not match the roots)"
        )
    shared = shared_keyids(ci, prod, online_keyids)
    if shared:
        root_keys = {_material(r.keys[k]) for r in (ci, prod) for k in r.roles[ROOT].keyids}
        shared_root_keys = [k for k in shared if _material(ci.keys[k]) in root_keys]
        if shared_root_keys:
            named = shared_root_keys[0]
            fix = "this factory was created before tufa separated its channels: "
            fix += SEPARATE_CHANNELS_FIX
        else:
            named = shared[0]
            fix = (
                "each channel needs online keys of its own: cancel this update (`tufa keys "
                "updates cancel`) and open it again, which stages them"
            )
        raise RootUpdateError(
            f"the CI and production roots share key {named}, so a file of one channel "
            f"would verify for devices of the other; {fix}"
        )


@dataclass
class StagedRoots:
    """Both staged roots and the owner's root key pairs, edited as one.

    An owner's root key is added, removed or replaced in both channels at once: its CI
    half in the CI root, its production half in the production root. Offline targets
    keys go into both roots; thresholds are the owner's, except CI's targets threshold,
    which stays 1 (the online key alone).
    """

    roots: dict[Channel, Root]
    pairs: RootKeyPairs

    def add_root_key(self, ci: Key, prod: Key) -> None:
        self.roots[Channel.CI].add_key(ci, ROOT)
        self.roots[Channel.PROD].add_key(prod, ROOT)
        self.pairs[ci.keyid] = prod.keyid

    def root_key_pair(self, keyid: str) -> tuple[str, str]:
        """The (CI, production) key ids of the root key `keyid` is a half of."""
        for ci, prod in self.pairs.items():
            if keyid in (ci, prod):
                return ci, prod
        raise RootUpdateError(f"{keyid} is not a root key of the staged roots")

    def remove_root_key(self, keyid: str) -> None:
        ci, prod = self.root_key_pair(keyid)
        self.roots[Channel.CI].revoke_key(ci, ROOT)
        self.roots[Channel.PROD].revoke_key(prod, ROOT)
        del self.pairs[ci]

    def add_targets_key(self, key: Key) -> None:
        for root in self.roots.values():
            root.add_key(key, TARGETS)

    def remove_targets_key(self, keyid: str) -> None:
        for root in self.roots.values():
            root.revoke_key(keyid, TARGETS)

    def set_threshold(self, role: str, threshold: int) -> None:
        if role == ROOT:
            for root in self.roots.values():
                root.roles[ROOT].threshold = threshold
        else:
            self.roots[Channel.PROD].roles[role].threshold = threshold

    def set_expiry(self, expires: datetime) -> None:
        for root in self.roots.values():
            root.expires = expires

    def replace_online_key(self, channel: Channel, role: str, old: str, new: Key) -> None:
        root = self.roots[channel]
        root.revoke_key(old, role)
        root.add_key(new, role)

    def check(
        self,
        current: Mapping[Channel, Root],
        online_keyids: Mapping[Channel, Mapping[str, str]],
        now: datetime,
    ) -> None:
        check_staged_roots(current, self.roots, online_keyids, self.pairs, now)


def pairs_to_json(pairs: Mapping[str, str]) -> list[RootKeyPairJson]:
    return [{"ci": ci, "prod": prod} for ci, prod in sorted(pairs.items())]


def pairs_from_json(data: Any) -> RootKeyPairs:
    """Root key pairs as the API carries them: [{"ci": KEYID, "prod": KEYID}, ...]."""
    if not isinstance(data, list) or not all(
        isinstance(p, dict)
        and set(p) == {"ci", "prod"}
        and all(isinstance(v, str) and len(v) <= 128 for v in p.values())
        for p in data
    ):
        raise ValueError('root key pairs must be a list of {"ci": KEYID, "prod": KEYID}')
    pairs = {p["ci"]: p["prod"] for p in data}
    if len(pairs) != len(data):
        raise ValueError("a root key is listed twice in the root key pairs")
    return pairs


def root_signing_status(current: Root, staged: Metadata[Root]) -> tuple[bool, RootSigningCount]:
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
) -> tuple[bool, SigningCount]:
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


def _describe(result: VerificationResult) -> SigningCount:
    return {
        "threshold": result.threshold,
        "signed": sorted(result.signed),
        "missing": result.missing,
        "can_sign": sorted(result.unsigned),
    }


def merge_signatures(md: Metadata[Any], signatures: Mapping[str, Signature]) -> None:
    """Add signatures to `md`; a later signature by the same key replaces the earlier."""
    md.signatures.update(signatures)
