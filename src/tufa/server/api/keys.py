"""`/api/v1/factories/{factory}/keys/archive`: the one-time offline keys archive.

Downloading is two steps so that a dropped connection cannot lose the only copy of
the first root key: GET returns the archive, and POST `.../confirm` with its SHA-256
(sent by the CLI once the file is safely on disk) deletes it from the server for good.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.server.api.common import caller, ok, resource, threaded
from tufa.server.api.fields import field, json_object
from tufa.server.auth import require_factory
from tufa.server.db import factories, key_archives
from tufa.server.errors import ApiError, bad_request, not_found
from tufa.server.factories import archive_purpose
from tufa.server.principals import Scope
from tufa.server.state import ServerState


def _gone(name: str, downloaded_at: str | None) -> ApiError:
    return ApiError(
        410,
        "archive_gone",
        f"the offline keys archive of factory {name!r} was downloaded on {downloaded_at} and "
        "deleted from the server; it has no other copy. Use the file saved then (and its "
        "backups); without it, root keys can no longer be changed.",
    )


def _pending_archive(state: ServerState, name: str) -> tuple[int, bytes, str]:
    with state.db.read() as conn:
        factory = conn.execute(select(factories).where(factories.c.name == name)).first()
        if factory is None:
            raise not_found(f"unknown factory {name!r}")
        row = conn.execute(
            select(key_archives).where(key_archives.c.factory_id == factory.id)
        ).first()
    if row is None:
        raise _gone(name, iso(factory.archive_downloaded_at))
    archive = state.master_key.decrypt(row.archive_encrypted, archive_purpose(factory.id))
    return factory.id, archive, row.sha256


async def download(request: Request) -> Response:
    state, principal = await caller(request)
    name = request.path_params["factory"]
    require_factory(principal, name, {Scope.ADMIN})
    _, archive, digest = await threaded(lambda: _pending_archive(state, name))
    return Response(
        archive,
        media_type="application/gzip",
        headers={
            "X-Tufa-Archive-Sha256": digest,
            "Content-Disposition": f'attachment; filename="{name}-offline-keys.tgz"',
            "Cache-Control": "no-store",
        },
    )


async def confirm(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    name = request.path_params["factory"]
    require_factory(principal, name, {Scope.ADMIN})
    digest = field(await json_object(request), "sha256", str)

    def delete_archive() -> str | None:
        factory_id, _, expected = _pending_archive(state, name)
        if digest != expected:
            raise bad_request(
                "sha256 does not match the archive on the server; download it again and "
                "confirm with the digest of the file you saved"
            )
        now = state.settings.clock.now()
        with state.db.write() as conn:
            conn.execute(delete(key_archives).where(key_archives.c.factory_id == factory_id))
            conn.execute(
                update(factories)
                .where(factories.c.id == factory_id)
                .values(archive_downloaded_at=now)
            )
        state.db.purge_deleted_bytes()
        return iso(now)

    deleted_at = await threaded(delete_archive)
    return ok({"deleted": True, "downloaded_at": deleted_at})


routes = [
    *resource(api_paths.KEYS_ARCHIVE, GET=download),
    *resource(api_paths.KEYS_ARCHIVE_CONFIRM, POST=confirm),
]
