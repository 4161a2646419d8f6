"""core/root_update.py: each rule a staged pair of roots must obey, and the edits that
keep the two roots and the owner's root key pairs in step."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.metadata import Root

from tufa.core.keys import computed_keyid
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Channel, build_root
from tufa.core.root_update import (
    SEPARATE_CHANNELS_FIX,
    RootUpdateError,
    StagedRoots,
    check_staged_roots,
    pairs_from_json,
    pairs_to_json,
    root_keys_shared,
    shared_keyids,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
CI, PROD = Channel.CI, Channel.PROD


def new_key() -> SSlibKey:
    return CryptoSigner.generate_ed25519().public_key


def rewritten(key: Key, keytype: str, scheme: str, keyval: dict[str, str]) -> SSlibKey:
    """A key with the id TUF computes for what it now says."""
    draft = SSlibKey("draft", keytype, scheme, keyval)
    return SSlibKey(computed_keyid(draft), keytype, scheme, keyval)


@dataclass
class Owner:
    """A factory after ADR 0009: a root key pair, one offline targets key both channels
    list, and online keys of each channel's own."""

    root: dict[Channel, SSlibKey]
    offline: SSlibKey
    online: dict[Channel, dict[str, SSlibKey]]

    @property
    def online_keyids(self) -> dict[Channel, dict[str, str]]:
        return {c: {role: k.keyid for role, k in keys.items()} for c, keys in self.online.items()}

    @property
    def pairs(self) -> dict[str, str]:
        return {self.root[CI].keyid: self.root[PROD].keyid}

    def roots(self, version: int) -> dict[Channel, Root]:
        return {
            channel: build_root(
                version=version,
                expires=NOW + timedelta(days=365),
                root_keys=[self.root[channel]],
                root_threshold=1,
                targets_keys=[self.online[channel][TARGETS], self.offline],
                targets_threshold=1 if channel is CI else 2,
                snapshot_key=self.online[channel][SNAPSHOT],
                timestamp_key=self.online[channel][TIMESTAMP],
            )
            for channel in Channel
        }


@pytest.fixture
def owner() -> Owner:
    return Owner(
        root={c: new_key() for c in Channel},
        offline=new_key(),
        online={c: {role: new_key() for role in (TARGETS, SNAPSHOT, TIMESTAMP)} for c in Channel},
    )


def check(owner: Owner, staged: dict[Channel, Root], pairs: dict[str, str] | None = None) -> None:
    check_staged_roots(
        owner.roots(1), staged, owner.online_keyids, owner.pairs if pairs is None else pairs, NOW
    )


def refusal(owner: Owner, staged: dict[Channel, Root], pairs: dict[str, str] | None = None) -> str:
    """The message `check_staged_roots` refuses `staged` with."""
    with pytest.raises(RootUpdateError) as refused:
        check(owner, staged, pairs)
    return str(refused.value)


def test_a_well_formed_update_passes(owner: Owner) -> None:
    check(owner, owner.roots(2))


def _root_threshold_2(roots: dict[Channel, Root]) -> None:
    roots[CI].roles[ROOT].threshold = 2


def _targets_threshold_0(roots: dict[Channel, Root]) -> None:
    roots[PROD].roles[TARGETS].threshold = 0


def _no_consistent_snapshot(roots: dict[Channel, Root]) -> None:
    roots[CI].consistent_snapshot = False


def _expired(roots: dict[Channel, Root]) -> None:
    roots[PROD].expires = NOW


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_root_threshold_2, "ci root: root threshold 2 cannot be met by its 1 key(s)"),
        (_targets_threshold_0, "prod root: targets threshold 0 cannot be met by its 2 key(s)"),
        (_no_consistent_snapshot, "ci root: consistent_snapshot must stay on"),
        (_expired, "prod root: expires in the past (2026-12-01T00:00:00+00:00)"),
    ],
)
def test_channel_rules(
    owner: Owner, edit: Callable[[dict[Channel, Root]], None], message: str
) -> None:
    staged = owner.roots(2)
    edit(staged)
    assert refusal(owner, staged) == message


@pytest.mark.parametrize("version", [1, 3])
def test_version_must_be_the_next(owner: Owner, version: int) -> None:
    expected = f"ci root: version must be 2 (current + 1), not {version}"
    assert refusal(owner, owner.roots(version)) == expected


def _add_targets_key(owner: Owner, key: SSlibKey) -> dict[Channel, Root]:
    staged = owner.roots(2)
    staged[CI].add_key(key, TARGETS)
    return staged


def test_key_id_must_be_the_computed_one(owner: Owner) -> None:
    honest = new_key()
    lying = SSlibKey("ab" * 32, honest.keytype, honest.scheme, honest.keyval)
    refused = refusal(owner, _add_targets_key(owner, lying))
    assert refused.startswith(f"ci root: key id {'ab' * 32} is not the id TUF computes")


