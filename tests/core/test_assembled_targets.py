"""core/assembled_targets.py against the reference: python-tuf's Metadata API and
securesystemslib's canonical encoder, on random input.

A targets file joined from stored entries must be the very bytes python-tuf signs and
serialises for the same targets, and verify as python-tuf verifies; the fast canonical
encoder must give securesystemslib's bytes for any JSON value without floats.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile, Targets

from tufa.core.assembled_targets import canonical_json, encode_entry, sign_assembled
from tufa.core.metadata import build_targets, sign, to_bytes

SIGNERS = [CryptoSigner.generate_ed25519(), CryptoSigner.generate_ecdsa()]
# Every kind of text canonical JSON and JSON escape differently: quotes, backslashes,
# control characters, non-ASCII, astral characters.
TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from(['"', "\\", "\n", "\x01"]),
    max_size=12,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_canonical_json_is_securesystemslibs(value: Any) -> None:
    assert canonical_json(value) == encode_canonical(value)


def _target(name: str, length: int, custom: dict[str, Any]) -> TargetFile:
    return TargetFile(length, {"sha256": "ab" * 32}, name, {"custom": custom})


TARGETS = st.dictionaries(
    NAMES,
    st.tuples(st.integers(0, 2**40), st.dictionaries(TEXT, JSON, max_size=4)),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(TARGETS, st.integers(1, 2**31), st.sampled_from(SIGNERS))
def test_an_assembled_targets_file_is_what_python_tuf_signs(
    described: dict[str, tuple[int, dict[str, Any]]], version: int, signer: CryptoSigner
) -> None:
    expires = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    targets = {name: _target(name, length, custom) for name, (length, custom) in described.items()}
    entries = [encode_entry(target) for target in reversed(targets.values())]

    assembled = sign_assembled(version, expires, entries, [signer])

    reference = sign(build_targets(version, expires, targets), [signer])
    if signer.public_key.keytype == "ed25519":  # deterministic signatures: same bytes
        assert assembled == to_bytes(reference)
    parsed = Metadata[Targets].from_bytes(assembled)
    assert parsed.signed == reference.signed
    assert parsed.signed_bytes == reference.signed_bytes
    signer.public_key.verify_signature(
        parsed.signatures[signer.public_key.keyid], parsed.signed_bytes
    )
