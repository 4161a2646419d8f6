"""core/selection.py: the version order and the target a device picks."""

from __future__ import annotations

from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from tufa.core.selection import custom_of, is_for, newest_for, target_version, version_key


def target(path: str, custom: Any = None, **fields: Any) -> TargetFile:
    """A target of one byte; `custom` as given, or built from `fields`."""
    unrecognized = {"custom": custom if custom is not None else fields}
    return TargetFile(1, {"sha256": "00" * 32}, path, unrecognized)


def ours(path: str, version: str) -> TargetFile:
    return target(path, version=version, hardwareIds=["rpi4"], tags=["main"])


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("9", "10"),  # build numbers compare as numbers, not as text
        ("2", "100"),
        ("1.9", "1.10"),  # labels compare part by part, numbers as numbers
        ("1.2", "1.2.1"),
        ("1.0-rc1", "1.0-rc2"),
        ("999", "1.0"),  # any label sorts after every build number
        ("1000000", "a"),
        ("v1", "v2"),
    ],
)
def test_version_order(lower: str, higher: str) -> None:
    assert version_key(lower) < version_key(higher)
    assert sorted([higher, lower], key=version_key) == [lower, higher]


def test_equal_versions_have_equal_keys() -> None:
    assert version_key("007") == version_key("7")


def test_custom_of_ignores_custom_that_is_not_an_object() -> None:
    assert custom_of(target("a", custom=["version", "1"])) == {}
    assert custom_of(TargetFile(1, {"sha256": "00" * 32}, "a")) == {}
    assert custom_of(target("a", version="1")) == {"version": "1"}


@pytest.mark.parametrize("version", [None, "", 5, ["1"]])
def test_target_version_is_a_non_empty_string_or_none(version: Any) -> None:
    assert target_version(target("a", version=version)) is None


def test_is_for_needs_version_hardware_id_and_tag() -> None:
    assert is_for(ours("a", "1"), "rpi4", "main")
    assert not is_for(ours("a", "1"), "rpi5", "main")
    assert not is_for(ours("a", "1"), "rpi4", "beta")
    assert not is_for(target("a", hardwareIds=["rpi4"], tags=["main"]), "rpi4", "main")


@pytest.mark.parametrize(
    "custom",
    [
        "rpi4 main",  # not an object
        {"version": "1", "hardwareIds": "rpi4", "tags": ["main"]},  # a string "contains" rpi4
        {"version": "1", "hardwareIds": ["rpi4"], "tags": "main"},
        {"version": "1", "hardwareIds": {"rpi4": 1}, "tags": ["main"]},
        {"version": "1", "tags": ["main"]},
        {"version": 1, "hardwareIds": ["rpi4"], "tags": ["main"]},
    ],
)
def test_is_for_refuses_malformed_custom(custom: Any) -> None:
    assert not is_for(target("a", custom=custom), "rpi4", "main")


def test_newest_for_takes_the_highest_version_of_the_device_kind() -> None:
    other_kind = target("z", version="99", hardwareIds=["rpi5"], tags=["main"])
    targets = [ours("b", "9"), ours("a", "10"), other_kind, ours("c", "1.0")]
    newest = newest_for(targets, "rpi4", "main")
    assert newest is not None
    assert newest.path == "c"  # a label sorts after build numbers
    newest = newest_for(targets[:3], "rpi4", "main")
    assert newest is not None
    assert newest.path == "a"


def test_newest_for_breaks_a_version_tie_by_path_whatever_the_order() -> None:
    one, two = ours("image-a", "5"), ours("image-b", "5")
    for targets in ([one, two], [two, one]):
        newest = newest_for(targets, "rpi4", "main")
        assert newest is not None
        assert newest.path == "image-b"


def test_newest_for_finds_nothing_for_another_kind() -> None:
    assert newest_for([ours("a", "1")], "rpi4", "beta") is None
    assert newest_for([], "rpi4", "main") is None
