"""Production downloads follow the device's own view (ADR 0007), staged as attacks.

A production device's credential reads the metadata of its own view only: its tag's
release, or the wave it was rolled out to. The target files follow the same rule: a
device asking for a file that its view does not list (released to another tag, or to
a wave it was not given) gets 404, even by its exact consistent-snapshot path. Token
holders keep reading every released target (`tufa targets offline-update --prod`).
Devices are python-tuf's ngclient with their own credentials.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.agent_helpers import build_bytes, image_name, publish_build
from tests.helpers import Factory, Server, assert_error, send
from tests.test_rotations import Owner
from tests.test_waves import Device, post_wave, prepared, start_owner
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS

TAGS = ("main", "other")


def file_path(factory: Factory, version: str) -> str:
    digest = hashlib.sha256(build_bytes(version)).hexdigest()
    return factory.path(f"/repo/prod/targets/{digest}.{image_name(version)}")


def get_file(factory: Factory, version: str, credential: str) -> bytes | None:
    """The file of build `version` as `credential` downloads it; None when refused (404)."""
    response = send(factory.server, "GET", file_path(factory, version), credential)
    if response.status_code == 404:
        assert_error(response, 404, "not_found", "is not a target of the prod channel")
        return None
    assert response.status_code == 200, response.text
    return response.content


def wave(owner: Owner, name: str, version: str, tag: str, prune: tuple[str, ...] = ()) -> None:
    """`tufa waves init NAME VERSION TAG -k ARCHIVE [--prune ...]`, over HTTP."""
    md = prepared(owner.factory, version, tag, prune)
    for key in OfflineArchive.load(owner.archive).keys_for(TARGETS):
        md.sign(key.prod.signer(), append=True)
    created = post_wave(owner.factory, name, version, md, tag=tag, prune=prune)
    assert created.status_code == 201, created.text


def act(owner: Owner, name: str, action: str, **body: object) -> None:
    """`tufa waves rollout|complete|cancel NAME`, over HTTP."""
    path = owner.factory.path(f"/waves/{name}/{action}")
    done = send(owner.factory.server, "POST", path, owner.factory.admin_token, json=body)
    assert done.status_code == 200, done.text


def test_a_production_device_downloads_only_what_its_own_view_lists(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    reader = factory.token("read")
    for version in ("1", "2"):
        publish_build(factory, version, tags=TAGS)
    canary = Device.register(factory, tmp_path, "main-canary")
    rest = Device.register(factory, tmp_path, "main-rest")
    other = Device.register(factory, tmp_path, "other-1", tag="other")
    ci = Device.register(factory, tmp_path, "ci-1", channel="ci")

    # Nothing is released: no production device gets a file, by any path.
    for device in (canary, rest, other):
        assert device.sees() == set()
        assert get_file(factory, "1", device.credential) is None
    assert get_file(factory, "1", reader) is None
    assert ci.download(image_name("1"), tmp_path / "ci") == build_bytes("1")

    # Build 1 is rolled out to the canary of tag main: only the canary gets it.
    wave(owner, "w-1", "1", "main")
    act(owner, "w-1", "rollout", devices=[canary.name])
    assert canary.download(image_name("1"), tmp_path / "canary") == build_bytes("1")
    for device in (rest, other):
        assert device.sees() == set()
        assert get_file(factory, "1", device.credential) is None, device.name
    assert get_file(factory, "1", reader) == build_bytes("1")  # tokens: any released target

    # Completed: every device of tag main gets it; the device of tag other still not,
    # though the build carries its tag too: it was released to main only.
    act(owner, "w-1", "complete")
    assert rest.download(image_name("1"), tmp_path / "rest") == build_bytes("1")
    assert other.sees() == set()
    assert get_file(factory, "1", other.credential) is None

    # A cancelled wave keeps serving the device that got it, and nobody else.
    wave(owner, "w-2", "2", "main")
    act(owner, "w-2", "rollout", devices=[canary.name])
    act(owner, "w-2", "cancel")
    assert canary.download(image_name("2"), tmp_path / "canary") == build_bytes("2")
    assert rest.sees() == {image_name("1")}
    assert get_file(factory, "2", rest.credential) is None
    assert get_file(factory, "2", other.credential) is None

    # Released to tag other at last: now its device gets it.
    wave(owner, "o-1", "1", "other")
    act(owner, "o-1", "complete")
    assert other.download(image_name("1"), tmp_path / "other") == build_bytes("1")
    assert get_file(factory, "2", other.credential) is None
