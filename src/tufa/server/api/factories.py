"""`/api/v1/factories`: create and list (operator), show and configure (factory tokens)."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import Connection, select, update
from starlette.requests import Request
from starlette.responses import JSONResponse
from tuf.api.metadata import Root

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Channel
from tufa.core.root_update import (
    RootKeyPairJson,
    pairs_to_json,
    root_keys_shared,
    server_generated_keys_warning,
    server_generated_roles,
    shared_keyids,
    shared_keys_warning,
)
from tufa.server.api.common import base_url, caller, ok, reading, resource, threaded, writing
from tufa.server.api.fields import field, json_object, name_field
from tufa.server.auth import require_factory, require_operator
from tufa.server.db import factories
from tufa.server.errors import bad_request, not_found
from tufa.server.factories import create_factory
from tufa.server.offline_expiry import expiry_warning
from tufa.server.principals import Scope
from tufa.server.state import ServerState

READERS = {Scope.ADMIN, Scope.CI, Scope.READ}


class CreatedFactoryJson(TypedDict):
    """The new factory: its admin token is shown this once, and its first root key is
    named per channel."""

    name: str
    admin_token: str
    root_key: dict[Channel, str]


class ListedFactoryJson(TypedDict):
    name: str
    created_at: str


async def create(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    require_operator(principal)
    name = name_field(await json_object(request), "name")
    created = await threaded(lambda: create_factory(state, name))
    answer: CreatedFactoryJson = {
        "name": created.name,
        "admin_token": created.admin_token,
        "root_key": created.root_keyids,
    }
    return ok(answer, status=201)


async def list_all(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    require_operator(principal)

    def names(conn: Connection) -> list[ListedFactoryJson]:
        rows = conn.execute(select(factories).order_by(factories.c.name)).all()
        return [{"name": r.name, "created_at": iso(r.created_at)} for r in rows]

    return ok(await reading(state, names))


async def show(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    name = request.path_params["factory"]
    require_factory(principal, name, READERS)
    return ok(await threaded(lambda: describe(state, name, base_url(request))))


async def configure(request: Request) -> JSONResponse:
    state, principal = await caller(request)
    name = request.path_params["factory"]
    require_factory(principal, name, {Scope.ADMIN})
    data = await json_object(request)
    unknown = set(data) - {"anonymous_read"}
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}")
    anonymous_read = field(data, "anonymous_read", bool)

    def apply(conn: Connection) -> None:
        conn.execute(
            update(factories).where(factories.c.name == name).values(anonymous_read=anonymous_read)
        )

    await writing(state, apply)
    return ok(await threaded(lambda: describe(state, name, base_url(request))))


class FileStatus(TypedDict):
    version: int
    expires: str


class OnlineKey(TypedDict):
    channel: Channel
    role: str
    keyid: str


class FactoryStatus(TypedDict):
    name: str
    created_at: str
    anonymous_read: bool
    archive_downloaded_at: str | None
    # Per channel: its metadata and targets URLs, and the newest file of each role.
    channels: dict[Channel, dict[str, str | FileStatus]]
    online_keys: list[OnlineKey]
    root_key_pairs: list[RootKeyPairJson]
    channels_share_keys: list[str]
    first_separated_root_version: int | None
    # The offline roles (root, targets) production still trusts the server's keys for.
    server_generated_keys: list[str]
    warnings: list[str]


def describe(state: ServerState, name: str, base_url: str) -> FactoryStatus:
    """What `tufa factory show` prints: where each channel is served and how fresh it is."""
    repo, settings = state.repo, state.settings
    now = settings.clock.now()
    with state.db.read() as conn:
        row = conn.execute(select(factories).where(factories.c.name == name)).first()
        if row is None:
            raise not_found(f"unknown factory {name!r}")
        newest = {
            (channel, role): repo.read_file(conn, row.id, channel, role, None)
            for channel in Channel
            for role in (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
        }
        online = repo.online_keyids(conn, row.id)
        pairs = repo.root_key_pairs(conn, row.id)
        roots = {channel: md.signed for channel, md in repo.roots(conn, row.id).items()}
        first_separated = _first_separated_root_version(state, conn, row.id, roots)
        first_prod_root = repo.root(conn, row.id, Channel.PROD, 1).signed
    shared = shared_keyids(roots[Channel.CI], roots[Channel.PROD], online)
    generated = server_generated_roles(
        first_prod_root, roots[Channel.PROD], online[Channel.PROD][TARGETS]
    )
    warnings: list[str] = []
    if generated:
        warnings.append(server_generated_keys_warning(generated))
    if shared:
        warnings.append(shared_keys_warning(len(shared)))
    described: dict[Channel, dict[str, str | FileStatus]] = {}
    for channel in Channel:
        entry: dict[str, str | FileStatus] = {
            "metadata_url": base_url + api_paths.metadata_base(name, channel),
            "targets_url": base_url + api_paths.targets_base(name, channel),
        }
        for role in (ROOT, TARGETS, SNAPSHOT, TIMESTAMP):
            stored = newest[channel, role]
            assert stored is not None
            entry[role] = {"version": stored.version, "expires": iso(stored.expires)}
            offline_signed = role == ROOT or (role == TARGETS and channel is Channel.PROD)
            if offline_signed and stored.expires - now < settings.offline_expiry_warning:
                warnings.append(expiry_warning(channel, role, stored.expires, now))
        described[channel] = entry
    return {
        "name": row.name,
        "created_at": iso(row.created_at),
        "anonymous_read": row.anonymous_read,
        "archive_downloaded_at": iso(row.archive_downloaded_at),
        "channels": described,
        "online_keys": [
            {"channel": channel, "role": role, "keyid": keyid}
            for channel in Channel
            for role, keyid in sorted(online[channel].items())
        ],
        "root_key_pairs": pairs_to_json(pairs),
        "channels_share_keys": shared,
        "first_separated_root_version": first_separated,
        "server_generated_keys": generated,
        "warnings": warnings,
    }


def _first_separated_root_version(
    state: ServerState, conn: Connection, factory_id: int, current: dict[Channel, Root]
) -> int | None:
    """The oldest root version from which on the channels' roots share no root key: a
    device must be provisioned with it or a newer one. From an older root (of a factory
    created before ADR 0009) its first root update could be the other channel's."""
    newest = current[Channel.CI].version
    version, roots = newest, current
    while not root_keys_shared(roots[Channel.CI], roots[Channel.PROD]):
        if version == 1:
            return 1
        version -= 1
        roots = {c: state.repo.root(conn, factory_id, c, version).signed for c in Channel}
    return None if version == newest else version + 1


routes = [
    *resource(api_paths.FACTORIES, POST=create, GET=list_all),
    *resource(api_paths.FACTORY, GET=show, PATCH=configure),
]
