"""Server-side secrets: the master key that encrypts online private keys at rest, and
the bearer tokens and device credentials (stored only as SHA-256 of their secret)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tufa.core.files import write_private_file

_NONCE_BYTES = 12


class MasterKey:
    """AES-256-GCM over private keys and the pending offline archive.

    The associated data binds each ciphertext to what it is for (for example the key
    id), so a ciphertext copied into another row does not decrypt.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by other users; run `chmod 600 {path}`")
        return cls(path.read_bytes())

    @classmethod
    def create(cls, path: Path) -> MasterKey:
        key = AESGCM.generate_key(bit_length=256)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, key)
        return cls(key)

    def encrypt(self, data: bytes, purpose: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, purpose.encode())

    def decrypt(self, blob: bytes, purpose: str) -> bytes:
        return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], purpose.encode())


def new_secret(prefix: str) -> str:
    """A bearer secret; the prefix tells a reader what kind of credential leaked."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def secret_digest(secret: str) -> str:
    # Secrets carry 256 bits of randomness, so a fast hash cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()
