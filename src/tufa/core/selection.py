"""Which target a device installs: the rule the server sorts by and the agent picks by.

A target's custom metadata carries `version`, `hardwareIds` and `tags`; a device takes
the highest version listed for both its hardware id and its tag. Build numbers sort as
numbers ("9" < "10"); other labels sort after every build number, part by part
("1.9" < "1.10").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from tuf.api.metadata import TargetFile

_PARTS = re.compile(r"[0-9]+|[^0-9]+")

VersionKey = tuple[int, tuple[tuple[int, int, str], ...]]


def version_key(version: str) -> VersionKey:
    """Build numbers first, as numbers; then other labels, part by part with their
    numbers as numbers, so "1.9" < "1.10"."""
    parts = tuple(
        (0, int(part), "") if part[0] in "0123456789" else (1, 0, part)
        for part in _PARTS.findall(version)
    )
    return (0 if len(parts) == 1 and parts[0][0] == 0 else 1, parts)


def custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.unrecognized_fields.get("custom", {})
    return custom if isinstance(custom, dict) else {}


def target_version(target: TargetFile) -> str | None:
    version = custom_of(target).get("version")
    return version if isinstance(version, str) and version else None


def _labels(target: TargetFile, key: str) -> list[str]:
    labels = custom_of(target).get(key)
    return [label for label in labels if isinstance(label, str)] if isinstance(labels, list) else []


def hardware_ids_of(target: TargetFile) -> list[str]:
    return _labels(target, "hardwareIds")


def tags_of(target: TargetFile) -> list[str]:
    return _labels(target, "tags")


def is_for(target: TargetFile, hardware_id: str, tag: str) -> bool:
    return (
        target_version(target) is not None
        and hardware_id in hardware_ids_of(target)
        and tag in tags_of(target)
    )


def newest_for(targets: Iterable[TargetFile], hardware_id: str, tag: str) -> TargetFile | None:
    """The highest version for this hardware id and tag; between two files of one
    version the name decides, so every device of a kind picks the same file."""
    return max(
        (t for t in targets if is_for(t, hardware_id, tag)),
        key=lambda t: (version_key(target_version(t) or ""), t.path),
        default=None,
    )
