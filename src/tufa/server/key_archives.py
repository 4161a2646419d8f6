"""The one-time offline keys archive a factory is created with (ADR 0002).

The server keeps it, encrypted under the master key, only until its owner confirms
that the download is safely on disk; from then on no copy exists but the owner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

from tufa.core.clock import iso
from tufa.server.db import factories, key_archives
from tufa.server.exceptions import ArchiveGone, InvalidInput, NotFound
from tufa.server.factories import archive_purpose
from tufa.server.state import ServerState


@dataclass(frozen=True)
class PendingArchive:
    factory_id: int
    archive: bytes
    sha256: str


def pending_archive(state: ServerState, name: str) -> PendingArchive:
    """The archive of factory `name`, decrypted, if its download was not confirmed yet."""
    with state.db.read() as conn:
        factory = conn.execute(select(factories).where(factories.c.name == name)).first()
        if factory is None:
            raise NotFound(f"unknown factory {name!r}")
        row = conn.execute(
            select(key_archives).where(key_archives.c.factory_id == factory.id)
        ).first()
    if row is None:
        raise ArchiveGone(
            f"the offline keys archive of factory {name!r} was downloaded on "
            f"{iso(factory.archive_downloaded_at)} and deleted from the server; it has no "
            "other copy. Use the file saved then (and its backups); without it, root keys "
            "can no longer be changed."
        )
    archive = state.master_key.decrypt(row.archive_encrypted, archive_purpose(factory.id))
    return PendingArchive(factory.id, archive, row.sha256)


def confirm_download(state: ServerState, name: str, sha256: str) -> datetime:
    """Delete the archive for good once the owner shows they hold it (its SHA-256)."""
    pending = pending_archive(state, name)
    if sha256 != pending.sha256:
        raise InvalidInput(
            "sha256 does not match the archive on the server; download it again and "
            "confirm with the digest of the file you saved"
        )
    now = state.settings.clock.now()
    with state.db.write() as conn:
        conn.execute(delete(key_archives).where(key_archives.c.factory_id == pending.factory_id))
        conn.execute(
            update(factories)
            .where(factories.c.id == pending.factory_id)
            .values(archive_downloaded_at=now)
        )
    # The encrypted archive must not linger in free pages of the database file.
    state.db.purge_deleted_bytes()
    return now
