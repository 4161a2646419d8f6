"""core/archive.py: a root key is a pair of keys, one per channel; a key from before the
channels were separated is one key for both."""

from __future__ import annotations

import pytest

from tufa.core.archive import ArchiveKey, OfflineArchive, generate_root_key
from tufa.core.keys import KeyPair
from tufa.core.metadata import ROOT, TARGETS, Channel


@pytest.fixture(scope="module")
def paired() -> ArchiveKey:
    return generate_root_key()


def test_a_new_root_key_has_a_half_per_channel(paired: ArchiveKey) -> None:
    assert not paired.is_shared
    assert paired.half(Channel.CI) is paired.ci
    assert paired.half(Channel.PROD) is paired.prod
    assert paired.ci.keyid != paired.prod.keyid
    assert paired.keyid == paired.ci.keyid
    assert paired.keyids == [paired.ci.keyid, paired.prod.keyid]
    assert paired.name == f"{ROOT}-{paired.ci.keyid}"
    assert paired.halves() == [(Channel.CI, paired.ci), (Channel.PROD, paired.prod)]
    assert dict(paired.files()) == {
        f"{paired.name}.ci": paired.ci,
        f"{paired.name}.prod": paired.prod,
    }
    assert paired.label() == f"{paired.ci.keyid} (ci) / {paired.prod.keyid} (prod)"


def test_a_shared_key_is_one_key_for_both() -> None:
    pair = KeyPair.generate()
    shared = ArchiveKey.shared(ROOT, "offline-root", pair)
    assert shared.is_shared
    assert shared.keyids == [pair.keyid]
    assert shared.halves() == [(None, pair)]
    assert dict(shared.files()) == {"offline-root": pair}
    assert shared.label() == pair.keyid


def test_the_archive_finds_a_key_by_either_half(paired: ArchiveKey) -> None:
    archive = OfflineArchive(factory="acme")
    assert archive.add(paired) is paired
    assert archive.find(paired.prod.keyid) is paired
    again = ArchiveKey(ROOT, "root-other", paired.ci, KeyPair.generate())
    assert archive.add(again) is paired  # held already: the archive's entry is returned
    assert archive.keyids() == sorted(paired.keyids)
    assert archive.signers_for(Channel.PROD, ROOT, {paired.prod.keyid}) == [paired.prod]
    assert archive.signers_for(Channel.CI, ROOT, {paired.prod.keyid}) == []


def test_the_archive_holds_root_and_targets_keys_only() -> None:
    archive = OfflineArchive(factory="acme")
    targets = archive.add_key(TARGETS, KeyPair.generate())
    assert targets.is_shared
    assert targets.name == f"{TARGETS}-{targets.keyid}"
    with pytest.raises(ValueError, match="not 'snapshot'"):
        archive.add_key("snapshot", KeyPair.generate())
