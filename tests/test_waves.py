"""Waves (design workflow 3.7): releases on demand to production devices, end to end.

The owner runs the real `tufa` CLI (`waves init/sign/rollout/complete/cancel/list/show/
status`, `device-groups`, `targets`, `keys`); every device is python-tuf's ngclient with
its own credential, provisioned with its channel's root v1, and each poll is a new
Updater over the metadata it trusts on disk, like an agent that restarts between polls.
A poll must never fail (above all, no rollback error), whichever view the server moves
the device to (invariant 3), and must end trusting exactly what the server serves it.

Also staged: the rules of a wave (one active wave per tag, versions only go up, bad input
refused with nothing changed: invariant 5), a production threshold of 3, and attacks on
invariant 2 (the server's online keys alone, or an owner-signed target set altered by the
server, never get software onto a production device).

The main flow runs on both backends; the rest are HTTP clients of the same server code
and run on SQLite only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    Root,
    TargetFile,
    Targets,
)
from tuf.ngclient import Updater
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet

from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    download_archive,
    dump_all_tables,
    online_keyids,
    poll_device,
    send,
    write_forged_mirror,
)
from tests.test_rotations import Owner, serve_directory, stolen_online_signers
from tufa.core.archive import OfflineArchive
from tufa.core.fetcher import BearerFetcher
from tufa.core.keys import KeyPair
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Channel

HARDWARE_ID = "rpi4"
EVIL = "evil-firmware.bin"
TARGETS_FILE = "targets.json"  # where ngclient stores the targets it trusts

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


# -- CI builds ------------------------------------------------------------------------------


def image(version: str) -> str:
    return f"image-{version}"


def build_bytes(name: str) -> bytes:
    return f"firmware {name}\n".encode() * 64


def publish(factory: Factory, *versions: str, tags: tuple[str, ...] = ("main",)) -> None:
    """A CI job publishing builds through the API: one external target per version."""
    items = []
    for version in versions:
        data = build_bytes(image(version))
        items.append(
            {
                "name": image(version),
                "version": version,
                "hardware_ids": [HARDWARE_ID],
                "tags": list(tags),
                "url": f"https://cdn.example.com/{image(version)}",
                "sha256": hashlib.sha256(data).hexdigest(),
                "length": len(data),
            }
        )
    response = factory.request("POST", "/targets", json={"targets": items})
    assert response.status_code == 201, response.text


def publish_with_cli(owner: Owner, version: str) -> None:
    """A CI job publishing a build file with `tufa targets add`."""
    path = owner.home / f"{image(version)}.img"
    path.write_bytes(build_bytes(image(version)))
    out = owner.tufa(
        "targets", "add", image(version), "--version", version, "--hardware-id", HARDWARE_ID,
        "--tag", "main", "--file", str(path), "--quiet",
    )  # fmt: skip
    assert f"Published {image(version)}." in out


def images(*versions: str) -> set[str]:
    return {image(v) for v in versions}


# -- devices --------------------------------------------------------------------------------


def fetch(factory: Factory, channel: str, filename: str, credential: str) -> bytes:
    path = factory.path(f"/repo/{channel}/metadata/{filename}")
    response = send(factory.server, "GET", path, credential)
    assert response.status_code == 200, f"{filename}: {response.text}"
    return response.content


@dataclass
class Device:
    """One device: its credential, and ngclient over its own trusted-metadata directory."""

    factory: Factory
    name: str
    id: str
    channel: str
    tag: str
    credential: str
    trust_dir: Path
    bootstrap: bytes | None
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def register(
        cls, factory: Factory, where: Path, name: str, channel: str = "prod", tag: str = "main"
    ) -> Device:
        body = {"name": name, "hardware_id": HARDWARE_ID, "tag": tag, "channel": channel}
        response = factory.request("POST", "/devices", json=body)
        assert response.status_code == 201, response.text
        found = response.json()
        trust_dir = where / "devices" / name
        trust_dir.mkdir(parents=True)
        return cls(
            factory,
            name,
            found["id"],
            channel,
            tag,
            found["credential"],
            trust_dir,
            factory.root_v1(channel),
        )

    def served(self) -> dict[str, bytes]:
        """What the server serves this device now: its view's timestamp, and the snapshot
        and targets it names, plus the newest root."""
        timestamp = fetch(self.factory, self.channel, "timestamp.json", self.credential)
        snapshot_version = json.loads(timestamp)["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = fetch(
            self.factory, self.channel, f"{snapshot_version}.snapshot.json", self.credential
        )
        targets_version = json.loads(snapshot)["signed"]["meta"]["targets.json"]["version"]
        return {
            ROOT: fetch(self.factory, self.channel, "root.json", self.credential),
            TIMESTAMP: timestamp,
            SNAPSHOT: snapshot,
            TARGETS: fetch(
                self.factory, self.channel, f"{targets_version}.targets.json", self.credential
            ),
        }

    def poll(self) -> TrustedMetadataSet:
        """One refresh, as at each poll; it must succeed, move no version down, and end
        with the device trusting exactly what the server serves it."""
        trusted, self.seen = poll_device(
            self.trust_dir,
            self.factory.metadata_url(self.channel),
            BearerFetcher(self.credential),
            self.bootstrap,
            self.seen,
            self.name,
        )
        self.bootstrap = None  # from now on, what it verified and stored
        served = self.served()
        assert trusted.root == Metadata[Root].from_bytes(served[ROOT]).signed
        for role in (TIMESTAMP, SNAPSHOT, TARGETS):
            assert self.seen[role] == json.loads(served[role])["signed"]["version"], role
        return trusted

    def download(self, name: str, where: Path) -> bytes:
        """Poll, then fetch target `name` as the agent does: ngclient checks its length
        and hashes against the trusted targets."""
        where.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            str(self.trust_dir),
            self.factory.metadata_url(self.channel),
            str(where),
            f"{self.factory.server.url}{self.factory.path(f'/repo/{self.channel}/targets/')}",
            fetcher=BearerFetcher(self.credential),
            bootstrap=self.bootstrap,
        )
        self.bootstrap = None
        updater.refresh()
        info = updater.get_targetinfo(name)
        assert info is not None, f"{self.name} is offered no {name}"
        return Path(updater.download_target(info)).read_bytes()

    def sees(self) -> set[str]:
        """Poll, and return the names of the targets the device now trusts."""
        return set(self.poll().targets.targets)


def register_fleet(factory: Factory, where: Path) -> tuple[list[Device], Device]:
    """Three production devices on tag main, one on tag beta."""
    mains = [Device.register(factory, where, f"main-{i}") for i in (1, 2, 3)]
    return mains, Device.register(factory, where, "beta-1", tag="beta")


def assert_sees(devices: list[Device], expected: set[str]) -> None:
    for device in devices:
        assert device.sees() == expected, device.name


# -- the owner's commands -------------------------------------------------------------------


def rollout(owner: Owner, name: str, *args: str) -> list[str]:
    """`tufa waves rollout NAME ARGS --json`; the names of the devices it took."""
    result = owner.json("waves", "rollout", name, *args)
    assert result["wave"] == name
    return [d["name"] for d in result["devices"]]


def start_owner(factory: Factory, home: Path) -> Owner:
    """The owner with the archive downloaded over HTTP (`tufa keys download` runs in the
    end-to-end test; a CLI process costs about a second)."""
    home.mkdir(parents=True)
    owner = Owner(factory, home, cli_env(factory, home / "config.json"))
    download_archive(factory, owner.archive)
    return owner


def get(factory: Factory, suffix: str) -> Any:
    response = send(factory.server, "GET", factory.path(suffix), factory.admin_token)
    assert response.status_code == 200, response.text
    return response.json()


def show(owner: Owner, name: str) -> dict[str, Any]:
    """What `tufa waves show NAME --json` prints, read over HTTP."""
    wave: dict[str, Any] = get(owner.factory, f"/waves/{name}")
    return wave


def statuses(owner: Owner) -> dict[str, str]:
    return {w["name"]: w["status"] for w in get(owner.factory, "/waves")}


def online_targets_keyid(owner: Owner) -> str:
    """The production channel's online targets key: the one that countersigns waves."""
    return online_keyids(owner.factory, "prod")[TARGETS]


