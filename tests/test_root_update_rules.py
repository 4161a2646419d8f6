"""The server's rules for root updates, through the HTTP API as an admin would call it.

Every refusal must name the rule it enforces and leave the database exactly as it was
(compared row by row, open root updates included). Payloads are built with python-tuf's
Metadata API and signed with the owner's keys from the factory's offline archive, so the
only thing wrong with each request is the one thing the test breaks.

The rules themselves are the same code whatever the database, so the refusals of single
requests run on SQLite only; applying, cancelling and the pending online keys are database
transactions, and run on both backends.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from tests.helpers import (
    Factory,
    assert_error,
    create_factory,
    dump_all_tables,
    send,
    served_metadata,
)
from tufa.core.archive import ArchiveKey, OfflineArchive, generate_root_key
from tufa.core.keys import KeyPair, computed_keyid
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Channel
from tufa.core.root_update import StagedRoots, pairs_from_json, pairs_to_json

UPDATES = "/keys/updates"
VIEW = ""  # the production targets view every device of a fresh factory gets

# The backend adds nothing to a check of one request's payload: SQLite only for those.
sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def _signed(md: Metadata[Any], pair: KeyPair) -> dict[str, Any]:
    signature: dict[str, Any] = pair.signer().sign(md.signed_bytes).to_dict()
    return signature


@dataclass
class Owner:
    """A factory admin holding the factory's offline archive, talking HTTP."""

    factory: Factory
    root_key: ArchiveKey  # a pair: one half per channel
    targets_key: KeyPair  # one key both channels list

    @classmethod
    def of(cls, factory: Factory) -> Owner:
        # What `tufa keys download` fetches (left unconfirmed: these tests need no CLI).
        response = factory.request("GET", "/keys/archive")
        assert response.status_code == 200, response.text
        archive = OfflineArchive.from_bytes(response.content)
        (root,) = archive.keys_for(ROOT)
        (targets,) = archive.keys_for(TARGETS)
        return cls(factory, root, targets.prod)

    @property
    def server_dump(self) -> dict[str, list[tuple[Any, ...]]]:
        return dump_all_tables(self.factory.server)

    def call(
        self, method: str, suffix: str = "", token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        chosen = self.factory.admin_token if token is None else token
        path = self.factory.path(f"{UPDATES}{suffix}")
        return send(self.factory.server, method, path, chosen or None, **kwargs)

    def ok(self, method: str, suffix: str = "", **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, suffix, **kwargs)
        assert response.is_success, f"{method} {UPDATES}{suffix}: {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def init(self, message: str = "rules test") -> dict[str, Any]:
        response = self.call("POST", json={"message": message})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def update(self) -> dict[str, Any]:
        return self.ok("GET")

    def staged(self) -> dict[Channel, Metadata[Root]]:
        data = self.update()["staged"]
        return {c: Metadata[Root].from_dict(copy.deepcopy(data[c.value])) for c in Channel}

    def current_prod_targets(self) -> Metadata[Targets]:
        return Metadata[Targets].from_bytes(served_metadata(self.factory, "prod")["targets"])

    def stage(
        self,
        change: Callable[[StagedRoots], None],
        prod_targets: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """PUT the staged roots and root key pairs after `change`, and optionally
        re-signed targets."""
        staged = StagedRoots(
            {c: md.signed for c, md in self.staged().items()},
            pairs_from_json(self.update()["root_key_pairs"]["staged"]),
        )
        change(staged)
        body: dict[str, Any] = {
            "roots": {c.value: root.to_dict() for c, root in staged.roots.items()},
            "root_key_pairs": pairs_to_json(staged.pairs),
        }
        if prod_targets is not None:
            body["prod_targets"] = prod_targets
        return self.call("PUT", "/staged", json=body)

    def resigned_targets(self) -> dict[str, Any]:
        """The current production targets as the next version: what key commands stage."""
        signed = self.current_prod_targets().signed
        signed.version = self.update()["next_prod_targets_versions"][""]
        return signed.to_dict()

    def root_signatures(self, *keys: ArchiveKey) -> dict[str, Any]:
        """Each key's half for each channel signs that channel's staged root."""
        staged = self.staged()
        return {
            "roots": {c.value: [_signed(staged[c], key.half(c)) for key in keys] for c in Channel}
        }

    def targets_signatures(self, *pairs: KeyPair) -> dict[str, Any]:
        md = Metadata[Targets].from_dict(copy.deepcopy(self.update()["prod_targets"][VIEW]))
        return {"prod_targets": {VIEW: [_signed(md, pair) for pair in pairs]}}

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.ok("POST", "/signatures", json=payload)

    def served_root(self, channel: Channel) -> Metadata[Root]:
        response = self.factory.request("GET", f"/repo/{channel.value}/metadata/root.json")
        assert response.status_code == 200, response.text
        return Metadata[Root].from_bytes(response.content)

    def online_keyids(self) -> dict[str, dict[str, str]]:
        """Channel -> role -> key id of the online keys in force."""
        found: dict[str, dict[str, str]] = {c.value: {} for c in Channel}
        for key in self.factory.request("GET").json()["online_keys"]:
            found[key["channel"]][key["role"]] = key["keyid"]
        return found


@pytest.fixture
def owner(factory: Factory) -> Owner:
    return Owner.of(factory)


def refused_without_change(
    owner: Owner,
    request: Callable[[], httpx.Response],
    status: int,
    code: str,
    message: str,
) -> None:
    """`request()` is refused with `status`/`code`, naming `message`, and changes nothing."""
    before = owner.server_dump
    response = request()
    assert_error(response, status, code, message)
    assert owner.server_dump == before, f"the refused request changed the database: {message}"


# -- one open update per factory ---------------------------------------------------------


@sqlite_only
def test_second_init_is_a_conflict(owner: Owner) -> None:
    opened = owner.init("first")
    assert opened["message"] == "first"
    for channel in Channel:
        assert opened["staged"][channel.value]["signed"]["version"] == 2
        assert opened["staged"][channel.value]["signatures"] == []
    refused_without_change(
        owner,
        lambda: owner.call("POST", json={"message": "second"}),
        409,
        "conflict",
        "a root update is already open ('first')",
    )
    assert owner.update()["message"] == "first"


# -- staged roots that break a rule ------------------------------------------------------


Change = Callable[[StagedRoots], None]


def _both(change: Callable[[Root], None]) -> Change:
    def apply(staged: StagedRoots) -> None:
        for root in staged.roots.values():
            change(root)

    return apply


def _prod(change: Callable[[Root], None]) -> Change:
    def apply(staged: StagedRoots) -> None:
        change(staged.roots[Channel.PROD])

    return apply


def _ci(change: Callable[[Root], None]) -> Change:
    def apply(staged: StagedRoots) -> None:
        change(staged.roots[Channel.CI])

    return apply


def _replace_online_key(role: str, online: dict[str, dict[str, str]]) -> Change:
    """Each channel's online `role` key replaced by a key the server does not hold."""

    def apply(staged: StagedRoots) -> None:
        for channel, root in staged.roots.items():
            root.revoke_key(online[channel.value][role], role)
            root.add_key(KeyPair.generate().public, role)

    return apply


def _unsupported_key() -> SSlibKey:
    # A real RSA key, but with PKCS#1 v1.5 signatures, which python-tuf knows and tufa
    # does not accept.
    signer = CryptoSigner.generate_rsa(scheme="rsa-pkcs1v15-sha256", size=2048)
    key = signer.public_key
    assert isinstance(key, SSlibKey)
    return key


def _later(root: Root) -> None:
    root.expires += timedelta(days=1)


def _set_threshold(role: str, threshold: int) -> Callable[[Root], None]:
    def change(root: Root) -> None:
        root.roles[role].threshold = threshold

    return change


def _version(root: Root) -> None:
    root.version += 1


def _expired(root: Root) -> None:
    root.expires -= timedelta(days=2 * 366)


def _inconsistent(root: Root) -> None:
    root.consistent_snapshot = False


def _ci_root_key_in_prod(staged: StagedRoots) -> None:
    """The production root trusts the CI half of the root key instead of its own half:
    what a factory created before the channels were separated has."""
    ((ci, prod),) = staged.pairs.items()
    prod_root = staged.roots[Channel.PROD]
    prod_root.revoke_key(prod, ROOT)
    prod_root.add_key(staged.roots[Channel.CI].keys[ci], ROOT)
    staged.pairs[ci] = ci


def _alias_of_the_ci_root_key_in_prod(staged: StagedRoots) -> None:
    """The production root trusts the CI half too, written in upper-case hex: the same
    public key under another, correctly computed, key id."""
    ((ci, prod),) = staged.pairs.items()
    key = staged.roots[Channel.CI].keys[ci]
    written_otherwise = {"public": key.keyval["public"].upper()}
    unnamed = SSlibKey("", key.keytype, key.scheme, written_otherwise)
    alias = SSlibKey(computed_keyid(unnamed), key.keytype, key.scheme, written_otherwise)
    prod_root = staged.roots[Channel.PROD]
    prod_root.revoke_key(prod, ROOT)
    prod_root.add_key(alias, ROOT)
    staged.pairs[ci] = alias.keyid


def _offline_targets_key_as_root_key(staged: StagedRoots) -> None:
    """The owner's offline targets key, in both roots' targets role, made the root key of
    both channels too."""
    ci_root, prod_root = staged.roots[Channel.CI], staged.roots[Channel.PROD]
    # The CI root's only targets key that the production root lists too.
    (offline,) = [k for k in ci_root.roles[TARGETS].keyids if k in prod_root.keys]
    for ci in list(staged.pairs):
        staged.remove_root_key(ci)
    staged.add_root_key(ci_root.keys[offline], ci_root.keys[offline])


def _root_key_without_its_pair(staged: StagedRoots) -> None:
    staged.roots[Channel.CI].add_key(KeyPair.generate().public, ROOT)


def _root_thresholds_differ(staged: StagedRoots) -> None:
    second = generate_root_key()
    staged.add_root_key(second.ci.public, second.prod.public)
    staged.roots[Channel.CI].roles[ROOT].threshold = 2


# id -> (change given the online key ids, rule the error must name)
BREACHES: dict[str, tuple[Callable[[dict[str, dict[str, str]]], Change], str]] = {
    "version-not-current-plus-1": (
        lambda _: _both(_version),
        "ci root: version must be 2 (current + 1), not 3",
    ),
    "prod-expiry-differs-from-ci": (
        lambda _: _prod(_later),
        "the CI and production roots must have the same version and expiry",
    ),
    "prod-has-an-extra-targets-key": (
        lambda _: _prod(lambda prod: prod.add_key(KeyPair.generate().public, TARGETS)),
        "the CI and production roots must list the same offline targets keys",
    ),
    "prod-targets-threshold-1": (
        lambda _: _prod(_set_threshold(TARGETS, 1)),
        "prod root: the targets threshold must be at least 2",
    ),
    "ci-targets-threshold-2": (
        lambda _: _ci(_set_threshold(TARGETS, 2)),
        "ci root: the targets threshold must be 1",
    ),
    "online-targets-key-removed": (
        lambda online: _replace_online_key(TARGETS, online),
        "may not be removed",
    ),
    "snapshot-key-replaced-by-offline-key": (
        lambda online: _replace_online_key(SNAPSHOT, online),
        "the snapshot role must list exactly the server's online snapshot key",
    ),
    "timestamp-key-replaced-by-offline-key": (
        lambda online: _replace_online_key(TIMESTAMP, online),
        "the timestamp role must list exactly the server's online timestamp key",
    ),
    "root-threshold-above-key-count": (
        lambda _: _both(_set_threshold(ROOT, 2)),
        "ci root: root threshold 2 cannot be met by its 1 key(s)",
    ),
    "unsupported-key-type": (
        lambda _: _both(lambda root: root.add_key(_unsupported_key(), TARGETS)),
        "is rsa/rsa-pkcs1v15-sha256; supported are ed25519, ecdsa-sha2-nistp256",
    ),
    "online-key-as-root-key": (
        lambda online: _ci(lambda root: root.roles[ROOT].keyids.append(online["ci"][TARGETS])),
        "an online key cannot be a root key",
    ),
    "expired-root": (lambda _: _both(_expired), "expires in the past"),
    "consistent-snapshot-off": (
        lambda _: _both(_inconsistent),
        "consistent_snapshot must stay on",
    ),
    # The channels must not be able to stand in for each other (ADR 0009).
    "channels-share-a-root-key": (
        lambda _: _ci_root_key_in_prod,
        "the CI and production roots share key",
    ),
    "root-key-without-its-pair": (
        lambda _: _root_key_without_its_pair,
        "every root key must be a pair",
    ),
    "root-thresholds-differ": (
        lambda _: _root_thresholds_differ,
        "the CI and production roots must have the same root threshold",
    ),
    "alias-of-the-ci-root-key-in-prod": (
        lambda _: _alias_of_the_ci_root_key_in_prod,
        "is not written as python-tuf writes that public key",
    ),
    "offline-targets-key-as-root-key": (
        lambda _: _offline_targets_key_as_root_key,
        "is both a root key and an offline targets key",
    ),
}


@sqlite_only
@pytest.mark.parametrize("breach", list(BREACHES))
def test_staged_roots_breaking_a_rule_are_refused(owner: Owner, breach: str) -> None:
    make_change, rule = BREACHES[breach]
    owner.init()
    staged_before = owner.update()["staged"]
    change = make_change(owner.online_keyids())
    refused_without_change(owner, lambda: owner.stage(change), 400, "rule_violated", rule)
    assert owner.update()["staged"] == staged_before


@sqlite_only
def test_an_unchanged_stage_is_accepted(owner: Owner) -> None:
    """Control for the refusals above: the same request without the breach is fine."""
    owner.init()
    response = owner.stage(lambda _staged: None)
    assert response.status_code == 200, response.text


@sqlite_only
def test_the_halves_of_a_root_key_stay_together(owner: Owner) -> None:
    """Which production half goes with which CI half is not signed: a root key in force
    cannot be paired otherwise, and any change of the staged pairs drops the signatures
    collected so far."""
    owner.init("two new root keys")
    first, second = generate_root_key(), generate_root_key()

    def add_both(staged: StagedRoots) -> None:
        for key in (first, second):
            staged.add_root_key(key.ci.public, key.prod.public)

    assert owner.stage(add_both).is_success
    mine = owner.root_key

    def repaired(staged: StagedRoots) -> None:
        staged.pairs[mine.ci.keyid] = first.prod.keyid
        staged.pairs[first.ci.keyid] = mine.prod.keyid

    refused_without_change(
        owner,
        lambda: owner.stage(repaired),
        400,
        "rule_violated",
        "the two halves of a root key never change",
    )

    owner.sign(owner.root_signatures(mine))
    assert owner.update()["status"]["ci"]["old_root"]["signed"] == [mine.ci.keyid]

    def swapped(staged: StagedRoots) -> None:
        staged.pairs[first.ci.keyid] = second.prod.keyid
        staged.pairs[second.ci.keyid] = first.prod.keyid

    assert owner.stage(swapped).is_success
    for channel in Channel:
        assert owner.update()["status"][channel.value]["old_root"]["signed"] == []


# -- signatures that may not count -------------------------------------------------------


@sqlite_only
def test_signature_by_a_key_outside_the_root_role_is_refused(owner: Owner) -> None:
    owner.init()
    # The offline targets key is in both roots, but not in the root role.
    payload = owner.root_signatures(ArchiveKey.shared(TARGETS, "targets", owner.targets_key))
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json=payload),
        400,
        "bad_request",
        f"key {owner.targets_key.keyid} is not a root key of the current or the staged ci root",
    )
    # Nor may a root key sign the re-signed production targets.
    assert owner.stage(lambda _staged: None, {VIEW: owner.resigned_targets()}).is_success
    payload = owner.targets_signatures(owner.root_key.prod)
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json=payload),
        400,
        "bad_request",
        f"key {owner.root_key.prod.keyid} is not a targets key of the staged production root",
    )
    # A key that no root knows at all.
    stranger = generate_root_key()
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json=owner.root_signatures(stranger)),
        400,
        "bad_request",
        f"key {stranger.ci.keyid} is not a root key",
    )
    # The other channel's half of the owner's own root key: a genuine root key, of the
    # wrong channel (its signature would let one channel's root pass for the other's).
    staged = owner.staged()
    misplaced = {"roots": {"ci": [_signed(staged[Channel.CI], owner.root_key.prod)]}}
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json=misplaced),
        400,
        "bad_request",
        f"key {owner.root_key.prod.keyid} is not a root key of the current or the staged ci root",
    )


