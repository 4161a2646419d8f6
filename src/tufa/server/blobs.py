"""The content-addressed blob store that holds uploaded target files, and who may use them.

A blob lives at `ROOT/sha256/ab/abcdef...`, named by its SHA-256, so the same file
uploaded by two factories or twice is stored once, and a stored blob never changes.
Uploads stream to a temporary file beside the final one, hashed on the way; only a
complete upload whose hash and length match is renamed into place (atomically), so a
cut connection or a wrong hash never leaves a partial blob behind.

Storage is shared; access is not. A factory may publish and serve a blob only once it
uploaded the bytes itself (`blob_owners`). Every upload is received, hashed and written
in full, whether or not the file is stored already, so neither the answer nor its
timing tells an uploader what other factories hold (ADR 0010).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from tufa.server.db import blob_owners
from tufa.server.exceptions import InvalidInput, TooLarge
from tufa.server.sql_types import one_of

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        if not SHA256_PATTERN.fullmatch(sha256):
            raise InvalidInput(f"{sha256!r} is not a lowercase hex SHA-256")
        return self.root / "sha256" / sha256[:2] / sha256

    async def put(
        self, chunks: AsyncIterator[bytes], sha256: str, length: int, max_bytes: int
    ) -> None:
        """Receive the streamed bytes in full, check them, and store them as `sha256`.

        The same steps run when the blob is stored already (its bytes are replaced by
        identical ones), so nothing in the outcome depends on other factories' uploads.
        """
        final = self.path_for(sha256)
        if length > max_bytes:
            raise TooLarge(f"blobs may be at most {max_bytes} bytes")
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
                        raise InvalidInput(f"the upload is longer than the declared {length} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if received != length:
                raise InvalidInput(f"the upload has {received} bytes, not the declared {length}")
            if digest.hexdigest() != sha256:
                raise InvalidInput(
                    f"the uploaded bytes have SHA-256 {digest.hexdigest()}, not {sha256}"
                )
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def grant(conn: Connection, factory_id: int, sha256: str, length: int, now: datetime) -> None:
    """Record that the factory uploaded these (verified) bytes: it may use them now."""
    where = (blob_owners.c.factory_id == factory_id, blob_owners.c.sha256 == sha256)
    # The verified length wins over one recorded from an older target (migration 0007).
    if conn.execute(update(blob_owners).where(*where).values(length=length)).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(
                insert(blob_owners).values(
                    factory_id=factory_id, sha256=sha256, length=length, created_at=now
                )
            )
    except IntegrityError:
        pass  # the same factory's concurrent upload of the same bytes recorded it first


def owned_lengths(conn: Connection, factory_id: int, digests: Iterable[str]) -> dict[str, int]:
    """SHA-256 -> length of the blobs among `digests` that the factory uploaded."""
    rows = conn.execute(
        select(blob_owners.c.sha256, blob_owners.c.length).where(
            blob_owners.c.factory_id == factory_id, one_of(conn, blob_owners.c.sha256, set(digests))
        )
    ).all()
    return {row.sha256: row.length for row in rows}
