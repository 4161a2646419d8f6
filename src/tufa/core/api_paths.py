"""The URL layout of a tufa server's API, spelled once.

The templates name their fields in braces, as Starlette routes do, so the server's
route lists (server/api/) and the clients (CLI, agent) share them; clients fill them
in with `path` or the helpers below. Paths not listed here are
`factory_path(name, suffix)`.
"""

from __future__ import annotations

from tufa.core.metadata import Channel

FACTORIES = "/api/v1/factories"
FACTORY = f"{FACTORIES}/{{factory}}"

# CI publishing (`tufa targets`): blobs first, then the targets that name them.
BLOB = f"{FACTORY}/blobs/{{sha256}}"
TARGETS = f"{FACTORY}/targets"
TARGET = f"{TARGETS}/{{name}}"
PRUNE_TARGETS = f"{TARGETS}/prune"
DELETE_TARGETS = f"{TARGETS}/delete"

# Devices: the inventory (admin tokens), and what a device itself calls.
DEVICES = f"{FACTORY}/devices"
DEVICE = f"{DEVICES}/{{device}}"
DEVICE_CREDENTIAL = f"{FACTORY}/device-credential"
DEVICE_REPORTS = f"{FACTORY}/device-reports"

# What TUF clients read: `filename` is a metadata file name (1.root.json, timestamp.json)
# or a target's consistent-snapshot name (SHA256.NAME).
METADATA_FILE = f"{FACTORY}/repo/{{channel}}/metadata/{{filename}}"
TARGET_FILE = f"{FACTORY}/repo/{{channel}}/targets/{{filename}}"


def path(template: str, factory: str, **fields: str) -> str:
    """`template` for `factory`, its other fields filled in from `fields`."""
    return template.format(factory=factory, **fields)


def factory_path(factory: str, suffix: str = "") -> str:
    return path(FACTORY, factory) + suffix


def metadata_base(factory: str, channel: Channel) -> str:
    """Where a channel's metadata lives, ending in "/": ngclient's metadata base URL."""
    return path(METADATA_FILE, factory, channel=channel, filename="")


def targets_base(factory: str, channel: Channel) -> str:
    """Where a channel's target files live, ending in "/"."""
    return path(TARGET_FILE, factory, channel=channel, filename="")