@sqlite_only
def test_signature_that_does_not_verify_is_refused(owner: Owner) -> None:
    owner.init()
    staged = owner.staged()[Channel.CI]
    # The right key over the wrong bytes: the current root, not the staged one.
    wrong = owner.root_key.ci.signer().sign(owner.served_root(Channel.CI).signed_bytes)
    assert wrong.keyid == owner.root_key.ci.keyid
    payload = {"roots": {"ci": [wrong.to_dict()]}}
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json=payload),
        400,
        "bad_request",
        f"the signature by key {owner.root_key.ci.keyid} does not verify over the staged ci root",
    )
    # Garbage in the signature field.
    garbled = Signature(owner.root_key.prod.keyid, "00" * 64).to_dict()
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json={"roots": {"prod": [garbled]}}),
        400,
        "bad_request",
        "does not verify over the staged prod root",
    )
    # A valid signature by the right key over the staged targets, filed under prod root.
    assert owner.stage(lambda _staged: None, {VIEW: owner.resigned_targets()}).is_success
    misfiled = owner.targets_key.signer().sign(staged.signed_bytes).to_dict()
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/signatures", json={"prod_targets": {VIEW: [misfiled]}}),
        400,
        "bad_request",
        "does not verify over the staged targets",
    )


# -- apply: thresholds of the old and the new root ----------------------------------------