def refused(owner: Owner, server: Server, *args: str, says: str) -> str:
    """`tufa ARGS` fails with a message saying `says`, and changes nothing on the server."""
    before = dump_all_tables(server)
    done = owner.fails(*args)
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert dump_all_tables(server) == before, f"`tufa {' '.join(args)}` changed the database"
    return done.stderr


def offline_targets_keyid(owner: Owner, archive: Path | None = None) -> str:
    """The archive's offline targets key that the production root trusts."""
    root_json = fetch(owner.factory, "prod", "root.json", owner.factory.admin_token)
    prod_root = Metadata[Root].from_bytes(root_json)
    trusted = set(prod_root.signed.roles[TARGETS].keyids)
    (keyid,) = owner.keyids(TARGETS, archive) & trusted
    return keyid


# -- the API as the CLI calls it, and an attacker's mirror ----------------------------------


def prepared(
    factory: Factory, version: str, tag: str = "main", prune: tuple[str, ...] = ()
) -> Metadata[Targets]:
    """The production targets a wave for build `version` of `tag` must serve, unsigned,
    as `POST /waves/prepare` builds them for `tufa waves init` to sign."""
    body = {"tag": tag, "version": version, "prune": list(prune), "expires_days": 365}
    response = send(
        factory.server, "POST", factory.path("/waves/prepare"), factory.admin_token, json=body
    )
    assert response.status_code == 200, response.text
    return Metadata[Targets].from_dict({"signed": response.json()["signed"], "signatures": []})


