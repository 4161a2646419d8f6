"""What /openapi.json says of each route beyond what the route table tells (its path,
methods and path parameters): who may call it, its request body and query parameters,
its answer's type, and the refusals it can give besides the ones every route gives.

Answers are the endpoints' own types (TypedDicts, checked by mypy where the endpoint
builds them); request bodies are schemas here, written from the fields each endpoint
reads (`fields.py`). tests/test_openapi.py fails for a route without an entry and for
an entry without a route.
"""

from __future__ import annotations

from tufa.core import api_paths as p
from tufa.core.device_events import EVENT_KINDS
from tufa.server.api import (
    devices,
    factories,
    keys,
    report_fields,
    targets,
    tokens,
    waves,
    webhooks,
)
from tufa.server.api.json_schema import Schema
from tufa.server.api.operation_kinds import (
    ADMIN,
    BOOLEAN,
    CONFLICT,
    CREATED,
    DEVICE,
    FILE,
    OPERATOR,
    PUBLIC,
    PUBLISHERS,
    READERS,
    REPO_READERS,
    STRING,
    STRINGS,
    Content,
    Operation,
    Query,
    StatusJson,
    object_schema,
    pattern_schema,
    tokens_with,
)
from tufa.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tufa.server.principals import Scope
from tufa.server.publishing import LABEL, VERSION_LABEL, PublishCheck, PublishResult
from tufa.server.rollouts import PlanPreview
from tufa.server.root_updates.status import Applied, Cancelled, RootUpdateStatus
from tufa.server.wave_shapes import RolloutResult, WaveJson, WaveSummary
from tufa.server.webhooks import EVENTS, MAX_SECRET, MIN_SECRET