def _rotate_root_key(owner: Owner) -> ArchiveKey:
    new = generate_root_key()

    def change(staged: StagedRoots) -> None:
        staged.add_root_key(new.ci.public, new.prod.public)
        staged.remove_root_key(owner.root_key.ci.keyid)

    assert owner.stage(change).is_success
    return new


@pytest.mark.parametrize("signer", ["only-new-key", "only-old-key"])
def test_apply_needs_the_old_and_the_new_root_threshold(owner: Owner, signer: str) -> None:
    owner.init("rotate root")
    new = _rotate_root_key(owner)
    first, second = (new, owner.root_key) if signer == "only-new-key" else (owner.root_key, new)
    owner.sign(owner.root_signatures(first))
    missing = (
        "1 more signature(s) by keys of the current root and 0 by keys of the new root"
        if signer == "only-new-key"
        else "0 more signature(s) by keys of the current root and 1 by keys of the new root"
    )
    refused_without_change(
        owner, lambda: owner.call("POST", "/apply"), 400, "not_signed", f"ci root needs {missing}"
    )
    for channel in Channel:
        assert owner.served_root(channel).signed.version == 1

    # The missing signature completes it.
    owner.sign(owner.root_signatures(second))
    assert owner.ok("POST", "/apply") == {"root_version": 2}
    for channel in Channel:
        served = owner.served_root(channel)
        assert served.signed.version == 2
        assert served.signed.roles[ROOT].keyids == [new.half(channel).keyid]
        assert set(served.signatures) == {
            owner.root_key.half(channel).keyid,
            new.half(channel).keyid,
        }