def post_wave(
    factory: Factory,
    name: str,
    version: str,
    md: Metadata[Targets],
    tag: str = "main",
    prune: tuple[str, ...] = (),
) -> httpx.Response:
    """`POST /waves` with the admin token, as `tufa waves init` sends a signed wave."""
    body = {
        "name": name,
        "tag": tag,
        "version": version,
        "prune": list(prune),
        "targets": md.to_dict(),
    }
    return send(factory.server, "POST", factory.path("/waves"), factory.admin_token, json=body)


def sign_offline(owner: Owner, md: Metadata[Targets]) -> None:
    """Sign `md` with the archive's offline targets keys that the production root trusts
    (after a rotation the archive also holds the keys it replaced)."""
    root = Metadata[Root].from_bytes(
        fetch(owner.factory, "prod", "root.json", owner.factory.admin_token)
    )
    trusted = set(root.signed.roles[TARGETS].keyids)
    for pair in OfflineArchive.load(owner.archive).signers_for(Channel.PROD, TARGETS, trusted):
        md.sign(pair.signer(), append=True)


def release(owner: Owner, name: str, version: str, tag: str = "main") -> None:
    """What `tufa waves init NAME VERSION TAG -k ARCHIVE` then `tufa waves complete NAME`
    do, over HTTP (two CLI processes cost two seconds): build `version` of `tag` signed
    with the owner's offline targets key, and make it the tag's production targets."""
    md = prepared(owner.factory, version, tag)
    sign_offline(owner, md)
    created = post_wave(owner.factory, name, version, md, tag=tag)
    assert created.status_code == 201, created.text
    path = owner.factory.path(f"/waves/{name}/complete")
    done = send(owner.factory.server, "POST", path, owner.factory.admin_token)
    assert done.status_code == 200, done.text


def evil_target() -> TargetFile:
    """The attacker's firmware, listed under the name EVIL."""
    return TargetFile.from_data(EVIL, b"the attacker's firmware", ["sha256"])


def refresh_from_mirror(device: Device, targets_md: Metadata[Targets], where: Path) -> Updater:
    """Serve `device` what the server serves it now, but with `targets_md` as its targets,
    named by a snapshot and timestamp re-signed with the server's stolen online keys, from
    a plain HTTP server on loopback; refresh an ngclient over a copy of the device's
    trusted metadata (`where / "trusted"`) from there, and return it."""
    assert device.bootstrap is None, f"{device.name} must have polled: it trusts its own copy"
    stolen = stolen_online_signers(device.factory.server, device.factory, "prod")
    served = device.served()
    write_forged_mirror(served, targets_md, stolen, where / "mirror" / "metadata")
    trusted = where / "trusted"
    shutil.copytree(device.trust_dir, trusted)
    with serve_directory(where / "mirror") as url:
        updater = Updater(str(trusted), f"{url}/metadata/", bootstrap=None)
        updater.refresh()
    return updater


def assert_device_refuses(
    device: Device,
    targets_md: Metadata[Targets],
    where: Path,
    error: type[RepositoryError] = RepositoryError,
) -> None:
    """A device served `targets_md` by the attacker's mirror refuses it, and keeps
    trusting its last good targets: the attacked copy and the device's own directory
    still hold them, and the real server still serves the device exactly them."""
    kept = (device.trust_dir / TARGETS_FILE).read_bytes()
    with pytest.raises(error):
        refresh_from_mirror(device, targets_md, where)
    assert (where / "trusted" / TARGETS_FILE).read_bytes() == kept, "forged targets trusted"
    assert (device.trust_dir / TARGETS_FILE).read_bytes() == kept
    trusted = device.poll()
    assert trusted.targets == Metadata[Targets].from_bytes(kept).signed
    assert EVIL not in trusted.targets.targets


# -- the whole flow, both backends ----------------------------------------------------------


