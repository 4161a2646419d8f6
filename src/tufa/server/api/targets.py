"""`/api/v1/factories/{factory}/blobs` and `/targets`: CI publishing and the inventory."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Literal, TypedDict

from sqlalchemy import Connection, select
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from tuf.api.metadata import Metadata, TargetFile, Targets

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.core.metadata import TARGETS, Channel
from tufa.core.selection import custom_of, hardware_ids_of, tags_of, target_version, version_key
from tufa.server import ci_views
from tufa.server.api.common import factory_caller, ok, reading, resource, threaded, writing
from tufa.server.api.fields import field, json_object
from tufa.server.blobs import grant
from tufa.server.db import targets as targets_table
from tufa.server.errors import bad_request, not_found
from tufa.server.principals import Scope
from tufa.server.publishing import CiPublisher, PublishResult, parse_target
from tufa.server.repository import DEFAULT_VIEW
from tufa.server.state import ServerState
from tufa.server.views import ci_view, tag_view

log = logging.getLogger("tufa.server")
PUBLISHERS = {Scope.ADMIN, Scope.CI}
READERS = {Scope.ADMIN, Scope.CI, Scope.READ}


class TargetJson(TypedDict):
    """A target as a channel's targets metadata lists it."""

    name: str
    # From the target's custom fields as signed, which only publishing checks.
    version: object
    hardware_ids: list[str]
    tags: list[str]
    length: int
    sha256: str | None
    url: object
    custom: dict[str, Any]


class TargetDetailJson(TypedDict):
    """A target as the server recorded it when it was published."""

    name: str
    version: str
    length: int
    sha256: str
    url: str | None
    custom: dict[str, Any]
    created_at: str
    pruned_at: str | None
    channels: list[Channel]


class StoredBlobJson(TypedDict):
    sha256: str
    length: int
    stored: Literal[True]


def _result(result: PublishResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


def target_json(target: TargetFile) -> TargetJson:
    custom = custom_of(target)
    return {
        "name": target.path,
        "version": target_version(target),
        "hardware_ids": hardware_ids_of(target),
        "tags": tags_of(target),
        "length": target.length,
        "sha256": target.hashes.get("sha256"),
        "url": custom.get("url"),
        "custom": custom,
    }


async def upload_blob(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, PUBLISHERS)
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise bad_request("blob uploads need a Content-Length header")
    sha256, length = request.path_params["sha256"], int(declared)
    try:
        await state.blobs.put(request.stream(), sha256, length, state.settings.max_blob_bytes)
    except ClientDisconnect as e:
        # The uploader went away; nothing was stored, and it is not the server's fault.
        log.info("upload of blob %s cut short by the client", sha256)
        raise bad_request("the upload was cut short; nothing was stored") from e

    def record(conn: Connection) -> None:
        grant(conn, factory_id, sha256, length, state.settings.clock.now())

    await writing(state, record)
    # The same answer whether or not any factory had these bytes before (ADR 0010).
    answer: StoredBlobJson = {"sha256": sha256, "length": length, "stored": True}
    return ok(answer, status=201)


async def add(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, PUBLISHERS)
    listed = field(await json_object(request), "targets", list)
    specs = [parse_target(item, f"targets[{i}]") for i, item in enumerate(listed)]
    result = await threaded(lambda: CiPublisher(state).add(factory_id, specs))
    return ok(_result(result), status=201 if result.added else 200)


async def check(request: Request) -> JSONResponse:
    """What publishing these targets would do, changing nothing: which would be added,
    which are already published as they are, and which files must be uploaded first."""
    state, factory_id = await factory_caller(request, PUBLISHERS)
    listed = field(await json_object(request), "targets", list)
    specs = [parse_target(item, f"targets[{i}]") for i, item in enumerate(listed)]
    result = await threaded(lambda: CiPublisher(state).check(factory_id, specs))
    return ok(dataclasses.asdict(result))


async def prune(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, PUBLISHERS)
    keep = field(await json_object(request), "keep", int)
    return ok(_result(await threaded(lambda: CiPublisher(state).prune(factory_id, keep))))


async def delete(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, PUBLISHERS)
    names = field(await json_object(request), "names", list)
    if not all(isinstance(name, str) for name in names):
        raise bad_request("field 'names' must be a list of target names (strings)")
    return ok(_result(await threaded(lambda: CiPublisher(state).delete(factory_id, names))))


def _listed(
    state: ServerState,
    conn: Connection,
    factory_id: int,
    channel: Channel,
    view: str = DEFAULT_VIEW,
    version: str | None = None,
) -> dict[str, TargetFile]:
    """The targets `channel` lists (in `view`), by name; in CI only those of build
    `version` if given, read by the index on it rather than the whole channel."""
    if channel is Channel.CI:
        shown = None if view == DEFAULT_VIEW else view
        return ci_views.listed(conn, factory_id, view=shown, version=version)
    stored = state.repo.read_file(conn, factory_id, channel, TARGETS, None, view)
    assert stored is not None
    targets: dict[str, TargetFile] = Metadata[Targets].from_bytes(stored.body).signed.targets
    return targets


async def list_all(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, READERS)
    channel_name = request.query_params.get("channel", Channel.CI)
    if channel_name not in set(Channel):
        raise bad_request("'channel' must be 'ci' or 'prod'")
    channel = Channel(channel_name)
    tag = request.query_params.get("tag")
    hardware_id = request.query_params.get("hardware_id")
    # A view is what its devices are served: per tag in production, per hardware id and
    # tag in CI.
    view = DEFAULT_VIEW
    if channel == Channel.PROD and tag:
        view = tag_view(tag)
    elif channel == Channel.CI and tag and hardware_id:
        view = ci_view(hardware_id, tag)
    version = request.query_params.get("version")
    listed = await reading(
        state, lambda conn: _listed(state, conn, factory_id, channel, view, version)
    )
    found = [
        target_json(t)
        for t in listed.values()
        if (tag is None or tag in tags_of(t))
        and (hardware_id is None or hardware_id in hardware_ids_of(t))
    ]
    if version is not None:
        found = [t for t in found if str(t["version"]) == version]
    found.sort(key=lambda t: (version_key(str(t["version"])), t["name"]))
    return ok(found)


async def show(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, READERS)
    name = request.path_params["name"]

    def describe(conn: Connection) -> TargetDetailJson:
        row = conn.execute(
            select(targets_table).where(
                targets_table.c.factory_id == factory_id, targets_table.c.name == name
            )
        ).first()
        if row is None:
            raise not_found(f"no target named {name!r} was ever published")
        listed_in = [Channel.CI] if row.pruned_at is None else []
        if name in _listed(state, conn, factory_id, Channel.PROD):
            listed_in.append(Channel.PROD)
        return {
            "name": row.name,
            "version": row.version,
            "length": row.length,
            "sha256": row.sha256,
            "url": row.url,
            "custom": json.loads(row.custom),
            "created_at": iso(row.created_at),
            "pruned_at": iso(row.pruned_at),
            "channels": listed_in,
        }

    return ok(await reading(state, describe))


routes = [
    *resource(api_paths.BLOB, PUT=upload_blob),
    *resource(api_paths.TARGETS, POST=add, GET=list_all),
    *resource(api_paths.CHECK_TARGETS, POST=check),
    *resource(api_paths.PRUNE_TARGETS, POST=prune),
    *resource(api_paths.DELETE_TARGETS, POST=delete),
    *resource(api_paths.TARGET, GET=show),
]
