"""Key generation and (de)serialisation for the three key types tufa supports.

Private keys travel as PEM-encoded PKCS#8, which is what securesystemslib's
`CryptoSigner` writes and reads, so an archive's `.sec` files can be used directly
with any securesystemslib tool. Key ids are the ones python-tuf computes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Key, SSlibKey


class KeyType(StrEnum):
    """The key types a factory can use; the value is what `--key-type` accepts."""

    ED25519 = "ed25519"
    ECDSA = "ecdsa"
    RSA = "rsa"


def generate_signer(key_type: KeyType = KeyType.ED25519) -> CryptoSigner:
    """A fresh private key, with the TUF default signing scheme of its type."""
    if key_type is KeyType.ED25519:
        return CryptoSigner.generate_ed25519()
    if key_type is KeyType.ECDSA:
        return CryptoSigner.generate_ecdsa()
    return CryptoSigner.generate_rsa()


@dataclass(frozen=True)
class KeyPair:
    """A private key in PEM form with its TUF public key; what an archive stores."""

    public: SSlibKey
    private_pem: bytes

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @classmethod
    def generate(cls, key_type: KeyType = KeyType.ED25519) -> KeyPair:
        signer = generate_signer(key_type)
        return cls(public=signer.public_key, private_pem=signer.private_bytes)

    @classmethod
    def from_pem(cls, private_pem: bytes, public: SSlibKey | None = None) -> KeyPair:
        """Load a PEM private key; the public key is derived unless given (to keep its scheme)."""
        private_key = load_pem_private_key(private_pem, password=None)
        scheme = public.scheme if public is not None else None
        derived = SSlibKey.from_crypto(private_key.public_key(), scheme=scheme)
        if public is not None and (public.keyval, public.keyid) != (derived.keyval, derived.keyid):
            raise ValueError(f"private key does not match public key {public.keyid}")
        return cls(public=derived, private_pem=private_pem)

    def signer(self) -> CryptoSigner:
        private_key = load_pem_private_key(self.private_pem, password=None)
        return CryptoSigner(private_key, self.public)


def computed_keyid(key: Key) -> str:
    """The key id TUF computes for `key`: SHA-256 of its canonical JSON form."""
    canonical = encode_canonical(
        {"keytype": key.keytype, "scheme": key.scheme, "keyval": key.keyval}
    )
    assert isinstance(canonical, str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _crypto_public_key(key: Key) -> Any:
    """The `cryptography` public key `key` holds; ValueError if it holds none tufa reads."""
    public = key.keyval.get("public")
    if not isinstance(public, str):
        raise ValueError(f"key {key.keyid} has no public key in its keyval")
    try:
        if key.keytype == "ed25519":
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        return load_pem_public_key(public.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"key {key.keyid} is not a valid {key.keytype} public key: {e}") from e


def public_key_der(key: Key) -> bytes:
    """The public key itself (DER SubjectPublicKeyInfo), however its JSON writes it.

    Compare keys by this, not by their JSON: the same ed25519 key in upper-case hex, or a
    PEM key wrapped otherwise, is another `keyval` with another (correctly computed) key
    id. Raises ValueError if `key` holds no public key tufa can read.
    """
    der: bytes = _crypto_public_key(key).public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    return der


def is_canonical(key: Key) -> bool:
    """Whether `key` is written exactly as python-tuf writes that public key, so that one
    public key has one key id only."""
    try:
        rebuilt = SSlibKey.from_crypto(_crypto_public_key(key), scheme=key.scheme)
    except ValueError:
        return False
    return rebuilt.keytype == key.keytype and rebuilt.keyval == key.keyval


def key_to_json(key: Key) -> bytes:
    """The public key as the JSON object TUF puts in root.json, with its key id."""
    return json.dumps({"keyid": key.keyid, **key.to_dict()}, indent=2).encode()


def key_from_json(data: bytes | dict[str, Any]) -> SSlibKey:
    obj = json.loads(data) if isinstance(data, bytes) else dict(data)
    keyid = obj.pop("keyid")
    key = SSlibKey.from_dict(keyid, obj)
    if not isinstance(key, SSlibKey):
        raise ValueError(f"key {keyid} is not a plain public key")
    return key
