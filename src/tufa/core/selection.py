"""Which target a device installs: the rule the server sorts by and the agent picks by.

A target's custom metadata carries `version`, `hardwareIds` and `tags`; a device takes
the highest version listed for both its hardware id and its tag. Build numbers sort as
numbers ("9" < "10"); other labels sort after every number, as text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tuf.api.metadata import TargetFile


def version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.unrecognized_fields.get("custom", {})
    return custom if isinstance(custom, dict) else {}


def target_version(target: TargetFile) -> str | None:
    version = custom_of(target).get("version")
    return version if isinstance(version, str) and version else None


def is_for(target: TargetFile, hardware_id: str, tag: str) -> bool:
    custom = custom_of(target)
    hardware_ids, tags = custom.get("hardwareIds"), custom.get("tags")
    return (
        target_version(target) is not None
        and isinstance(hardware_ids, list)
        and hardware_id in hardware_ids
        and isinstance(tags, list)
        and tag in tags
    )


def newest_for(targets: Iterable[TargetFile], hardware_id: str, tag: str) -> TargetFile | None:
    """The highest version for this hardware id and tag; between two files of one
    version the name decides, so every device of a kind picks the same file."""
    return max(
        (t for t in targets if is_for(t, hardware_id, tag)),
        key=lambda t: (version_key(target_version(t) or ""), t.path),
        default=None,
    )