LABEL_SCHEMA = pattern_schema(LABEL.pattern)
VERSION_SCHEMA = pattern_schema(VERSION_LABEL.pattern)
SIGNATURES: Schema = {
    "type": "array",
    "items": object_schema(("keyid", "sig"), keyid=STRING, sig=STRING),
}
SIGNED_METADATA: Schema = object_schema(
    ("signed", "signatures"), signed={"type": "object"}, signatures={"type": "array"}
)
CHANNEL: Schema = {"type": "string", "enum": ["ci", "prod"]}
TARGET_SPEC = object_schema(
    ("name", "version", "length", "sha256", "hardware_ids", "tags"),
    name=pattern_schema(r"[A-Za-z0-9._+-]{1,255}"),
    version=VERSION_SCHEMA,
    length={"type": "integer", "minimum": 0},
    sha256=pattern_schema("[0-9a-f]{64}"),
    hardware_ids={"type": "array", "items": LABEL_SCHEMA, "minItems": 1},
    tags={"type": "array", "items": LABEL_SCHEMA, "minItems": 1},
    url={"type": "string", "description": "where devices download an external target"},
    custom={"type": "object", "description": "extra custom metadata, signed with the target"},
)
WAVE_BUILD = {"tag": LABEL_SCHEMA, "version": VERSION_SCHEMA, "prune": STRINGS}
EVENT = object_schema(
    ("id", "at", "kind", "detail"),
    id=pattern_schema("[A-Za-z0-9_-]{1,64}"),
    at={"type": "string", "description": "ISO 8601 with its offset, e.g. 2026-12-01T10:00:00Z"},
    kind={"type": "string", "enum": list(EVENT_KINDS)},
    version={"type": ["string", "null"]},
    target={"type": ["string", "null"]},
    detail={"type": "string", "maxLength": report_fields.MAX_DETAIL},
)
VIEW_QUERY = (
    Query("tag", "the view of one tag (production), or with hardware_id (CI)"),
    Query("hardware_id", "with tag, the view of one hardware id and tag (CI)"),
)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", p.HEALTH): Operation(StatusJson, PUBLIC, summary="The process serves."),
    ("GET", p.READY): Operation(
        StatusJson,
        PUBLIC,
        errors=(503,),
        summary="The server can do its work (its database answers).",
    ),
    ("GET", p.METRICS): Operation(
        Content(METRICS_CONTENT_TYPE, STRING, "Prometheus text exposition"),
        [*OPERATOR, {"metricsToken": []}],
        summary="Prometheus metrics.",
    ),
    ("GET", p.OPENAPI): Operation(
        Content("application/json", {"type": "object"}, "this document"), PUBLIC
    ),
    ("POST", p.OPERATOR_TOKEN): Operation(tokens.OperatorTokenJson, OPERATOR, statuses=CREATED),
    ("POST", p.FACTORIES): Operation(
        factories.CreatedFactoryJson,
        OPERATOR,
        statuses=CREATED,
        body=object_schema(("name",), name=pattern_schema(p.FACTORY_NAME.pattern)),
        errors=CONFLICT,
        summary="Create a factory, its keys and its admin token.",
    ),
    ("GET", p.FACTORIES): Operation(
        list[factories.ListedFactoryJson], OPERATOR, summary="Every factory, by name."
    ),
    ("GET", p.FACTORY): Operation(
        factories.FactoryStatus, READERS, summary="The factory, its channels and its keys."
    ),
    ("PATCH", p.FACTORY): Operation(
        factories.FactoryStatus,
        ADMIN,
        body={
            **object_schema(("anonymous_read",), anonymous_read={"type": "boolean"}),
            "additionalProperties": False,
        },
        summary="Allow or refuse metadata and target reads without a credential.",
    ),
    ("GET", p.KEYS_ARCHIVE): Operation(
        Content("application/gzip", FILE, "the offline keys archive (tar.gz)"),
        ADMIN,
        errors=(410,),
        summary="The one-time offline keys archive; confirm it to delete it from the server.",
    ),
    ("POST", p.KEYS_ARCHIVE_CONFIRM): Operation(
        keys.ConfirmedDownloadJson,
        ADMIN,
        body=object_schema(("sha256",), sha256=pattern_schema("[0-9a-fA-F]{64}")),
        errors=(409, 410),
        summary="Confirm the archive is saved (by its SHA-256): the server deletes it.",
    ),
    ("POST", p.TOKENS): Operation(
        tokens.CreatedTokenJson,
        ADMIN,
        statuses=CREATED,
        body=object_schema(
            ("scopes",),
            scopes={"type": "array", "items": {"enum": sorted(Scope)}, "minItems": 1},
            description={"type": "string", "maxLength": tokens.MAX_DESCRIPTION},
            expires_in_seconds={"type": "integer", "minimum": 0, "description": "0: never"},
        ),
        summary="Create a factory token; its secret is shown this once.",
    ),
    ("GET", p.TOKENS): Operation(
        list[tokens.TokenJson], ADMIN, summary="The factory's tokens, without secrets."
    ),
    ("DELETE", p.TOKEN): Operation(tokens.TokenJson, ADMIN, summary="Revoke a token."),
    ("POST", p.DEVICES): Operation(
        devices.IssuedDeviceJson,
        tokens_with(Scope.ADMIN, Scope.REGISTER),
        statuses=CREATED,
        body=object_schema(
            ("name", "hardware_id", "tag", "channel"),
            name=STRING,
            hardware_id=STRING,
            tag=STRING,
            channel=CHANNEL,
        ),
        errors=CONFLICT,
        summary="Register a device; its credential is shown this once.",
    ),
    ("GET", p.DEVICES): Operation(
        list[devices.ListedDeviceJson],
        tokens_with(Scope.ADMIN, Scope.READ),
        query=(Query("stale", "true: only stale devices; false: only the others", BOOLEAN),),
    ),
    ("GET", p.DEVICE): Operation(
        devices.DeviceDetailJson,
        tokens_with(Scope.ADMIN, Scope.READ),
        summary="A device (by id or name), what it runs and its recent events.",
    ),
    ("DELETE", p.DEVICE): Operation(devices.DeletedDeviceJson, ADMIN),
    ("POST", p.DEVICE_REVOKE): Operation(devices.DeviceJson, ADMIN, errors=CONFLICT),
    ("GET", p.DEVICE_CREDENTIAL): Operation(devices.DeviceJson, DEVICE),
    ("POST", p.DEVICE_CREDENTIAL): Operation(
        devices.IssuedDeviceJson, DEVICE, statuses=CREATED, errors=CONFLICT
    ),
    ("POST", p.DEVICE_REPORTS): Operation(
        devices.AcceptedReportJson,
        DEVICE,
        body=object_schema(
            ("installed", "events"),
            installed={
                "anyOf": [
                    object_schema(
                        ("version", "target", "sha256"),
                        version=STRING,
                        target=STRING,
                        sha256=pattern_schema("[0-9a-fA-F]{64}"),
                    ),
                    {"type": "null"},
                ]
            },
            events={"type": "array", "items": EVENT, "maxItems": report_fields.MAX_EVENTS},
            timestamp={
                "anyOf": [
                    object_schema(
                        ("version", "expires"),
                        version={"type": "integer", "minimum": 1},
                        expires={"type": "string", "description": "ISO 8601 with its offset"},
                    ),
                    {"type": "null"},
                ],
                "description": "the timestamp the device verified last",
            },
            poll_interval={"type": ["integer", "null"], "minimum": 0},
        ),
    ),
    ("POST", p.WEBHOOKS): Operation(
        webhooks.CreatedHookJson,
        ADMIN,
        statuses=CREATED,
        body=object_schema(
            ("url", "events"),
            url={"type": "string", "description": "http:// or https://"},
            events={"type": "array", "items": {"enum": list(EVENTS)}, "minItems": 1},
            secret={"type": "string", "minLength": MIN_SECRET, "maxLength": MAX_SECRET},
        ),
    ),
    ("GET", p.WEBHOOKS): Operation(list[webhooks.HookJson], ADMIN),
    ("DELETE", p.WEBHOOK): Operation(webhooks.HookJson, ADMIN),
    ("POST", p.WEBHOOK_TEST): Operation(webhooks.QueuedTestJson, ADMIN, statuses=CREATED),
    ("GET", p.WEBHOOK_DELIVERIES): Operation(list[webhooks.DeliveryJson], ADMIN),
    ("GET", p.METADATA_FILE): Operation(
        Content("application/json", SIGNED_METADATA, "TUF metadata"),
        REPO_READERS,
        query=VIEW_QUERY,
        bodiless={304: "not modified since the ETag given in If-None-Match"},
        summary="A TUF metadata file: `timestamp.json`, `root.json` or `N.ROLE.json`.",
    ),
    ("GET", p.TARGET_FILE): Operation(
        Content("application/octet-stream", FILE, "the target's bytes"),
        REPO_READERS,
        bodiless={206: "the range asked for (Range header)"},
        summary="A target file by its consistent-snapshot name (`SHA256.NAME`).",
    ),
    ("POST", p.ROOT_UPDATE): Operation(
        RootUpdateStatus,
        ADMIN,
        statuses=CREATED,
        body=object_schema(("message",), message=STRING),
        errors=CONFLICT,
        summary="Open a root update: staged roots start as copies of the current ones.",
    ),
    ("GET", p.ROOT_UPDATE): Operation(RootUpdateStatus, ADMIN, summary="The open root update."),
    ("DELETE", p.ROOT_UPDATE): Operation(Cancelled, ADMIN, summary="Cancel the open root update."),
    ("PUT", p.ROOT_UPDATE_STAGED): Operation(
        RootUpdateStatus,
        ADMIN,
        body=object_schema(
            ("roots",),
            roots=object_schema(("ci", "prod"), ci=SIGNED_METADATA, prod=SIGNED_METADATA),
            prod_targets={"type": "object", "additionalProperties": SIGNED_METADATA},
            root_key_pairs={
                "type": "array",
                "items": object_schema(("ci", "prod"), ci=STRING, prod=STRING),
            },
        ),
        errors=CONFLICT,
        summary="Replace what the open update stages: roots, production targets, key pairs.",
    ),
    ("POST", p.ROOT_UPDATE_ONLINE_KEYS): Operation(
        RootUpdateStatus,
        ADMIN,
        body=object_schema(("roles",), roles=STRINGS, channels={"type": "array", "items": CHANNEL}),
        errors=CONFLICT,
        summary="Generate new online keys, put in the staged roots until apply.",
    ),
    ("POST", p.ROOT_UPDATE_SIGNATURES): Operation(
        RootUpdateStatus,
        ADMIN,
        body=object_schema(
            (),
            roots=object_schema((), ci=SIGNATURES, prod=SIGNATURES),
            prod_targets={"type": "object", "additionalProperties": SIGNATURES},
        ),
        errors=CONFLICT,
        summary="Add offline signatures to the staged roots and production targets.",
    ),
    ("POST", p.ROOT_UPDATE_APPLY): Operation(
        Applied, ADMIN, errors=CONFLICT, summary="Check and apply the signed root update."
    ),
    ("PUT", p.BLOB): Operation(
        targets.StoredBlobJson,
        PUBLISHERS,
        statuses=CREATED,
        body=Content("application/octet-stream", FILE, "the blob, with its Content-Length"),
        summary="Upload a target's bytes, named by their SHA-256.",
    ),
    ("POST", p.TARGETS): Operation(
        PublishResult,
        PUBLISHERS,
        body=object_schema(("targets",), targets={"type": "array", "items": TARGET_SPEC}),
        statuses=(201, 200),
        errors=CONFLICT,
        summary="Publish CI targets (200 when nothing changed).",
    ),
    ("GET", p.TARGETS): Operation(
        list[targets.TargetJson],
        READERS,
        query=(
            Query("channel", "ci (the default) or prod", CHANNEL),
            *VIEW_QUERY,
            Query("version", "only the targets of this build"),
        ),
        summary="The targets a channel (or one of its views) lists.",
    ),
    ("POST", p.CHECK_TARGETS): Operation(
        PublishCheck,
        PUBLISHERS,
        body=object_schema(("targets",), targets={"type": "array", "items": TARGET_SPEC}),
        errors=CONFLICT,
    ),
    ("POST", p.PRUNE_TARGETS): Operation(
        PublishResult,
        PUBLISHERS,
        body=object_schema(("keep",), keep={"type": "integer"}),
        summary="Unlist all but the newest `keep` CI builds.",
    ),
    ("POST", p.DELETE_TARGETS): Operation(
        PublishResult,
        PUBLISHERS,
        body=object_schema(("names",), names=STRINGS),
        summary="Unlist CI targets by name.",
    ),
    ("GET", p.TARGET): Operation(
        targets.TargetDetailJson, READERS, summary="A target as it was published."
    ),
    ("POST", p.PREPARE_WAVE): Operation(
        waves.PreparedWaveJson,
        ADMIN,
        body=object_schema(("tag", "version"), **WAVE_BUILD, expires_days={"type": "integer"}),
        summary="The production targets a wave of a CI build would sign, for offline signing.",
    ),
    ("POST", p.WAVES): Operation(
        WaveJson,
        ADMIN,
        statuses=CREATED,
        body=object_schema(
            ("name", "tag", "version", "targets"),
            name=STRING,
            **WAVE_BUILD,
            targets=SIGNED_METADATA,
        ),
        errors=CONFLICT,
        summary="Store a wave: the prepared production targets, signed offline.",
    ),
    ("GET", p.WAVES): Operation(list[WaveSummary], READERS, summary="The factory's waves."),
    ("GET", p.WAVE): Operation(WaveJson, READERS, summary="A wave, with its metadata."),
    ("POST", p.WAVE_SIGNATURES): Operation(
        WaveJson,
        ADMIN,
        body=object_schema(("signatures",), signatures=SIGNATURES),
        errors=CONFLICT,
        summary="Add offline signatures to a wave.",
    ),
    ("POST", p.WAVE_ROLLOUT): Operation(
        RolloutResult | PlanPreview,
        ADMIN,
        body=object_schema(
            (),
            group=STRING,
            devices=STRINGS,
            limit={"type": "string", "description": "a count ('10') or a share ('25%')"},
            dry_run={"type": "boolean"},
            plan={
                **STRINGS,
                "description": "stages: counts ('20'), shares ('25%'), a group first; "
                "ends with '100%'. Not with group, devices or limit.",
            },
            soak_seconds={"type": "integer", "minimum": 1},
            max_failure_rate={
                "type": "string",
                "pattern": "^[0-9]{1,3}(?:\\.[0-9]{1,6})?%$",
                "description": "a share from 0% to 100%, e.g. '5%'",
            },
            min_reports={"type": "integer", "minimum": 1},
            silence_seconds={"type": "integer", "minimum": 1},
        ),
        errors=CONFLICT,
    ),
    ("POST", p.WAVE_COMPLETE): Operation(
        WaveJson, ADMIN, errors=CONFLICT, summary="Serve the wave to every device of its tag."
    ),
    ("POST", p.WAVE_CANCEL): Operation(
        WaveJson, ADMIN, errors=CONFLICT, summary="Stop the wave; its devices go back."
    ),
    ("POST", p.WAVE_RESUME): Operation(WaveJson, ADMIN, errors=CONFLICT),
    ("POST", p.DEVICE_GROUPS): Operation(
        waves.GroupJson,
        ADMIN,
        statuses=CREATED,
        body=object_schema(("name",), name=STRING),
        errors=CONFLICT,
        summary="Create a device group.",
    ),
    ("GET", p.DEVICE_GROUPS): Operation(
        list[waves.ListedGroupJson], READERS, summary="The device groups and their members."
    ),
    ("GET", p.DEVICE_GROUP): Operation(
        waves.ShownGroupJson, READERS, summary="A device group, with its members."
    ),
    ("DELETE", p.DEVICE_GROUP): Operation(
        waves.DeletedGroupJson, ADMIN, summary="Delete a device group; its devices stay."
    ),
    ("POST", p.DEVICE_GROUP_DEVICES): Operation(
        waves.GroupJson,
        ADMIN,
        body=object_schema(("devices",), devices={**STRINGS, "minItems": 1}),
        errors=CONFLICT,
        summary="Add production devices (ids or names) to a group, all or none.",
    ),
    ("DELETE", p.DEVICE_GROUP_DEVICES): Operation(
        waves.GroupJson,
        ADMIN,
        body=object_schema(("devices",), devices={**STRINGS, "minItems": 1}),
        summary="Remove devices (ids or names) from a group, all or none.",
    ),
}
