"""The device-facing read path: TUF metadata at stable per-channel URLs.

`/api/v1/factories/{factory}/repo/{channel}/metadata/` is a metadata base URL any TUF
client can use with consistent snapshots: `N.root.json`, `timestamp.json`,
`N.snapshot.json`, `N.targets.json` (plus `root.json` for the newest root). Bytes come
straight from storage with their ETag; versioned files are immutable and cacheable.

`timestamp.json?tag=T` on the production channel, and `?hardware_id=H&tag=T` on CI, give
a token holder the timestamp a device of that view is served (what `tufa targets
offline-update` bundles).

Target files are served only from blobs the factory uploaded itself; a production device
gets only the targets its own view lists (its tag's release, or its wave), token holders
any released target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from tufa.core import api_paths
from tufa.core.metadata import ROOT, TARGETS, TIMESTAMP, Channel
from tufa.server.api.common import resource, state_of, threaded
from tufa.server.auth import bearer_secret, forbidden, require_factory, unauthorized
from tufa.server.credentials import settle
from tufa.server.db import blob_owners, factories, targets
from tufa.server.errors import bad_request, not_found
from tufa.server.principals import Principal, Scope, authenticate
from tufa.server.publishing import LABEL
from tufa.server.repository import DEFAULT_VIEW
from tufa.server.secrets import secret_digest
from tufa.server.state import ServerState
from tufa.server.stored_files import StoredFile
from tufa.server.views import ci_view, tag_view

VERSIONED = re.compile(r"^([1-9][0-9]{0,9})\.(root|snapshot|targets)\.json$")
LATEST = {"timestamp.json": TIMESTAMP, "root.json": ROOT}
IMMUTABLE = "max-age=31536000, immutable"
READERS = {Scope.ADMIN, Scope.CI, Scope.READ}
# A target of the factory, and whether the factory owns the file it names (external
# targets own none: they are downloaded from their URL).
_TARGET_BY_NAME = (
    select(targets.c.url, targets.c.released_at, blob_owners.c.sha256.label("owned"))
    .select_from(
        targets.outerjoin(
            blob_owners,
            (blob_owners.c.factory_id == targets.c.factory_id)
            & (blob_owners.c.sha256 == targets.c.sha256),
        )
    )
    .where(
        targets.c.factory_id == bindparam("factory_id"),
        targets.c.name == bindparam("name"),
        targets.c.sha256 == bindparam("sha256"),
    )
)
# With the generations the poll cache's entries are read at (poll_cache.py).
_FACTORY_BY_NAME = select(
    factories.c.id,
    factories.c.anonymous_read,
    factories.c.auth_generation,
    factories.c.metadata_generation,
).where(factories.c.name == bindparam("name"))


def version_of(filename: str) -> int | None:
    match = VERSIONED.match(filename)
    return int(match.group(1)) if match else None


def _channel(name: str) -> Channel:
    try:
        return Channel(name)
    except ValueError:
        raise not_found(f"unknown channel {name!r}: use 'ci' or 'prod'") from None


def parse_filename(filename: str) -> tuple[str, int | None] | None:
    """The role and version (None: the newest) a metadata filename names, if any."""
    match = VERSIONED.match(filename)
    if match:
        return match.group(2), int(match.group(1))
    if filename in LATEST:
        return LATEST[filename], None
    return None


def _parse_filename(filename: str) -> tuple[str, int | None]:
    parsed = parse_filename(filename)
    if parsed is None:
        raise not_found(f"{filename!r} is not a TUF metadata file of this repository")
    return parsed


@dataclass(frozen=True)
class _Reader:
    """The factory row a caller may read a channel of, and what it is served."""

    factory: Any
    view: str
    device: bool  # a device credential: served its own view, whatever it asks for
    principal: Principal | None = None


def _authorize(
    state: ServerState,
    conn: Connection,
    secret: str | None,
    name: str,
    channel: Channel,
    asked: str | None = None,
) -> _Reader:
    """The factory, if the caller may read `channel` of it, and the caller's view: a
    device's own view; for a token, the view `asked` for (`_asked_view`); the channel's
    default view for everyone else."""
    # The factory first: its generations must be no newer than what is read after them.
    factory = conn.execute(_FACTORY_BY_NAME, {"name": name}).first()
    principal = None
    if secret is not None:
        now = state.settings.clock.now()
        principal = authenticate(conn, secret, now)
        # A device's first use of a rotated credential: adopted (a write, in a transaction
        # of its own) before anything is served.
        principal = settle(state.db, principal, secret, now)
    if principal is None:
        if factory is None or not factory.anonymous_read:
            raise unauthorized(f"reading factory {name!r} needs a token or device credential")
        if asked is not None:
            # Refused rather than ignored: the caller would silently take the default
            # view for what the view's devices are served.
            raise unauthorized("reading a view's timestamp (?tag=, ?hardware_id=) needs a token")
        return _Reader(factory, DEFAULT_VIEW, device=False)
    require_factory(principal, name, READERS, device_reads=True)
    if principal.kind == "device":
        if principal.channel != channel:
            raise forbidden(f"this device follows the {principal.channel} channel, not {channel}")
        return _Reader(factory, principal.view, device=True, principal=principal)
    if asked is not None:
        return _Reader(factory, asked, device=False)
    return _Reader(factory, principal.view, device=False, principal=principal)


def _asked_view(channel: Channel, params: Mapping[str, str]) -> str | None:
    """The view a token holder asks `timestamp.json` of: `?tag=` in production,
    `?hardware_id=` and `?tag=` in CI, whose devices each follow one of each."""
    asked = {field: params.get(field) for field in ("hardware_id", "tag")}
    for field, label in asked.items():
        if label is not None and not LABEL.fullmatch(label):
            raise bad_request(
                f"?{field}={label!r} is not a label: hardware ids and tags are labels such "
                "as 'rpi4' or 'main'"
            )
    hardware_id, tag = asked["hardware_id"], asked["tag"]
    if channel is Channel.PROD:
        if hardware_id is not None:
            raise bad_request(
                "?hardware_id= names a CI view: production devices of a tag are all served "
                "one view, so give only ?tag="
            )
        return None if tag is None else tag_view(tag)
    if hardware_id is None and tag is None:
        return None
    if hardware_id is None or tag is None:
        missing = "hardware_id" if hardware_id is None else "tag"
        raise bad_request(
            f"?{missing}= is missing: a CI device is served the view of its hardware id "
            "and tag, so give both"
        )
    return ci_view(hardware_id, tag)


def _lookup(
    state: ServerState,
    secret: str | None,
    name: str,
    channel: Channel,
    filename: str,
    asked: str | None = None,
) -> tuple[StoredFile, bool]:
    """Authenticate, authorise and find the file in one read transaction."""
    role, version = _parse_filename(filename)
    with state.db.read() as conn:
        reader = _authorize(state, conn, secret, name, channel, asked)
        stored = state.repo.read_file(conn, reader.factory.id, channel, role, version, reader.view)
    if stored is None:
        raise not_found(f"{filename} does not exist in the {channel} channel")
    if asked is None:
        _remember(state, reader, secret, channel, role, version, stored)
    return stored, bool(reader.factory.anonymous_read)


def _remember(
    state: ServerState,
    reader: _Reader,
    secret: str | None,
    channel: Channel,
    role: str,
    version: int | None,
    stored: StoredFile,
) -> None:
    """Keep what this poll read for the next ones (api/poll.py), with the generations
    of the factory read before it."""
    factory = reader.factory
    if reader.principal is not None and secret is not None:
        state.poll.remember_principal(
            secret_digest(secret),
            reader.principal,
            reader.principal.expires_at,
            factory.auth_generation,
        )
    if version is None:
        state.poll.remember_newest(
            factory.id, channel, reader.view, role, stored, factory.metadata_generation
        )


def _listed_in_view(
    state: ServerState, conn: Connection, factory_id: int, view: str, name: str, sha256: str
) -> bool:
    """Whether the production targets that `view` serves list target `name` with this
    SHA-256 (a view with no release yet serves the default view's, as its timestamp)."""
    stored = state.repo.read_file(conn, factory_id, Channel.PROD, TARGETS, None, view)
    assert stored is not None
    # The server's own signed bytes: plain JSON is enough to look one entry up.
    listed = json.loads(stored.body)["signed"]["targets"].get(name)
    return listed is not None and listed["hashes"].get("sha256") == sha256


def _target_blob(
    state: ServerState, secret: str | None, name: str, channel: Channel, filename: str
) -> Path:
    """The stored file behind `SHA256.NAME`, the consistent-snapshot target path.

    CI: any target the factory published. Production: for a device, a target its own
    view lists; for a token holder, any target a wave released."""
    digest, _, target = filename.partition(".")
    with state.db.read() as conn:
        reader = _authorize(state, conn, secret, name, channel)
        factory_id = reader.factory.id
        row = conn.execute(
            _TARGET_BY_NAME, {"factory_id": factory_id, "name": target, "sha256": digest}
        ).first()
        served = row is not None and (
            channel is Channel.CI
            or (
                _listed_in_view(state, conn, factory_id, reader.view, target, digest)
                if reader.device
                else row.released_at is not None
            )
        )
    # Publishing already checks that the factory owns the file; checked again here so
    # that no path serves another factory's bytes.
    if row is None or not served or (row.url is None and row.owned is None):
        raise not_found(f"{filename} is not a target of the {channel} channel of {name!r}")
    if row.url is not None:
        raise not_found(f"{target} is an external target: download it from {row.url}")
    return state.blobs.path_for(digest)


async def target_file(request: Request) -> Response:
    state = state_of(request)
    secret = bearer_secret(request.headers)
    name, channel = request.path_params["factory"], _channel(request.path_params["channel"])
    filename = request.path_params["filename"]
    path = await threaded(lambda: _target_blob(state, secret, name, channel, filename))
    # Range requests let a device resume a cut download; the content never changes.
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": f"private, {IMMUTABLE}"},
    )


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against the file's ETag."""
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


async def metadata(request: Request) -> Response:
    state = state_of(request)
    secret = bearer_secret(request.headers)
    name = request.path_params["factory"]
    channel = _channel(request.path_params["channel"])
    filename = request.path_params["filename"]
    # Only timestamp.json depends on the view; versioned files name one file in all views.
    asked = _asked_view(channel, request.query_params) if filename == "timestamp.json" else None
    stored, public = await threaded(lambda: _lookup(state, secret, name, channel, filename, asked))
    # A view's timestamp is for token holders only: no shared cache may hand it on.
    visibility = "public" if public and asked is None else "private"
    versioned = version_of(filename) is not None
    headers = {
        "ETag": stored.etag,
        "Cache-Control": f"{visibility}, {IMMUTABLE}" if versioned else f"{visibility}, no-cache",
    }
    if etag_matches(request.headers.get("if-none-match"), stored.etag):
        return Response(status_code=304, headers=headers)
    return Response(stored.body, media_type="application/json", headers=headers)


routes = [
    *resource(api_paths.TARGET_FILE, GET=target_file),
    *resource(api_paths.METADATA_FILE, GET=metadata),
]
