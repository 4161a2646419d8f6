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

from cryptography.hazmat.primitives.serialization import load_pem_private_key
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
