"""The content-addressed blob store that holds uploaded target files.

A blob lives at `ROOT/sha256/ab/abcdef...`, named by its SHA-256, so the same file
uploaded by two factories or twice is stored once, and a stored blob never changes.
Uploads stream to a temporary file beside the final one, hashed on the way; only a
complete upload whose hash and length match is renamed into place (atomically), so a
cut connection or a wrong hash never leaves a partial blob behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from tufa.server.errors import ApiError, bad_request

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        if not SHA256_PATTERN.fullmatch(sha256):
            raise bad_request(f"{sha256!r} is not a lowercase hex SHA-256")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    async def put(
        self, chunks: AsyncIterator[bytes], sha256: str, length: int, max_bytes: int
    ) -> bool:
        """Store the streamed bytes as blob `sha256`; False if it was already stored."""
        final = self.path_for(sha256)
        if length > max_bytes:
            raise ApiError(413, "too_large", f"blobs may be at most {max_bytes} bytes")
        if final.is_file():
            async for _ in chunks:  # drain the request so the client sees the answer
                pass
            return False
        incoming = self.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = incoming / f"{sha256}.{secrets.token_hex(4)}.part"
        digest = hashlib.sha256()
        received = 0
        try:
            with tmp.open("wb") as f:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > length:
                        raise bad_request(f"the upload is longer than the declared {length} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if received != length:
                raise bad_request(f"the upload has {received} bytes, not the declared {length}")
            if digest.hexdigest() != sha256:
                raise bad_request(
                    f"the uploaded bytes have SHA-256 {digest.hexdigest()}, not {sha256}"
                )
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return True