@sqlite_only
def test_one_key_signing_twice_counts_once(owner: Owner) -> None:
    owner.init("second root key, threshold 2")
    second = generate_root_key()

    def change(staged: StagedRoots) -> None:
        staged.add_root_key(second.ci.public, second.prod.public)
        staged.set_threshold(ROOT, 2)

    assert owner.stage(change).is_success
    staged = owner.staged()
    twice = {
        "roots": {c.value: [_signed(staged[c], owner.root_key.half(c))] * 2 for c in Channel},
    }
    after = owner.sign(twice)
    owner.sign(owner.root_signatures(owner.root_key))  # and once more, in another request
    for channel in Channel:
        status = after["status"][channel.value]["new_root"]
        assert status["signed"] == [owner.root_key.half(channel).keyid]
        assert status["missing"] == 1
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/apply"),
        400,
        "not_signed",
        "0 more signature(s) by keys of the current root and 1 by keys of the new root",
    )
    owner.sign(owner.root_signatures(second))
    assert owner.ok("POST", "/apply") == {"root_version": 2}


@sqlite_only
def test_one_key_under_two_key_ids_counts_once(owner: Owner) -> None:
    """The same public key listed again under an invented key id is still one key.

    TUF requires key ids to be the hash of the key: otherwise one private key meets a
    threshold of 2, and python-tuf (like ngclient) counts signatures by key id.
    """
    owner.init("sneaky second root key")
    aliases = {}
    for channel in Channel:
        key = owner.root_key.half(channel).public
        aliases[channel] = SSlibKey(
            f"{'ab' if channel is Channel.CI else 'cd'}" * 32,
            key.keytype,
            key.scheme,
            dict(key.keyval),
        )

    def change(staged: StagedRoots) -> None:
        staged.add_root_key(aliases[Channel.CI], aliases[Channel.PROD])
        staged.set_threshold(ROOT, 2)

    before = owner.server_dump
    staged = owner.stage(change)
    if staged.is_success:
        signed = owner.staged()
        sigs: dict[str, Any] = {"roots": {}}
        for channel in Channel:
            sig = owner.root_key.half(channel).signer().sign(signed[channel].signed_bytes)
            sigs["roots"][channel.value] = [
                sig.to_dict(),
                Signature(aliases[channel].keyid, sig.signature).to_dict(),
            ]
        owner.call("POST", "/signatures", json=sigs)
        before = owner.server_dump
        applied = owner.call("POST", "/apply")
    else:
        applied = staged
    assert applied.status_code == 400, applied.text
    assert "key id" in applied.json()["error"]["message"]
    assert owner.server_dump == before
    assert owner.served_root(Channel.CI).signed.version == 1