def test_scheme_must_be_supported(owner: Owner) -> None:
    ecdsa = CryptoSigner.generate_ecdsa().public_key
    key = rewritten(ecdsa, "ecdsa", "ecdsa-sha2-nistp384", ecdsa.keyval)
    refused = refusal(owner, _add_targets_key(owner, key))
    assert refused.startswith(f"ci root: key {key.keyid} is ecdsa/ecdsa-sha2-nistp384; supported")


def test_key_must_be_written_as_python_tuf_writes_it(owner: Owner) -> None:
    plain = new_key()
    shouting = rewritten(plain, "ed25519", "ed25519", {"public": plain.keyval["public"].upper()})
    refused = refusal(owner, _add_targets_key(owner, shouting))
    assert refused.startswith(f"ci root: key {shouting.keyid} is not written as python-tuf")


def test_snapshot_and_timestamp_list_exactly_the_online_key(owner: Owner) -> None:
    for role in (SNAPSHOT, TIMESTAMP):
        staged = owner.roots(2)
        staged[PROD].add_key(new_key(), role)
        expected = owner.online_keyids[PROD][role]
        assert refusal(owner, staged) == (
            f"prod root: the {role} role must list exactly the server's online {role} key "
            f"{expected}"
        )


def test_online_targets_key_stays(owner: Owner) -> None:
    staged = owner.roots(2)
    online = owner.online_keyids[CI][TARGETS]
    staged[CI].revoke_key(online, TARGETS)
    expected = f"ci root: the online targets key {online} may not be removed"
    assert refusal(owner, staged) == expected


