"""The device-facing read path: TUF metadata at stable per-channel URLs.

`/api/v1/factories/{factory}/repo/{channel}/metadata/` is a metadata base URL any TUF
client can use with consistent snapshots: `N.root.json`, `timestamp.json`,
`N.snapshot.json`, `N.targets.json` (plus `root.json` for the newest root). Bytes come
straight from storage with their ETag; versioned files are immutable and cacheable.

`timestamp.json?tag=T` on the production channel gives a token holder the timestamp a
production device of tag T is served (what `tufa targets offline-update --prod` bundles).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tufa.core.metadata import ROOT, TIMESTAMP, Channel
from tufa.server.api.common import threaded
from tufa.server.auth import (
    Scope,
    authenticate,
    bearer_secret,
    forbidden,
    require_factory,
    unauthorized,
)
from tufa.server.credentials import settle
from tufa.server.db import factories, targets
from tufa.server.errors import bad_request, not_found
from tufa.server.publishing import LABEL
from tufa.server.repository import DEFAULT_VIEW, StoredFile
from tufa.server.state import ServerState, state_of
from tufa.server.views import tag_view

_VERSIONED = re.compile(r"^([1-9][0-9]{0,9})\.(root|snapshot|targets)\.json$")
_LATEST = {"timestamp.json": TIMESTAMP, "root.json": ROOT}
_IMMUTABLE = "max-age=31536000, immutable"
CHANNELS = frozenset(c.value for c in Channel)
READERS = {Scope.ADMIN, Scope.CI, Scope.READ}
_TARGET_BY_NAME = select(targets.c.url, targets.c.released_at).where(
    targets.c.factory_id == bindparam("factory_id"),
    targets.c.name == bindparam("name"),
    targets.c.sha256 == bindparam("sha256"),
)
_FACTORY_BY_NAME = select(factories.c.id, factories.c.anonymous_read).where(
    factories.c.name == bindparam("name")
)


def version_of(filename: str) -> int | None:
    match = _VERSIONED.match(filename)
    return int(match.group(1)) if match else None


def _parse_filename(filename: str) -> tuple[str, int | None]:
    match = _VERSIONED.match(filename)
    if match:
        return match.group(2), int(match.group(1))
    if filename in _LATEST:
        return _LATEST[filename], None
    raise not_found(f"{filename!r} is not a TUF metadata file of this repository")


def _authorize(
    state: ServerState,
    conn: Connection,
    secret: str | None,
    name: str,
    channel: str,
    tag: str | None = None,
) -> tuple[Any, str]:
    """The factory row, if the caller may read `channel` of it, and the caller's view:
    a production device's tag or wave; for a token, the production view of `tag` if one
    is asked for; the channel's default view for everyone else."""
    principal = None
    if secret is not None:
        now = state.settings.clock.now()
        principal = authenticate(conn, secret, now)
        # A device's first use of a rotated credential: adopted (a write, in a transaction
        # of its own) before anything is served.
        principal = settle(state.db, principal, secret, now)
    factory = conn.execute(_FACTORY_BY_NAME, {"name": name}).first()
    if principal is None:
        if factory is None or not factory.anonymous_read:
            raise unauthorized(f"reading factory {name!r} needs a token or device credential")
        if tag is not None:
            # Refused rather than ignored: the caller would silently take the default
            # view for what the tag's devices are served.
            raise unauthorized("reading a tag's timestamp (?tag=) needs a token")
    else:
        require_factory(principal, name, READERS, device_reads=True)
        if principal.kind == "device":
            # A device is served its own view whatever it asks for.
            if principal.channel != channel:
                raise forbidden(
                    f"this device follows the {principal.channel} channel, not {channel}"
                )
            return factory, principal.view
        if tag is not None and channel == Channel.PROD.value:
            if not LABEL.fullmatch(tag):
                raise bad_request(f"?tag={tag!r} is not a tag: tags are labels such as 'main'")
            # CI devices of any tag are served the default view, so only prod has tags.
            return factory, tag_view(tag)
    return factory, principal.view if principal is not None else DEFAULT_VIEW


def _lookup(
    state: ServerState,
    secret: str | None,
    name: str,
    channel: str,
    filename: str,
    tag: str | None = None,
) -> tuple[StoredFile, bool]:
    """Authenticate, authorise and find the file in one read transaction."""
    role, version = _parse_filename(filename)
    with state.db.read() as conn:
        factory, view = _authorize(state, conn, secret, name, channel, tag)
        stored = state.repo.read_file(conn, factory.id, channel, role, version, view)
    if stored is None:
        raise not_found(f"{filename} does not exist in the {channel} channel")
    return stored, bool(factory.anonymous_read)


def _target_blob(
    state: ServerState, secret: str | None, name: str, channel: str, filename: str
) -> Path:
    """The stored file behind `SHA256.NAME`, the consistent-snapshot target path."""
    digest, _, target = filename.partition(".")
    with state.db.read() as conn:
        factory, _ = _authorize(state, conn, secret, name, channel)
        row = conn.execute(
            _TARGET_BY_NAME, {"factory_id": factory.id, "name": target, "sha256": digest}
        ).first()
    if row is None or (channel == Channel.PROD.value and row.released_at is None):
        raise not_found(f"{filename} is not a target of the {channel} channel of {name!r}")
    if row.url is not None:
        raise not_found(f"{target} is an external target: download it from {row.url}")
    return state.blobs.path_for(digest)


async def target_file(request: Request) -> Response:
    state = state_of(request)
    secret = bearer_secret(request.headers.get("authorization"))
    name, channel = request.path_params["factory"], request.path_params["channel"]
    if channel not in CHANNELS:
        raise not_found(f"unknown channel {channel!r}: use 'ci' or 'prod'")
    filename = request.path_params["filename"]
    path = await threaded(lambda: _target_blob(state, secret, name, channel, filename))
    # Range requests let a device resume a cut download; the content never changes.
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": f"private, {_IMMUTABLE}"},
    )


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against the file's ETag."""
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


async def metadata(request: Request) -> Response:
    state = state_of(request)
    secret = bearer_secret(request.headers.get("authorization"))
    name = request.path_params["factory"]
    channel = request.path_params["channel"]
    if channel not in CHANNELS:
        raise not_found(f"unknown channel {channel!r}: use 'ci' or 'prod'")
    filename = request.path_params["filename"]
    # Only timestamp.json depends on the view; versioned files name one file in all views.
    tag = request.query_params.get("tag") if filename == "timestamp.json" else None
    stored, public = await threaded(lambda: _lookup(state, secret, name, channel, filename, tag))
    # A tag's timestamp is for token holders only: no shared cache may hand it on.
    visibility = "public" if public and tag is None else "private"
    versioned = version_of(filename) is not None
    headers = {
        "ETag": stored.etag,
        "Cache-Control": f"{visibility}, {_IMMUTABLE}" if versioned else f"{visibility}, no-cache",
    }
    if _matches(request.headers.get("if-none-match"), stored.etag):
        return Response(status_code=304, headers=headers)
    return Response(stored.body, media_type="application/json", headers=headers)


routes = [
    Route(
        "/api/v1/factories/{factory}/repo/{channel}/targets/{filename}",
        target_file,
        methods=["GET", "HEAD"],
    ),
    Route(
        "/api/v1/factories/{factory}/repo/{channel}/metadata/{filename}",
        metadata,
        methods=["GET", "HEAD"],
    ),
]