def test_waves_release_on_demand_end_to_end(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = Owner.start(factory, tmp_path / "owner")  # `tufa keys download`
    ci = Device.register(factory, tmp_path, "ci-1", channel="ci")
    mains, beta = register_fleet(factory, tmp_path)
    prod = [*mains, beta]
    assert ci.sees() == set()
    assert_sees(prod, set())

    # CI builds reach the CI device within one refresh, and no production device.
    for seen, version in enumerate(("2", "3"), start=1):
        publish_with_cli(owner, version)
        assert ci.sees() == images(*("2", "3")[:seen])
        assert ci.download(image(version), tmp_path / "ci") == build_bytes(image(version))
        assert_sees(prod, set())

    # The wave is built and signed, and still reaches nobody.
    out = owner.tufa("waves", "init", "rel-3", "3", "main", "-k", str(owner.archive))
    assert "Wave rel-3: tag main, version 3" in out
    assert "More offline signatures" not in out
    online = online_targets_keyid(owner)
    wave = owner.json("waves", "show", "rel-3")
    assert wave["status"] == "active"
    assert wave["signed"] is True
    assert wave["targets"] == [image("3")]
    assert wave["signed_by"] == sorted({online, offline_targets_keyid(owner)})
    assert (wave["devices_served"], wave["devices_of_tag"]) == (0, 3)
    assert_sees(prod, set())

    # Rollout to a group.
    owner.tufa("device-groups", "create", "canaries")
    assert "1 device(s)" in owner.tufa("device-groups", "add", "canaries", mains[0].name)
    groups = get(factory, "/device-groups")  # what `tufa device-groups list --json` prints
    assert [(g["name"], g["devices"]) for g in groups] == [("canaries", [mains[0].id])]
    assert rollout(owner, "rel-3", "canaries") == [mains[0].name]
    assert mains[0].sees() == set(wave["targets"])
    assert_sees([*mains[1:], beta], set())

    # Rollout to a list of device ids (one already has the wave).
    assert rollout(owner, "rel-3", "--uuids", f"{mains[1].id},{mains[0].id}") == [mains[1].name]
    assert_sees(mains[:2], images("3"))
    assert_sees([mains[2], beta], set())

    # A dry run names the devices it would take and changes nothing.
    before = dump_all_tables(server)
    result = owner.json("waves", "rollout", "rel-3", "--limit", "50%", "--dry-run")
    assert result["dry_run"] is True
    assert [d["name"] for d in result["devices"]] == [mains[2].name]
    assert dump_all_tables(server) == before
    assert_sees([mains[2], beta], set())
    assert "rel-3 (active): served to 2 of 3 device(s)" in owner.tufa("waves", "status")

    # Complete: every device of the tag, and no other, gets the wave.
    assert "Wave rel-3 is now complete." in owner.tufa("waves", "complete", "rel-3")
    assert_sees(mains, images("3"))
    assert beta.sees() == set()
    assert mains[2].download(image("3"), tmp_path / "downloads") == build_bytes(image("3"))
    listed = owner.json("targets", "list", "--prod", "--tag", "main")
    assert [t["name"] for t in listed] == [image("3")]
    assert ci.sees() == images("2", "3")

    # The next release: to a device list from a file, then by share, then by count.
    publish_with_cli(owner, "4")
    assert ci.sees() == images("2", "3", "4")
    assert_sees(mains, images("3"))
    owner.tufa("waves", "init", "rel-4", "4", "main", "-k", str(owner.archive))
    assert show(owner, "rel-4")["targets"] == sorted(images("3", "4"))
    uuids = owner.home / "canaries.txt"
    uuids.write_text(f"{mains[2].name}\n\n")
    assert rollout(owner, "rel-4", "--uuids", f"@{uuids}") == [mains[2].name]
    assert mains[2].sees() == images("3", "4")
    assert_sees(mains[:2], images("3"))
    assert rollout(owner, "rel-4", "--limit", "50%") == [mains[0].name]  # 1 of the 2 left
    assert rollout(owner, "rel-4", "--limit", "1") == [mains[1].name]
    assert_sees(mains, images("3", "4"))
    assert "served to 3 of 3" in owner.tufa("waves", "status", "rel-4")
    owner.tufa("waves", "complete", "rel-4")
    assert_sees(mains, images("3", "4"))
    assert beta.sees() == set()
    assert [(w["name"], w["status"]) for w in owner.json("waves", "list")] == [
        ("rel-3", "complete"),
        ("rel-4", "complete"),
    ]


# -- cancel, new waves, key rotation: no poll ever fails ----------------------------------


@sqlite_only
def test_cancelled_wave_keeps_its_devices_and_nothing_goes_down(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    mains, beta = register_fleet(factory, tmp_path)
    assert_sees([*mains, beta], set())
    publish(factory, "2")
    owner.tufa("waves", "init", "w-2", "2", "main", "-k", str(owner.archive))
    assert rollout(owner, "w-2", "--limit", "1") == [mains[0].name]
    assert mains[0].sees() == images("2")
    assert_sees(mains[1:], set())

    # No targets key change during a wave; devices are served as before.
    served = {d.name: d.served() for d in mains}
    done = owner.fails("keys", "rotate-targets", str(owner.archive))
    assert "wave 'w-2' is active" in done.stderr, done.stderr
    assert "complete or cancel it" in done.stderr
    for device in mains:
        assert device.served() == served[device.name], device.name
    assert mains[0].sees() == images("2")
    assert_sees(mains[1:], set())

    # Cancel: the devices that got the wave keep it, the others keep the last release.
    assert "Wave w-2 is now cancelled." in owner.tufa("waves", "cancel", "w-2")
    for _ in range(2):
        assert mains[0].sees() == images("2")
        assert_sees(mains[1:], set())
    refused(owner, server, "waves", "rollout", "w-2", "--limit", "1", says="is cancelled")
    # Its version counts as attempted.
    refused(
        owner, server, "waves", "init", "w-2b", "2", "main", "-k", str(owner.archive),
        says="must be higher than every version released or attempted for it",
    )  # fmt: skip

    # With no active wave the targets key rotates, even with a device on the cancelled
    # wave: every view's production targets are re-signed, and nothing goes down.
    before = {d.name: d.seen[TARGETS] for d in mains}
    owner.tufa("keys", "rotate-targets", str(owner.archive))
    new_key = offline_targets_keyid(owner)
    for device, expected in zip(mains, (images("2"), set(), set()), strict=True):
        trusted = device.poll()
        assert set(trusted.targets.targets) == expected, device.name
        assert new_key in trusted.root.roles[TARGETS].keyids
        assert trusted.targets.version > before[device.name]
    assert beta.sees() == set()

    # A newer wave, signed with the new key, rolled out to another device, then
    # completed: everyone moves forward.
    publish(factory, "3")
    owner.tufa("waves", "init", "w-3", "3", "main", "-k", str(owner.archive))
    wave = show(owner, "w-3")
    assert wave["targets"] == [image("3")]  # the cancelled build is not in it
    assert new_key in wave["signed_by"]
    assert mains[0].sees() == images("2")
    assert rollout(owner, "w-3", "--uuids", mains[1].name) == [mains[1].name]
    assert mains[0].sees() == images("2")
    assert mains[1].sees() == images("3")
    assert mains[2].sees() == set()
    owner.tufa("waves", "complete", "w-3")
    for _ in range(2):
        assert_sees(mains, images("3"))
    assert beta.sees() == set()
    assert statuses(owner) == {"w-2": "cancelled", "w-3": "complete"}


# -- the rules of a wave: nothing changes when one is refused ------------------------------


@sqlite_only
def test_rotate_targets_during_a_wave_changes_nothing(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    device = Device.register(factory, tmp_path, "main-1")
    publish(factory, "2")
    owner.tufa("waves", "init", "w-2", "2", "main", "-k", str(owner.archive))
    assert rollout(owner, "w-2") == [device.name]
    assert device.sees() == images("2")
    served = device.served()
    archive = owner.archive.read_bytes()
    before = dump_all_tables(server)

    # Refused before anything is staged or generated: no update left open, no new key in
    # the archive, nothing in the database.
    refused(
        owner, server, "keys", "rotate-targets", str(owner.archive),
        says="wave 'w-2' is active: complete or cancel it before rotating the targets key",
    )  # fmt: skip
    updates = send(server, "GET", factory.path("/keys/updates"), factory.admin_token)
    assert_error(updates, 404, "not_found", "no root update is open")
    assert owner.archive.read_bytes() == archive

    # The server refuses it too: a targets key change staged by hand during the wave.
    owner.tufa("keys", "updates", "init", "-m", "a second targets key")
    refused(
        owner, server, "keys", "updates", "add-offline-key", "-r", "targets",
        "-k", str(owner.home / "second.tgz"),
        says="wave 'w-2' is active: complete or cancel it before changing targets keys",
    )  # fmt: skip
    owner.tufa("keys", "updates", "cancel")
    assert dump_all_tables(server) == before
    assert owner.archive.read_bytes() == archive
    assert device.served() == served
    assert device.sees() == images("2")
    assert statuses(owner) == {"w-2": "active"}


@sqlite_only
def test_one_active_wave_per_tag(server: Server, factory: Factory, tmp_path: Path) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    mains, beta = register_fleet(factory, tmp_path)
    publish(factory, "2", "3", tags=("main", "beta"))
    archive = str(owner.archive)
    owner.tufa("waves", "init", "main-2", "2", "main", "-k", archive)

    refused(
        owner, server, "waves", "init", "main-3", "3", "main", "-k", archive,
        says="wave 'main-2' is active for tag 'main': complete or cancel it first",
    )  # fmt: skip
    # Another tag takes a wave of its own meanwhile; each reaches its own tag only.
    owner.tufa("waves", "init", "beta-3", "3", "beta", "-k", archive)
    assert statuses(owner) == {"main-2": "active", "beta-3": "active"}
    assert rollout(owner, "beta-3") == [beta.name]
    assert rollout(owner, "main-2", "--limit", "1") == [mains[0].name]
    assert beta.sees() == images("3")
    assert mains[0].sees() == images("2")
    assert_sees(mains[1:], set())

    # Once the first wave is complete, its tag takes the next one (the refused name
    # was never taken).
    owner.tufa("waves", "complete", "main-2")
    owner.tufa("waves", "init", "main-3", "3", "main", "-k", archive)
    assert show(owner, "main-3")["targets"] == sorted(images("2", "3"))
    assert statuses(owner) == {"main-2": "complete", "beta-3": "active", "main-3": "active"}
    assert_sees(mains, images("2"))
    assert beta.sees() == images("3")


@sqlite_only
def test_wave_versions_only_go_up(server: Server, factory: Factory, tmp_path: Path) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    publish(factory, "2", "3", "4", "10")
    archive = str(owner.archive)
    higher = "must be higher than every version released or attempted for it"
    owner.tufa("waves", "init", "w-3", "3", "main", "-k", archive)
    owner.tufa("waves", "complete", "w-3")
    for version in ("3", "2"):  # reused, lower
        refused(
            owner, server, "waves", "init", f"w-{version}b", version, "main", "-k", archive,
            says=f"version {version} of tag 'main' {higher} (highest so far: 3)",
        )  # fmt: skip
    # A wave for 4 signed before another wave for 4 is created, then cancelled: the
    # server refuses it too, as the version of a cancelled wave counts as attempted.
    early = prepared(factory, "4")
    early.sign(OfflineArchive.load(owner.archive).keys_for(TARGETS)[0].prod.signer())
    owner.tufa("waves", "init", "w-4", "4", "main", "-k", archive)
    owner.tufa("waves", "cancel", "w-4")
    for version in ("4", "3"):
        refused(
            owner, server, "waves", "init", f"w-{version}c", version, "main", "-k", archive,
            says=f"version {version} of tag 'main' {higher} (highest so far: 4)",
        )  # fmt: skip
    before = dump_all_tables(server)
    assert_error(post_wave(factory, "w-4c", "4", early), 400, "bad_request", higher)
    assert dump_all_tables(server) == before

    # Build numbers compare as numbers: 10 follows 4.
    owner.tufa("waves", "init", "w-10", "10", "main", "-k", archive)
    assert show(owner, "w-10")["targets"] == sorted(images("3", "10"))  # not the cancelled 4
    assert statuses(owner) == {"w-3": "complete", "w-4": "cancelled", "w-10": "active"}


@sqlite_only
def test_bad_input_is_refused_and_changes_nothing(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    mains, beta = register_fleet(factory, tmp_path)
    device = mains[0]
    publish(factory, "2", "3")
    archive = str(owner.archive)

    fresh = owner.home / "fresh.tgz"
    stranger = OfflineArchive(factory=factory.name)
    stranger.add_key(TARGETS, KeyPair.generate())
    stranger.save(fresh)
    other = create_factory(server)
    other_archive = owner.home / "other.tgz"
    download_archive(other, other_archive)
    for version, tag, keys, says in (
        ("9", "main", archive, "no CI target of version 9 has tag 'main'"),
        ("2", "nope", archive, "no CI target of version 2 has tag 'nope'"),
        ("2", "main", str(fresh), "the archive holds no offline targets key of the production"),
        (
            "2", "main", str(other_archive),
            f"is the archive of factory {other.name!r}, not {factory.name!r}",
        ),
    ):  # fmt: skip
        refused(owner, server, "waves", "init", "w-2", version, tag, "-k", keys, says=says)
    assert statuses(owner) == {}

    owner.tufa("waves", "init", "w-2", "2", "main", "-k", archive)
    limit = "'limit' must be a count such as 10 or a share such as 25%"
    for args, says in (
        (("nope",), "no wave named 'nope'"),
        (("w-2", "--limit", "0"), limit),
        (("w-2", "--limit", "abc"), limit),
        (("w-2", "nope"), "no device group named 'nope'"),
        (
            ("w-2", "--uuids", f"{device.name},ghost,{beta.name}"),
            f"not production devices of tag 'main': {beta.name}, ghost",
        ),
    ):
        refused(owner, server, "waves", "rollout", *args, says=says)
    assert device.sees() == set()
    assert show(owner, "w-2")["devices_served"] == 0

    owner.tufa("waves", "complete", "w-2")
    after_completion: list[tuple[tuple[str, ...], str]] = [
        (("rollout", "w-2"), "wave 'w-2' is complete; only an active wave rolls out"),
        (("cancel", "w-2"), "wave 'w-2' is complete"),
        (
            ("init", "w-2", "3", "main", "-k", archive),
            "a wave named 'w-2' exists already; waves are never reused",
        ),
    ]
    for command, says in after_completion:
        refused(owner, server, "waves", *command, says=says)
    assert_sees(mains, images("2"))
    assert beta.sees() == set()
    assert statuses(owner) == {"w-2": "complete"}


@sqlite_only
def test_prune_drops_versions_from_the_tag(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    device = Device.register(factory, tmp_path, "main-1")
    beta = Device.register(factory, tmp_path, "beta-1", tag="beta")
    ci = Device.register(factory, tmp_path, "ci-1", channel="ci")
    publish(factory, "2", "3", "4", tags=("main", "beta"))
    release(owner, "w-2", "2")
    release(owner, "w-3", "3")
    release(owner, "beta-2", "2", tag="beta")
    assert device.sees() == images("2", "3")
    assert beta.sees() == images("2")

    owner.tufa("waves", "init", "w-4", "4", "main", "-k", str(owner.archive), "--prune", "2,3")
    assert show(owner, "w-4")["targets"] == [image("4")]
    owner.tufa("waves", "complete", "w-4")
    assert device.sees() == images("4")
    listed = owner.json("targets", "list", "--prod", "--tag", "main")
    assert [t["name"] for t in listed] == [image("4")]
    # Only that tag's production targets: another tag and CI keep the builds.
    assert beta.sees() == images("2")
    assert ci.sees() == images("2", "3", "4")


@sqlite_only
def test_production_threshold_three_needs_two_offline_signatures(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    device = Device.register(factory, tmp_path, "main-1")
    assert device.sees() == set()
    second = owner.home / "second.tgz"

    # A second key holder's offline targets key; production needs both and the server's.
    owner.tufa("keys", "updates", "init", "-m", "a second release manager")
    owner.tufa("keys", "updates", "add-offline-key", "-r", "targets", "-k", str(second))
    owner.tufa("keys", "updates", "set-threshold", "-r", "targets", "3")
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "sign", "-k", str(second))
    owner.tufa("keys", "updates", "apply")
    first_key, second_key = offline_targets_keyid(owner), offline_targets_keyid(owner, second)
    online = online_targets_keyid(owner)
    root = device.poll().root
    assert set(root.roles[TARGETS].keyids) == {online, first_key, second_key}
    assert root.roles[TARGETS].threshold == 3

    # One archive leaves the wave unsigned: it reaches nobody, and cannot.
    publish(factory, "2")
    out = owner.tufa("waves", "init", "w-2", "2", "main", "-k", str(owner.archive))
    assert "More offline signatures are needed: `tufa waves sign NAME -k OTHER.tgz`." in out
    wave = show(owner, "w-2")
    assert wave["status"] == "active"
    assert wave["signed"] is False
    assert wave["signed_by"] == sorted({online, first_key})
    refused(
        owner, server, "waves", "rollout", "w-2",
        says="wave 'w-2' needs more offline signatures first (`tufa waves sign`)",
    )  # fmt: skip
    refused(
        owner, server, "waves", "complete", "w-2",
        says="wave 'w-2' needs more offline signatures (`tufa waves sign`)",
    )  # fmt: skip
    assert device.sees() == set()

    # The second key holder signs: the wave is complete, and rolls out.
    out = owner.tufa("waves", "sign", "w-2", "-k", str(second))
    assert f"Signed wave w-2 with {second_key}." in out
    assert "Ready to roll out." in out
    wave = show(owner, "w-2")
    assert wave["signed"] is True
    assert wave["signed_by"] == sorted({online, first_key, second_key})
    assert rollout(owner, "w-2") == [device.name]
    assert device.sees() == images("2")


# -- attacks on invariant 2 ------------------------------------------------------------------


@sqlite_only
def test_online_keys_alone_get_nothing_onto_a_production_device(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    stolen = stolen_online_signers(server, factory, "prod")
    held = OfflineArchive.load(owner.archive)
    (offline,) = held.keys_for(TARGETS)
    (root_key,) = held.keys_for(ROOT)
    stranger = KeyPair.generate()
    device = Device.register(factory, tmp_path, "main-1")
    publish(factory, "2")

    # The API, with the admin token: no wave without an offline signature by an offline
    # targets key of the production root.
    before = dump_all_tables(server)
    no_offline = "a wave must be signed with an offline targets key (-k ARCHIVE)"
    for signers, says in (
        ([stolen[TARGETS]], no_offline),
        ([], no_offline),
        ([stranger.signer()], f"key {stranger.keyid} is not an offline targets key"),
        ([stolen[TARGETS], stranger.signer()], f"key {stranger.keyid} is not an offline"),
        ([root_key.prod.signer()], f"key {root_key.prod.keyid} is not an offline targets key"),
    ):
        md = prepared(factory, "2")
        for signer in signers:
            md.sign(signer, append=True)
        assert_error(post_wave(factory, "w-2", "2", md), 400, "bad_request", says)
    assert dump_all_tables(server) == before

    # A release the owner signed, which the device trusts.
    release(owner, "w-2", "2")
    assert device.sees() == images("2")

    # The attacker re-signs the device's repository with the stolen online keys: a new
    # targets version with the evil target, a snapshot and a timestamp naming it.
    forged = Metadata[Targets].from_bytes(device.served()[TARGETS])
    forged.signed.version += 1
    forged.signed.targets[EVIL] = evil_target()
    forged.signatures.clear()
    forged.sign(stolen[TARGETS])
    assert_device_refuses(device, forged, tmp_path / "online", UnsignedMetadataError)
    alone = copy.deepcopy(forged)
    alone.signatures.clear()
    alone.sign(offline.prod.signer())
    assert_device_refuses(device, alone, tmp_path / "offline", UnsignedMetadataError)
    # Control: the same forgery with the offline signature too goes through.
    forged.sign(offline.prod.signer(), append=True)
    accepted = refresh_from_mirror(device, forged, tmp_path / "control")
    assert accepted.get_targetinfo(EVIL) is not None
    assert accepted._trusted_set.targets.version == forged.signed.version
    assert device.sees() == images("2")


@sqlite_only
def test_owner_signed_targets_altered_by_the_server_are_refused(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    stolen = stolen_online_signers(server, factory, "prod")
    (offline,) = OfflineArchive.load(owner.archive).keys_for(TARGETS)
    publish(factory, "2")

    # The API refuses offline-signed targets changed afterwards.
    before = dump_all_tables(server)
    original = prepared(factory, "2")
    original.sign(offline.prod.signer())

    def altered_hash(md: Metadata[Targets]) -> None:
        md.signed.targets[image("2")].hashes["sha256"] = hashlib.sha256(b"evil").hexdigest()

    def added_target(md: Metadata[Targets]) -> None:
        md.signed.targets[EVIL] = evil_target()

    def later_expiry(md: Metadata[Targets]) -> None:
        md.signed.expires += timedelta(days=1)

    for change, says in (
        (altered_hash, "the signed targets are not what this wave must serve"),
        (added_target, "the signed targets are not what this wave must serve"),
        (later_expiry, f"the signature by key {offline.keyid} does not verify"),
    ):
        md = copy.deepcopy(original)
        change(md)
        response = post_wave(factory, "w", "2", md)
        code = "bad_request" if change is later_expiry else "rule_violated"
        assert_error(response, 400, code, says)
    assert dump_all_tables(server) == before

    # A wave the owner signed; a device not in it; a server serving the wave altered.
    device = Device.register(factory, tmp_path, "main-1")
    owner.tufa("waves", "init", "w", "2", "main", "-k", str(owner.archive))
    assert device.sees() == set()
    wave = Metadata[Targets].from_dict(show(owner, "w")["metadata"])
    online = online_targets_keyid(owner)
    assert set(wave.signatures) == {online, offline.keyid}

    for label, change in (("hash", altered_hash), ("added", added_target)):
        md = copy.deepcopy(wave)
        change(md)
        del md.signatures[online]
        md.sign(stolen[TARGETS], append=True)  # the online signature, over the altered set
        assert_device_refuses(device, md, tmp_path / label)
    # Control: the wave as the owner signed it goes through the same forged snapshot.
    accepted = refresh_from_mirror(device, wave, tmp_path / "control")
    assert set(accepted._trusted_set.targets.targets) == images("2")
    assert device.sees() == set()