def test_online_key_cannot_be_a_root_key(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[CI].add_key(owner.online[CI][TIMESTAMP], ROOT)
    assert refusal(owner, staged) == "ci root: an online key cannot be a root key"


def test_root_key_cannot_be_an_offline_targets_key(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[PROD].add_key(owner.root[PROD], TARGETS)
    expected = f"prod root: key {owner.root[PROD].keyid} is both a root key and an offline"
    assert refusal(owner, staged).startswith(expected)


def test_ci_targets_threshold_is_one(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[CI].roles[TARGETS].threshold = 2
    assert refusal(owner, staged).startswith("ci root: the targets threshold must be 1")


def test_prod_targets_threshold_needs_an_offline_key(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[PROD].roles[TARGETS].threshold = 1
    assert refusal(owner, staged).startswith("prod root: the targets threshold must be at least 2")


def test_channels_share_version_and_expiry(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[PROD].expires += timedelta(days=1)
    assert "must have the same version and expiry" in refusal(owner, staged)


def test_channels_share_the_root_threshold(owner: Owner) -> None:
    roots = StagedRoots(owner.roots(2), owner.pairs)
    roots.add_root_key(new_key(), new_key())
    roots.roots[CI].roles[ROOT].threshold = 2
    assert "must have the same root threshold" in refusal(owner, roots.roots, roots.pairs)


def test_channels_list_the_same_offline_targets_keys(owner: Owner) -> None:
    staged = owner.roots(2)
    staged[PROD].add_key(new_key(), TARGETS)
    assert "must list the same offline targets keys" in refusal(owner, staged)


@pytest.mark.parametrize("which", ["none", "swapped", "stranger"])
def test_every_root_key_is_a_pair(owner: Owner, which: str) -> None:
    ci, prod = owner.root[CI].keyid, owner.root[PROD].keyid
    pairs = {"none": {}, "swapped": {prod: ci}, "stranger": {ci: new_key().keyid}}[which]
    assert refusal(owner, owner.roots(2), pairs).startswith("every root key must be a pair")


def test_a_root_key_shared_by_both_channels_is_refused(owner: Owner) -> None:
    owner.root[PROD] = owner.root[CI]  # a factory from before ADR 0009
    refused = refusal(owner, owner.roots(2))
    assert refused.startswith(f"the CI and production roots share key {owner.root[CI].keyid}, ")
    assert refused.endswith(f"created before tufa separated its channels: {SEPARATE_CHANNELS_FIX}")


def test_an_online_key_shared_by_both_channels_is_refused(owner: Owner) -> None:
    owner.online[PROD][SNAPSHOT] = owner.online[CI][SNAPSHOT]
    shared = owner.online[CI][SNAPSHOT].keyid
    refused = refusal(owner, owner.roots(2))
    assert refused.startswith(f"the CI and production roots share key {shared}, ")
    assert "each channel needs online keys of its own" in refused


def test_shared_keyids_compares_keys_not_their_json(owner: Owner) -> None:
    roots = owner.roots(2)
    assert shared_keyids(roots[CI], roots[PROD], owner.online_keyids) == []
    assert not root_keys_shared(roots[CI], roots[PROD])
    ci_root = owner.root[CI]
    shouting = rewritten(
        ci_root, "ed25519", "ed25519", {"public": ci_root.keyval["public"].upper()}
    )
    roots[PROD].add_key(shouting, ROOT)
    assert shared_keyids(roots[CI], roots[PROD], owner.online_keyids) == [ci_root.keyid]
    assert root_keys_shared(roots[CI], roots[PROD])


def test_an_offline_targets_key_is_shared_only_as_a_targets_key(owner: Owner) -> None:
    roots = owner.roots(2)
    roots[PROD].add_key(owner.offline, ROOT)
    assert shared_keyids(roots[CI], roots[PROD], owner.online_keyids) == [owner.offline.keyid]


# -- StagedRoots --------------------------------------------------------------------


@pytest.fixture
def staged(owner: Owner) -> StagedRoots:
    return StagedRoots(owner.roots(2), owner.pairs)


def test_add_root_key_puts_each_half_in_its_channel(staged: StagedRoots) -> None:
    ci, prod = new_key(), new_key()
    staged.add_root_key(ci, prod)
    assert ci.keyid in staged.roots[CI].roles[ROOT].keyids
    assert ci.keyid not in staged.roots[PROD].roles[ROOT].keyids
    assert prod.keyid in staged.roots[PROD].roles[ROOT].keyids
    assert staged.pairs[ci.keyid] == prod.keyid
    assert (
        staged.root_key_pair(prod.keyid) == staged.root_key_pair(ci.keyid) == (ci.keyid, prod.keyid)
    )


def test_remove_root_key_by_either_half(owner: Owner, staged: StagedRoots) -> None:
    staged.add_root_key(new_key(), new_key())
    staged.remove_root_key(owner.root[PROD].keyid)
    assert owner.root[CI].keyid not in staged.roots[CI].roles[ROOT].keyids
    assert owner.root[PROD].keyid not in staged.roots[PROD].roles[ROOT].keyids
    assert owner.root[CI].keyid not in staged.pairs
    staged.check(owner.roots(1), owner.online_keyids, NOW)


def test_an_unknown_root_key_is_refused(staged: StagedRoots) -> None:
    with pytest.raises(RootUpdateError, match="abc is not a root key of the staged roots"):
        staged.root_key_pair("abc")


def test_targets_keys_go_into_both_roots(owner: Owner, staged: StagedRoots) -> None:
    key = new_key()
    staged.add_targets_key(key)
    assert all(key.keyid in r.roles[TARGETS].keyids for r in staged.roots.values())
    staged.remove_targets_key(owner.offline.keyid)
    assert all(owner.offline.keyid not in r.roles[TARGETS].keyids for r in staged.roots.values())
    staged.check(owner.roots(1), owner.online_keyids, NOW)


def test_thresholds_and_expiry(owner: Owner, staged: StagedRoots) -> None:
    staged.add_root_key(new_key(), new_key())
    staged.set_threshold(ROOT, 2)
    assert [r.roles[ROOT].threshold for r in staged.roots.values()] == [2, 2]
    staged.add_targets_key(new_key())
    staged.set_threshold(TARGETS, 3)
    assert staged.roots[CI].roles[TARGETS].threshold == 1  # the online key alone
    assert staged.roots[PROD].roles[TARGETS].threshold == 3
    expires = NOW + timedelta(days=30)
    staged.set_expiry(expires)
    assert [r.expires for r in staged.roots.values()] == [expires, expires]
    staged.check(owner.roots(1), owner.online_keyids, NOW)


def test_replace_online_key_touches_one_channel(owner: Owner, staged: StagedRoots) -> None:
    before = copy.deepcopy(staged.roots[CI])
    new = new_key()
    staged.replace_online_key(PROD, TIMESTAMP, owner.online_keyids[PROD][TIMESTAMP], new)
    assert staged.roots[PROD].roles[TIMESTAMP].keyids == [new.keyid]
    assert staged.roots[CI] == before
    with pytest.raises(RootUpdateError, match="the timestamp role must list exactly"):
        staged.check(owner.roots(1), owner.online_keyids, NOW)
    owner.online[PROD][TIMESTAMP] = new
    staged.check(owner.roots(1), owner.online_keyids, NOW)


# -- root key pairs as the API carries them -------------------------------------------


def test_pairs_round_trip() -> None:
    pairs = {"b": "2", "a": "1"}
    assert pairs_to_json(pairs) == [{"ci": "a", "prod": "1"}, {"ci": "b", "prod": "2"}]
    assert pairs_from_json(pairs_to_json(pairs)) == pairs


@pytest.mark.parametrize(
    "data",
    [
        {"ci": "a", "prod": "b"},
        [{"ci": "a"}],
        [{"ci": "a", "prod": 1}],
        [{"ci": "a", "prod": "b" * 129}],
    ],
)
def test_malformed_pairs_are_refused(data: object) -> None:
    with pytest.raises(ValueError, match="root key pairs must be a list of"):
        pairs_from_json(data)


def test_a_root_key_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        pairs_from_json([{"ci": "a", "prod": "b"}, {"ci": "a", "prod": "c"}])