# -- production targets: re-signed, never changed -----------------------------------------


@sqlite_only
def test_resigned_production_targets_must_list_the_current_targets(owner: Owner) -> None:
    owner.init("sneak a release through a key update")
    sneaky = owner.resigned_targets()
    evil = TargetFile.from_data("evil-firmware.bin", b"not what the owner signed")
    sneaky["targets"] = {evil.path: evil.to_dict()}
    refused_without_change(
        owner,
        lambda: owner.stage(lambda _staged: None, {VIEW: sneaky}),
        400,
        "rule_violated",
        "re-signed production targets must list exactly the current production targets",
    )
    wrong_version = owner.resigned_targets()
    wrong_version["version"] += 1
    refused_without_change(
        owner,
        lambda: owner.stage(lambda _staged: None, {VIEW: wrong_version}),
        400,
        "rule_violated",
        "re-signed production targets must have version 2",
    )
    refused_without_change(
        owner,
        lambda: owner.stage(lambda _staged: None, {"no-such-view": owner.resigned_targets()}),
        400,
        "bad_request",
        "there are no production targets for view 'no-such-view'",
    )
    # Unchanged content as the next version is what a key command stages.
    assert owner.stage(lambda _staged: None, {VIEW: owner.resigned_targets()}).is_success


# -- apply is all or nothing -------------------------------------------------------------


