"""core/keys.py: one public key has one key id, and keys compare by what they are."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner, SSlibKey

from tufa.core.keys import (
    KeyPair,
    KeyType,
    computed_keyid,
    is_canonical,
    key_from_json,
    key_to_json,
    public_key_der,
)


def written_as(key: SSlibKey, public: str) -> SSlibKey:
    return SSlibKey(key.keyid, key.keytype, key.scheme, {"public": public})


@pytest.fixture(scope="module")
def ed25519() -> SSlibKey:
    return CryptoSigner.generate_ed25519().public_key


@pytest.fixture(scope="module")
def ecdsa() -> SSlibKey:
    return CryptoSigner.generate_ecdsa().public_key


def test_python_tuf_keys_are_canonical(ed25519: SSlibKey, ecdsa: SSlibKey) -> None:
    assert is_canonical(ed25519)
    assert is_canonical(ecdsa)
    assert computed_keyid(ed25519) == ed25519.keyid


def test_the_same_key_written_otherwise_is_not_canonical_but_is_the_same_key(
    ed25519: SSlibKey, ecdsa: SSlibKey
) -> None:
    shouting = written_as(ed25519, ed25519.keyval["public"].upper())
    rewrapped = written_as(ecdsa, ecdsa.keyval["public"].replace("\n", "\r\n"))
    for original, other in ((ed25519, shouting), (ecdsa, rewrapped)):
        assert not is_canonical(other)
        assert public_key_der(other) == public_key_der(original)


def test_different_keys_differ(ed25519: SSlibKey) -> None:
    other = CryptoSigner.generate_ed25519().public_key
    assert public_key_der(other) != public_key_der(ed25519)


@pytest.mark.parametrize("public", ["zz", "00" * 31, ""])
def test_unreadable_keys_raise_and_are_not_canonical(ed25519: SSlibKey, public: str) -> None:
    broken = written_as(ed25519, public)
    assert not is_canonical(broken)
    with pytest.raises(ValueError, match="is not a valid ed25519 public key"):
        public_key_der(broken)


def test_key_json_round_trip(ecdsa: SSlibKey) -> None:
    assert key_from_json(key_to_json(ecdsa)) == ecdsa


def test_key_pair_from_pem_refuses_another_public_key() -> None:
    pair, other = KeyPair.generate(KeyType.ED25519), KeyPair.generate(KeyType.ED25519)
    assert KeyPair.from_pem(pair.private_pem, pair.public) == pair
    with pytest.raises(ValueError, match="does not match public key"):
        KeyPair.from_pem(pair.private_pem, other.public)
