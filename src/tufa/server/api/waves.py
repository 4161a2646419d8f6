"""`/api/v1/factories/{factory}/waves` and `/device-groups`: releases on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse
from tuf.api.metadata import Metadata, Targets

from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.server import device_groups
from tufa.server.api.common import Endpoint, factory_caller, ok, reading, resource, writing
from tufa.server.api.fields import field, json_object, signature_list, string_list
from tufa.server.errors import bad_request
from tufa.server.principals import Scope
from tufa.server.publishing import LABEL, NGCLIENT_TARGETS_MAX_LENGTH, VERSION_LABEL
from tufa.server.rollout_plans import (
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MIN_REPORTS,
    DEFAULT_SILENCE_SECONDS,
    DEFAULT_SOAK_SECONDS,
    HealthRules,
    parse_share,
    parse_stages,
)
from tufa.server.rollouts import Rollouts
from tufa.server.state import ServerState
from tufa.server.wave_shapes import WaveJson
from tufa.server.waves import WAVE_NAME, Waves

ADMIN = {Scope.ADMIN}
READERS = {Scope.ADMIN, Scope.CI, Scope.READ}
# A signed wave (POST api_paths.WAVES) carries its production targets as JSON: room for the
# largest targets file devices accept (larger ones are refused as such), and for the
# spacing of JSON as clients send it.
MAX_CREATE_BYTES = 2 * NGCLIENT_TARGETS_MAX_LENGTH


class GroupJson(TypedDict):
    name: str
    devices: list[str]


class ListedGroupJson(TypedDict):
    name: str
    created_at: str
    devices: list[str]


class PreparedWaveJson(TypedDict):
    # The production targets' "signed" part as python-tuf writes it, for offline signing.
    signed: dict[str, Any]


class MemberJson(TypedDict):
    id: str
    name: str
    hardware_id: str
    tag: str
    installed_version: str | None
    revoked_at: str | None


class ShownGroupJson(ListedGroupJson):
    """`devices` holds ids, as in the list; `members` the devices themselves."""

    members: list[MemberJson]


class DeletedGroupJson(TypedDict):
    deleted: str
    devices_left: list[str]


def _tag_and_version(data: dict[str, Any]) -> tuple[str, str]:
    """The build a wave releases: a CI target's tag and version, checked as CI's are."""
    tag, version = field(data, "tag", str), field(data, "version", str)
    if not LABEL.fullmatch(tag):
        raise bad_request(
            "field 'tag' must be up to 128 letters, digits or . _ : + - such as 'main'"
        )
    if not VERSION_LABEL.fullmatch(version):
        raise bad_request(
            "field 'version' must be up to 64 letters, digits or . _ : + - such as '42'"
        )
    return tag, version


async def prepare(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    tag, version = _tag_and_version(data)
    prune = string_list(data, "prune")
    days = field(data, "expires_days", int, 365)
    waves = Waves(state)
    built = await reading(state, lambda c: waves.prepare(c, factory_id, tag, version, prune, days))
    answer: PreparedWaveJson = {"signed": built.to_dict()}
    return ok(answer)


async def create(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    data = await json_object(request)
    name = field(data, "name", str)
    tag, version = _tag_and_version(data)
    prune = string_list(data, "prune")
    try:
        md = Metadata[Targets].from_dict(dict(field(data, "targets", dict)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad_request(f"field 'targets' is not signed targets metadata: {e}") from e
    waves = Waves(state)
    created = await writing(
        state, lambda c: waves.create(c, factory_id, name, tag, version, prune, md)
    )
    return ok(created, status=201)


async def list_all(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, READERS)
    waves = Waves(state)
    return ok(await reading(state, lambda c: waves.list(c, factory_id)))


async def sign(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    name = request.path_params["name"]
    signatures = signature_list(field(await json_object(request), "signatures", list), "signatures")
    waves = Waves(state)
    return ok(await writing(state, lambda c: waves.add_signatures(c, factory_id, name, signatures)))


async def rollout(request: Request) -> JSONResponse:
    """Serve the wave to more devices: a group, a list, a count or a share; or, with
    `plan`, stage by stage, each after `soak_seconds` while the health gate holds."""
    state, factory_id = await factory_caller(request, ADMIN)
    name = request.path_params["name"]
    data = await json_object(request)
    if "plan" in data:
        return await _staged_rollout(state, factory_id, name, data)
    group = field(data, "group", str, "") or None
    device_ids = string_list(data, "devices") if "devices" in data else None
    limit = field(data, "limit", str, "") or None
    dry_run = field(data, "dry_run", bool, False)
    waves = Waves(state)
    return ok(
        await writing(
            state,
            lambda c: waves.rollout(c, factory_id, name, group, device_ids, limit, dry_run),
        )
    )


async def _staged_rollout(
    state: ServerState, factory_id: int, name: str, data: dict[str, Any]
) -> JSONResponse:
    for manual in ("group", "devices", "limit"):
        if manual in data:
            raise bad_request(
                f"field {manual!r} does not go with 'plan': a plan chooses its devices "
                "(a group may be its first stage)"
            )
    stages = parse_stages(string_list(data, "plan"))
    rate = parse_share(field(data, "max_failure_rate", str, DEFAULT_MAX_FAILURE_RATE))
    rules = HealthRules(
        soak_seconds=field(data, "soak_seconds", int, DEFAULT_SOAK_SECONDS),
        max_failure_rate=rate,
        min_reports=field(data, "min_reports", int, DEFAULT_MIN_REPORTS),
        silence_seconds=field(data, "silence_seconds", int, DEFAULT_SILENCE_SECONDS),
    )
    dry_run = field(data, "dry_run", bool, False)
    rollouts = Rollouts(state)
    preview = await writing(
        state, lambda c: rollouts.start(c, factory_id, name, stages, rules, dry_run)
    )
    return ok(preview)


async def resume(request: Request) -> JSONResponse:
    """Go on with a halted staged rollout: its stage soaks again, and the health gate
    counts the failures reported from now on."""
    state, factory_id = await factory_caller(request, ADMIN)
    name = request.path_params["name"]
    rollouts = Rollouts(state)

    def resumed(conn: Connection) -> WaveJson:
        rollouts.resume(conn, factory_id, name)
        return rollouts.waves.describe(conn, factory_id, name)

    return ok(await writing(state, resumed))


def _on_named_wave(
    scopes: set[Scope], step: Callable[[Waves, Connection, int, str], object], *, write: bool
) -> Endpoint:
    """An endpoint that runs `step` on the wave the path names, in one transaction."""

    async def endpoint(request: Request) -> JSONResponse:
        state, factory_id = await factory_caller(request, scopes)
        name = request.path_params["name"]
        waves = Waves(state)
        transaction = writing if write else reading
        return ok(await transaction(state, lambda c: step(waves, c, factory_id, name)))

    return endpoint


show = _on_named_wave(READERS, Waves.describe, write=False)
complete = _on_named_wave(ADMIN, Waves.complete, write=True)
cancel = _on_named_wave(ADMIN, Waves.cancel, write=True)


async def create_group(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    name = field(await json_object(request), "name", str)
    if not WAVE_NAME.fullmatch(name):
        raise bad_request("group names are 1-64 letters, digits, '.', '_' or '-'")

    def insert_group(conn: Connection) -> GroupJson:
        device_groups.create_group(conn, factory_id, name, state.settings.clock.now())
        return {"name": name, "devices": []}

    return ok(await writing(state, insert_group), status=201)


async def _named_devices(request: Request) -> list[str]:
    wanted = string_list(await json_object(request), "devices")
    if not wanted:
        raise bad_request("field 'devices' must name at least one device (id or name)")
    return wanted


async def add_to_group(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    group = request.path_params["group"]
    wanted = await _named_devices(request)

    def add(conn: Connection) -> GroupJson:
        return {
            "name": group,
            "devices": device_groups.add_to_group(conn, factory_id, group, wanted),
        }

    return ok(await writing(state, add))


async def remove_from_group(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    group = request.path_params["group"]
    wanted = await _named_devices(request)

    def remove(conn: Connection) -> GroupJson:
        left = device_groups.remove_from_group(conn, factory_id, group, wanted)
        return {"name": group, "devices": left}

    return ok(await writing(state, remove))


async def show_group(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, READERS)
    group = request.path_params["group"]

    def shown(conn: Connection) -> ShownGroupJson:
        row = device_groups.find_group(conn, factory_id, group)
        members = device_groups.group_member_devices(conn, factory_id, group)
        return {
            "name": row.name,
            "created_at": iso(row.created_at),
            "devices": sorted(d.id for d in members),
            "members": [
                {
                    "id": d.id,
                    "name": d.name,
                    "hardware_id": d.hardware_id,
                    "tag": d.tag,
                    "installed_version": d.installed_version,
                    "revoked_at": iso(d.revoked_at),
                }
                for d in members
            ],
        }

    return ok(await reading(state, shown))


async def delete_group(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, ADMIN)
    group = request.path_params["group"]

    def deleted(conn: Connection) -> DeletedGroupJson:
        return {
            "deleted": group,
            "devices_left": device_groups.delete_group(conn, factory_id, group),
        }

    return ok(await writing(state, deleted))


async def list_groups(request: Request) -> JSONResponse:
    state, factory_id = await factory_caller(request, READERS)

    def groups(conn: Connection) -> list[ListedGroupJson]:
        return [
            {
                "name": r.name,
                "created_at": iso(r.created_at),
                "devices": device_groups.group_members(conn, factory_id, r.name),
            }
            for r in device_groups.groups(conn, factory_id)
        ]

    return ok(await reading(state, groups))


routes = [
    *resource(api_paths.PREPARE_WAVE, POST=prepare),
    *resource(api_paths.WAVES, POST=create, GET=list_all),
    *resource(api_paths.WAVE, GET=show),
    *resource(api_paths.WAVE_SIGNATURES, POST=sign),
    *resource(api_paths.WAVE_ROLLOUT, POST=rollout),
    *resource(api_paths.WAVE_COMPLETE, POST=complete),
    *resource(api_paths.WAVE_CANCEL, POST=cancel),
    *resource(api_paths.WAVE_RESUME, POST=resume),
    *resource(api_paths.DEVICE_GROUPS, POST=create_group, GET=list_groups),
    *resource(api_paths.DEVICE_GROUP, GET=show_group, DELETE=delete_group),
    *resource(api_paths.DEVICE_GROUP_DEVICES, POST=add_to_group, DELETE=remove_from_group),
]