def test_refused_apply_changes_nothing_and_the_fixed_one_changes_everything(
    owner: Owner,
) -> None:
    owner.init("rotate every online key")
    online_before = owner.online_keyids()
    pending = owner.ok("POST", "/online-keys", json={"roles": [TARGETS, SNAPSHOT, TIMESTAMP]})[
        "pending_online_keys"
    ]
    for channel in Channel:
        assert set(pending[channel.value]) == {TARGETS, SNAPSHOT, TIMESTAMP}
        assert not set(pending[channel.value].values()) & set(online_before[channel.value].values())
    assert not set(pending["ci"].values()) & set(pending["prod"].values())
    owner.sign(owner.root_signatures(owner.root_key))
    versions = {c: owner.factory.request("GET").json()["channels"][c.value] for c in Channel}

    # The current production targets are not signed by the new online targets key, so the
    # new production root would not accept them: the update must carry re-signed targets.
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/apply"),
        400,
        "rule_violated",
        "the current production targets would not verify under the new production root",
    )
    # Staged, but without the offline targets signature: still refused, still no change.
    assert owner.stage(lambda _staged: None, {VIEW: owner.resigned_targets()}).is_success
    owner.sign(owner.root_signatures(owner.root_key))  # the roots did not change: kept
    refused_without_change(
        owner,
        lambda: owner.call("POST", "/apply"),
        400,
        "not_signed",
        "the re-signed production targets need 1 more offline targets signature(s)",
    )
    assert owner.online_keyids() == online_before
    assert owner.update()["pending_online_keys"] == pending
    assert {
        c: owner.factory.request("GET").json()["channels"][c.value] for c in Channel
    } == versions

    owner.sign(owner.targets_signatures(owner.targets_key))
    assert owner.ok("POST", "/apply") == {"root_version": 2}
    assert owner.online_keyids() == pending
    for channel in Channel:
        root = owner.served_root(channel).signed
        for role in (TARGETS, SNAPSHOT, TIMESTAMP):
            assert pending[channel.value][role] in root.roles[role].keyids
            assert online_before[channel.value][role] not in root.keys
    prod_targets = owner.current_prod_targets()
    assert prod_targets.signed.version == 2
    assert set(prod_targets.signatures) == {pending["prod"][TARGETS], owner.targets_key.keyid}
    assert owner.call("GET").status_code == 404


