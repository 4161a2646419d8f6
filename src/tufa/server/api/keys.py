"""`/api/v1/factories/{factory}/keys/archive`: the one-time offline keys archive.

Downloading is two steps so that a dropped connection cannot lose the only copy of
the first root key: GET returns the archive, and POST `.../confirm` with its SHA-256
(sent by the CLI once the file is safely on disk) deletes it from the server for good.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.server.api.common import factory_caller, ok, resource, threaded
from tufa.server.api.fields import field, json_object
from tufa.server.key_archives import confirm_download, pending_archive
from tufa.server.principals import Scope


class ConfirmedDownloadJson(TypedDict):
    deleted: Literal[True]
    downloaded_at: str


async def download(request: Request) -> Response:
    state, _ = await factory_caller(request, {Scope.ADMIN})
    name = request.path_params["factory"]
    pending = await threaded(lambda: pending_archive(state, name))
    return Response(
        pending.archive,
        media_type="application/gzip",
        headers={
            "X-Tufa-Archive-Sha256": pending.sha256,
            "Content-Disposition": f'attachment; filename="{name}-offline-keys.tgz"',
            "Cache-Control": "no-store",
        },
    )


async def confirm(request: Request) -> JSONResponse:
    state, _ = await factory_caller(request, {Scope.ADMIN})
    name = request.path_params["factory"]
    digest = field(await json_object(request), "sha256", str)
    downloaded_at = await threaded(lambda: confirm_download(state, name, digest))
    answer: ConfirmedDownloadJson = {"deleted": True, "downloaded_at": iso(downloaded_at)}
    return ok(answer)


routes = [
    *resource(api_paths.KEYS_ARCHIVE, GET=download),
    *resource(api_paths.KEYS_ARCHIVE_CONFIRM, POST=confirm),
]
