"""The channels cannot stand in for each other (DESIGN invariant 9, ADR 0009).

The product story is walked step by step: a factory is created, its root and targets
keys are rotated, a root update transaction adds a release manager's key, and waves are
rolled out, completed and cancelled. After each step, before the devices poll, a
tampering proxy in front of the server serves every device the other channel's genuine
files, one substitution at a time: each version of each role, each timestamp recorded on
the way, and the whole other chain at once. Four devices sit behind it: python-tuf's
ngclient and the real `tufa-agent`, one of each per channel.

Every substitution must be refused, the device must trust no file of the other channel
afterwards and keep running what it ran, and once the proxy passes traffic through
again, the device must update normally on its next poll: nothing froze it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets

from tests.agent_helpers import AgentDevice, TamperingProxy, build_bytes, publish_build
from tests.channel_attacks import (
    CHANNELS,
    ChannelFiles,
    ChannelSwap,
    NgclientDevice,
    assert_all_refused,
    attempt,
    credential_of,
    follow,
    record,
    register_devices,
    run_once_served_view,
    substitutions,
)
from tests.helpers import Factory, Server, create_factory, send, served_metadata
from tests.test_rotations import Owner
from tests.test_waves import post_wave, prepared, release, sign_offline
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS

# The thief's firmware, as a target of the CI channel.
EVIL = TargetFile.from_data("rpi4-image-666", build_bytes("666"), ["sha256"])
EVIL.unrecognized_fields["custom"] = {"version": "666", "hardwareIds": ["rpi4"], "tags": ["main"]}


@pytest.fixture
def proxy(factory: Factory) -> Iterator[TamperingProxy]:
    proxy = TamperingProxy(factory.server.url)
    yield proxy
    proxy.close()


def _waves(factory: Factory, suffix: str, body: dict[str, Any] | None = None) -> None:
    path = factory.path(f"/waves{suffix}")
    response = send(factory.server, "POST", path, factory.admin_token, json=body or {})
    assert response.status_code == 200, response.text


def _wave_for(owner: Owner, name: str, version: str, devices: list[str]) -> None:
    """A wave of build `version`, signed by the owner, rolled out to `devices` only."""
    md = prepared(owner.factory, version)
    sign_offline(owner, md)
    created = post_wave(owner.factory, name, version, md)
    assert created.status_code == 201, created.text
    _waves(owner.factory, f"/{name}/rollout", {"devices": devices})


class Story:
    """The factory, its owner with the real CLI, and the devices behind the proxy."""

    def __init__(self, factory: Factory, owner: Owner, proxy: TamperingProxy, where: Path) -> None:
        self.factory, self.owner = factory, owner
        self.swap = ChannelSwap(proxy)
        self.devices = register_devices(factory, proxy, where)
        self.files = {channel: ChannelFiles() for channel in CHANNELS}

    def prod_devices(self) -> list[str]:
        return [
            d.device_id if isinstance(d, NgclientDevice) else d.name
            for d in self.devices.values()
            if d.channel == "prod"
        ]

    def attack(self, step: str) -> int:
        credentials = [credential_of(d) for d in self.devices.values()]
        for channel in CHANNELS:
            record(self.factory, channel, self.files[channel], credentials=credentials)
        return assert_all_refused(self.swap, self.devices, self.files, step)


def _created(story: Story) -> dict[str, str]:
    publish_build(story.factory, "1")
    release(story.owner, "w-1", "1")
    return {"ci": "1", "prod": "1"}


def _rotate_root(story: Story) -> dict[str, str]:
    story.owner.tufa("keys", "rotate-root", str(story.owner.archive))
    publish_build(story.factory, "2")
    release(story.owner, "w-2", "2")
    return {"ci": "2", "prod": "2"}


def _rotate_targets(story: Story) -> dict[str, str]:
    story.owner.tufa("keys", "rotate-targets", str(story.owner.archive))
    publish_build(story.factory, "3")
    release(story.owner, "w-3", "3")
    return {"ci": "3", "prod": "3"}


def _updates_transaction(story: Story) -> dict[str, str]:
    owner, manager = story.owner, story.owner.home / "release-manager.tgz"
    OfflineArchive(factory=story.factory.name).save(manager)
    owner.tufa("keys", "updates", "init", "-m", "a release manager's own targets key")
    owner.tufa("keys", "updates", "add-offline-key", "-r", "targets", "-k", str(manager))
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "apply", "-k", str(owner.archive))
    publish_build(story.factory, "4")
    release(story.owner, "w-4", "4")
    return {"ci": "4", "prod": "4"}


def _wave_rollout(story: Story) -> dict[str, str]:
    publish_build(story.factory, "5")
    _wave_for(story.owner, "w-5", "5", story.prod_devices())
    return {"ci": "5", "prod": "5"}


def _wave_complete(story: Story) -> dict[str, str]:
    _waves(story.factory, "/w-5/complete")
    publish_build(story.factory, "6")
    return {"ci": "6", "prod": "5"}


def _wave_cancel(story: Story) -> dict[str, str]:
    publish_build(story.factory, "7")
    _wave_for(story.owner, "w-7", "7", story.prod_devices())
    _waves(story.factory, "/w-7/cancel")
    # A cancelled wave is still served to the devices that got it.
    return {"ci": "7", "prod": "7"}


STEPS: list[tuple[str, Callable[[Story], dict[str, str]]]] = [
    ("factory creation", _created),
    ("rotate-root", _rotate_root),
    ("rotate-targets", _rotate_targets),
    ("a root update transaction", _updates_transaction),
    ("a wave rollout", _wave_rollout),
    ("a wave complete", _wave_complete),
    ("a wave cancel", _wave_cancel),
]


def test_no_file_of_one_channel_verifies_for_a_device_of_the_other(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    story = Story(factory, owner, proxy, tmp_path / "devices")
    staged = 0
    for step, action in STEPS:
        expected = action(story)
        staged += story.attack(step)
        follow(story.devices, expected)
    # Each version of each role of the other channel was served at every step (483 on
    # the run this was written with).
    assert staged > 400, staged


def test_an_offline_targets_key_alone_cannot_stand_in_for_the_ci_online_key(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    """Both roots list the owner's offline targets keys, and the CI root needs one
    targets signature: a thief of an offline key alone signs CI targets of the version
    the genuine CI snapshot names. The snapshot pins the targets by hash, so CI devices
    refuse them (ADR 0009), and take the genuine ones once they are served again."""
    owner = Owner.start(factory, tmp_path / "owner")
    (offline,) = OfflineArchive.load(owner.archive).keys_for(TARGETS)
    swap = ChannelSwap(proxy)
    devices = {
        name: device
        for name, device in register_devices(factory, proxy, tmp_path / "devices").items()
        if device.channel == "ci"
    }
    publish_build(factory, "1")
    follow(devices, {"ci": "1"})
    publish_build(factory, "2")
    genuine = served_metadata(factory, "ci")
    forged = Metadata[Targets].from_bytes(genuine[TARGETS])
    forged.signed.targets[EVIL.path] = EVIL
    forged.signatures.clear()
    forged.sign(offline.prod.signer())
    forged_bytes = forged.to_bytes()
    named = json.loads(genuine["snapshot"])["signed"]["meta"]["targets.json"]["version"]
    assert forged.signed.version == named
    files = ChannelFiles(targets={forged.signed.version: forged_bytes})

    def forged_targets(role: str, _version: int | None) -> bytes | None:
        return forged_bytes if role == TARGETS else None

    for name, device in devices.items():
        found = attempt(swap, name, device, "forged-targets", forged_targets, files)
        assert found.staged, found
        assert found.refused, found
        assert not found.accepted, found
        assert found.installed_after == found.installed_before
    follow(devices, {"ci": "2"})


def test_another_tags_view_gives_a_production_device_nothing_to_install(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    """Every view of the production channel is signed by the same keys: anyone in the
    middle can serve a device of tag main the genuine view of tag beta. Build 2 was
    published by CI for both tags but released to beta only; served beta's view, the
    device of main finds nothing released to it there, and installs build 3 once it is
    released to main."""
    owner = Owner.start(factory, tmp_path / "owner")
    device = AgentDevice.register(factory, tmp_path / "agents", "prod", server_url=proxy.url)
    publish_build(factory, "1")
    release(owner, "w-main-1", "1")
    follow({"agent": device}, {"prod": "1"})
    publish_build(factory, "2", tags=("main", "beta"))
    release(owner, "w-beta-2", "2", tag="beta")
    done = run_once_served_view(device, proxy, factory, "prod", "tag=beta")

    assert done.returncode == 0, done.stderr  # verified and valid, just nothing for main
    assert "rpi4-image-2" not in {e.path.rsplit(".", 1)[-1] for e in proxy.seen}
    assert device.installed_version() == "1"
    publish_build(factory, "3")
    release(owner, "w-main-3", "3")
    follow({"agent": device}, {"prod": "3"})


def test_no_file_of_another_factory_verifies_for_a_device(
    server: Server, factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    """Another factory's genuine files, of either channel and every version, served to
    this factory's devices: each factory has roots and online keys of its own."""
    other_factory = create_factory(server)
    for each in (factory, other_factory):
        publish_build(each, "1")
    swap = ChannelSwap(proxy)
    devices = {
        name: device
        for name, device in register_devices(factory, proxy, tmp_path / "devices").items()
        if isinstance(device, NgclientDevice)
    }
    staged = 0
    for channel in CHANNELS:
        foreign = record(other_factory, channel, ChannelFiles())
        for name, device in devices.items():
            for label, substitution in substitutions(foreign).items():
                label = f"{other_factory.name}'s {label}"
                found = attempt(swap, name, device, label, substitution, foreign)
                assert not found.accepted, found
                if found.staged:
                    assert found.refused, found
                    staged += 1
    assert staged >= 20, staged
    ci = {name: device for name, device in devices.items() if device.channel == "ci"}
    follow(ci, {"ci": "1"})  # and nothing froze: the genuine refreshes work
    devices["ngclient-prod"].refresh()