def test_cancel_removes_the_update_and_its_pending_online_keys(owner: Owner) -> None:
    before = owner.server_dump
    owner.init("rotate and give up")
    owner.ok("POST", "/online-keys", json={"roles": [TARGETS, SNAPSHOT, TIMESTAMP]})
    # Rotating again replaces the pending keys; cancel must drop every one of them.
    owner.ok("POST", "/online-keys", json={"roles": [SNAPSHOT]})
    owner.sign(owner.root_signatures(owner.root_key))
    assert owner.server_dump["online_keys"] != before["online_keys"]
    assert owner.ok("DELETE") == {"cancelled": True}
    assert owner.server_dump == before
    assert_error(owner.call("GET"), 404, "not_found", "no root update is open")
    assert_error(owner.call("POST", "/apply"), 404, "not_found", "no root update is open")
    owner.init("a new one may start")


# -- who may call these endpoints ----------------------------------------------------------


ENDPOINTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "init": ("POST", "", {"message": "not yours"}),
    "show": ("GET", "", None),
    "stage": ("PUT", "/staged", None),  # body: the staged roots, filled in by the test
    "online-keys": ("POST", "/online-keys", {"roles": [TARGETS]}),
    "signatures": ("POST", "/signatures", None),  # body: valid root signatures
    "apply": ("POST", "/apply", None),
    "cancel": ("DELETE", "", None),
}
SCOPE_CALLERS = ("ci", "read", "register")


def _valid_bodies(owner: Owner) -> dict[str, dict[str, Any] | None]:
    staged = owner.staged()
    bodies = {name: body for name, (_, _, body) in ENDPOINTS.items()}
    bodies["stage"] = {"roots": {c.value: staged[c].signed.to_dict() for c in Channel}}
    bodies["signatures"] = owner.root_signatures(owner.root_key)
    return bodies


@sqlite_only
def test_every_endpoint_needs_the_admin_scope_of_this_factory(owner: Owner) -> None:
    owner.init("open, so that every endpoint would otherwise succeed")
    owner.sign(owner.root_signatures(owner.root_key))  # apply would go through
    bodies = _valid_bodies(owner)
    other = create_factory(owner.factory.server)
    callers: dict[str, tuple[str, str, str]] = {
        scope: (owner.factory.token(scope), owner.factory.name, "lacks the scope")
        for scope in SCOPE_CALLERS
    }
    device = owner.factory.register_device("prod")["credential"]
    callers["device"] = (device, owner.factory.name, "device credentials")
    callers["other-factory-admin"] = (other.admin_token, owner.factory.name, "not valid for")
    # An admin token used on a factory it does not belong to, one that does not exist.
    callers["unknown-factory"] = (owner.factory.admin_token, "no-such-factory", "not valid for")
    before = owner.server_dump
    for caller, (token, name, why) in callers.items():
        for endpoint, (method, suffix, _) in ENDPOINTS.items():
            body = bodies[endpoint]
            path = f"/api/v1/factories/{name}{UPDATES}{suffix}"
            kwargs: dict[str, Any] = {} if body is None else {"json": body}
            response = send(owner.factory.server, method, path, token, **kwargs)
            assert response.status_code == 403, f"{endpoint} as {caller}: {response.text}"
            assert_error(response, 403, "forbidden", why)
    assert owner.server_dump == before
    # And the admin may: the open update is intact and applies.
    assert owner.ok("POST", "/apply") == {"root_version": 2}


@sqlite_only
def test_without_a_token_every_endpoint_is_unauthorized(owner: Owner) -> None:
    owner.init()
    bodies = _valid_bodies(owner)
    before = owner.server_dump
    for endpoint, (method, suffix, _) in ENDPOINTS.items():
        body = bodies[endpoint]
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        response = owner.call(method, suffix, token="", **kwargs)
        assert_error(response, 401, "unauthorized", "needs a token")
    assert owner.server_dump == before


@sqlite_only
def test_authorisation_comes_before_body_validation(owner: Owner) -> None:
    owner.init()
    read_token = owner.factory.token("read")
    before = owner.server_dump
    wrong = []
    for endpoint, (method, suffix, _) in ENDPOINTS.items():
        response = owner.call(method, suffix, token=read_token, json={})
        if response.status_code != 403:
            wrong.append(f"{endpoint}: {response.status_code} {response.text}")
        response = owner.call(method, suffix, token="", content=b"not json")
        if response.status_code != 401:
            wrong.append(f"{endpoint} (anonymous): {response.status_code} {response.text}")
    assert owner.server_dump == before
    assert not wrong, "\n".join(wrong)
