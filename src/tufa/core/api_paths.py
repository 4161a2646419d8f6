"""The URL layout of a tufa server's API, spelled once.

The templates name their fields in braces, as Starlette routes do, so the server's
route lists (server/api/) and the clients (CLI, agent, demo) share them; clients fill
them in with `path` or the helpers below. Every route of the server is here.
"""

from __future__ import annotations

import re

from tufa.core.metadata import Channel

# What a `{factory}` segment may be: factory names are chosen once, at creation, and
# appear in every path and in the names of backups.
FACTORY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,62}")

# Answers 200 once the server serves (after its first re-signing pass).
HEALTH = "/healthz"
# Answers 200 while the database answers, 503 naming the problem otherwise.
READY = "/readyz"
# Prometheus metrics, for the operator token or the metrics token.
METRICS = "/metrics"
# The API described as OpenAPI 3.1, for anyone.
OPENAPI = "/openapi.json"
FACTORIES = "/api/v1/factories"
FACTORY = f"{FACTORIES}/{{factory}}"
# The operator replacing their own token over HTTP.
OPERATOR_TOKEN = "/api/v1/operator-token"  # noqa: S105 (a path, not a secret)

# Factory tokens (`tufa tokens`).
TOKENS = f"{FACTORY}/tokens"
TOKEN = f"{TOKENS}/{{token_id}}"
# How every token id starts; no secret does, so a secret given for an id is told apart
# and never echoed back.
TOKEN_ID_PREFIX = "tok_"  # noqa: S105 (a label, not a secret)
REVOKE_BY_ID_HINT = (
    "pass the token id (tok_..., as `tufa tokens list` shows it), not the token's secret; "
    "the value given is not repeated here, since it may be a secret"
)

# The one-time offline keys archive (`tufa keys download`).
KEYS_ARCHIVE = f"{FACTORY}/keys/archive"
KEYS_ARCHIVE_CONFIRM = f"{KEYS_ARCHIVE}/confirm"

# Root update transactions (`tufa keys updates`).
ROOT_UPDATE = f"{FACTORY}/keys/updates"
ROOT_UPDATE_STAGED = f"{ROOT_UPDATE}/staged"
ROOT_UPDATE_ONLINE_KEYS = f"{ROOT_UPDATE}/online-keys"
ROOT_UPDATE_SIGNATURES = f"{ROOT_UPDATE}/signatures"
ROOT_UPDATE_APPLY = f"{ROOT_UPDATE}/apply"

# CI publishing (`tufa targets`): blobs first, then the targets that name them.
BLOB = f"{FACTORY}/blobs/{{sha256}}"
TARGETS = f"{FACTORY}/targets"
TARGET = f"{TARGETS}/{{name}}"
PRUNE_TARGETS = f"{TARGETS}/prune"
CHECK_TARGETS = f"{TARGETS}/check"
DELETE_TARGETS = f"{TARGETS}/delete"

# Devices: the inventory (admin tokens), and what a device itself calls.
DEVICES = f"{FACTORY}/devices"
DEVICE = f"{DEVICES}/{{device}}"
DEVICE_CREDENTIAL = f"{FACTORY}/device-credential"
DEVICE_REPORTS = f"{FACTORY}/device-reports"
DEVICE_REVOKE = f"{DEVICE}/revoke"

# Production releases (`tufa waves`) and the device groups they roll out to.
WAVES = f"{FACTORY}/waves"
PREPARE_WAVE = f"{WAVES}/prepare"
WAVE = f"{WAVES}/{{name}}"
WAVE_SIGNATURES = f"{WAVE}/signatures"
WAVE_ROLLOUT = f"{WAVE}/rollout"
WAVE_COMPLETE = f"{WAVE}/complete"
WAVE_CANCEL = f"{WAVE}/cancel"
WAVE_RESUME = f"{WAVE}/resume"
DEVICE_GROUPS = f"{FACTORY}/device-groups"
DEVICE_GROUP = f"{DEVICE_GROUPS}/{{group}}"
DEVICE_GROUP_DEVICES = f"{DEVICE_GROUP}/devices"

# Webhooks (`tufa webhooks`): a factory's hooks, a test delivery, the delivery log.
WEBHOOKS = f"{FACTORY}/webhooks"
WEBHOOK = f"{WEBHOOKS}/{{hook_id}}"
WEBHOOK_TEST = f"{WEBHOOK}/test"
WEBHOOK_DELIVERIES = f"{WEBHOOK}/deliveries"

# What TUF clients read: `filename` is a metadata file name (1.root.json, timestamp.json)
# or a target's consistent-snapshot name (SHA256.NAME).
METADATA_FILE = f"{FACTORY}/repo/{{channel}}/metadata/{{filename}}"
TARGET_FILE = f"{FACTORY}/repo/{{channel}}/targets/{{filename}}"


def path(template: str, factory: str, **fields: str) -> str:
    """`template` for `factory`, its other fields filled in from `fields`."""
    return template.format(factory=factory, **fields)


def metadata_base(factory: str, channel: Channel) -> str:
    """Where a channel's metadata lives, ending in "/": ngclient's metadata base URL."""
    return path(METADATA_FILE, factory, channel=channel, filename="")


def targets_base(factory: str, channel: Channel) -> str:
    """Where a channel's target files live, ending in "/"."""
    return path(TARGET_FILE, factory, channel=channel, filename="")
