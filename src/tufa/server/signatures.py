"""Checking signatures that key holders send, with an error that says which failed."""

from __future__ import annotations

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature

from tufa.server.exceptions import InvalidInput


def verify_signature(key: Key, sig: Signature, payload: bytes, what: str) -> None:
    """Refuse a signature that does not verify; `what` names what it signs."""
    try:
        key.verify_signature(sig, payload)
    except (UnverifiedSignatureError, ValueError) as e:
        raise InvalidInput(
            f"the signature by key {sig.keyid} does not verify over the {what}"
        ) from e
