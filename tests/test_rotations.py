"""Key rotations end to end: the real `tufa` CLI changes keys, and devices follow.

Each test bootstraps python-tuf's ngclient with version 1 of each channel's root before
anything changes, like a device provisioned at the factory, and has it poll again after
every step: a device must follow every rotation through the root chain without error.
At the end a device provisioned with root v1 only must still reach the current state.

The last tests stage attacks with stolen keys against a copy of the repository served by
a local HTTP server, to show what production devices refuse and CI devices accept.

One full rotation scenario runs on both backends; the others are HTTP clients of the
same server code and run on SQLite only.
"""

from __future__ import annotations

import functools
import json
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import Signer
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet

from tests.helpers import (
    Factory,
    Server,
    cli_env,
    online_keyids,
    poll_device,
    run_cli,
    send,
    served_metadata,
    write_forged_mirror,
)
from tufa.core.archive import ArchiveKey, OfflineArchive
from tufa.core.fetcher import BearerFetcher
from tufa.core.keys import KeyPair, key_from_json
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Channel
from tufa.demo.local_server import free_port
from tufa.server import db
from tufa.server.secrets import MasterKey

CHANNELS = ("ci", "prod")
# --key-type -> (keytype, scheme) of the TUF key it makes.
KEY_TYPES = {
    "ed25519": ("ed25519", "ed25519"),
    "ecdsa": ("ecdsa", "ecdsa-sha2-nistp256"),
    "rsa": ("rsa", "rsassa-pss-sha256"),
}
VIEW = ""  # the production targets every device of a fresh factory gets

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


# -- the owner, with the real CLI ---------------------------------------------------------


@dataclass
class Owner:
    """The factory owner: admin token, CLI config, and the offline archive on disk."""

    factory: Factory
    home: Path
    env: dict[str, str]

    @classmethod
    def start(cls, factory: Factory, home: Path) -> Owner:
        home.mkdir(parents=True, exist_ok=True)
        owner = cls(factory, home, cli_env(factory, home / "config.json"))
        owner.tufa("keys", "download", str(owner.archive))
        return owner

    @property
    def archive(self) -> Path:
        return self.home / "keys.tgz"

    def tufa(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = run_cli(*args, env=self.env if env is None else env)
        assert done.returncode == 0, f"tufa {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def fails(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = run_cli(*args, env=self.env)
        assert done.returncode != 0, f"tufa {' '.join(args)} succeeded:\n{done.stdout}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.tufa(*args, "--json"))

    def review(self) -> dict[str, Any]:
        review: dict[str, Any] = self.json("keys", "updates", "review")
        return review

    def keys(self, role: str, archive: Path | None = None) -> list[ArchiveKey]:
        return OfflineArchive.load(archive or self.archive).keys_for(role)

    def keyids(self, role: str, archive: Path | None = None) -> set[str]:
        """The ids the archive's keys of `role` are known by (a root key: its CI half's)."""
        return {k.keyid for k in self.keys(role, archive)}

    def online_keyids(self) -> dict[str, dict[str, str]]:
        """What `tufa factory show --json` says the server's online keys are, per channel."""
        shown = self.json("factory", "show")
        return {
            channel: {
                k["role"]: k["keyid"] for k in shown["online_keys"] if k["channel"] == channel
            }
            for channel in CHANNELS
        }


def halves(keys: list[ArchiveKey], channel: str) -> list[str]:
    """The key ids of `keys`' halves that sign `channel`'s metadata, sorted."""
    return sorted(k.half(Channel(channel)).keyid for k in keys)


def served_root(factory: Factory, channel: str) -> Metadata[Root]:
    path = factory.path(f"/repo/{channel}/metadata/root.json")
    response = send(factory.server, "GET", path, factory.admin_token)
    assert response.status_code == 200, response.text
    return Metadata[Root].from_bytes(response.content)


def served_targets(factory: Factory, channel: str) -> Metadata[Targets]:
    return Metadata[Targets].from_bytes(served_metadata(factory, channel)["targets"])


def assert_signed_by(md: Metadata[Any], root: Root, role: str, keyids: set[str]) -> None:
    """`md` carries signatures by exactly `keyids`, each verifying with `root`'s key."""
    assert set(md.signatures) == keyids, f"{role} signed by {set(md.signatures)}, not {keyids}"
    for keyid in keyids:
        root.keys[keyid].verify_signature(md.signatures[keyid], md.signed_bytes)
    root.verify_delegate(role, md.signed_bytes, md.signatures)


# -- devices ------------------------------------------------------------------------------


@dataclass
class Device:
    """A device's TUF client on its own channel, with its own credential.

    It is provisioned with the channel's root v1; each poll is a new ngclient over the
    same trusted-metadata directory, like an agent that restarts between polls.
    """

    factory: Factory
    channel: str
    trust_dir: Path
    fetcher: BearerFetcher
    bootstrap: bytes | None = None
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def provision(cls, factory: Factory, channel: str, trust_dir: Path) -> Device:
        trust_dir.mkdir(parents=True)
        credential = factory.register_device(channel)["credential"]
        fetcher = BearerFetcher(credential)
        return cls(factory, channel, trust_dir, fetcher, factory.root_v1(channel))

    def poll(self) -> TrustedMetadataSet:
        trusted, self.seen = poll_device(
            self.trust_dir,
            self.factory.metadata_url(self.channel),
            self.fetcher,
            self.bootstrap,
            self.seen,
            self.channel,
        )
        self.bootstrap = None  # from now on, what it verified and stored
        return trusted

    def follow(self) -> TrustedMetadataSet:
        """Poll, and check the device now trusts exactly what the server serves."""
        trusted = self.poll()
        served = served_metadata(self.factory, self.channel)
        assert trusted.root.version == Metadata[Root].from_bytes(served["root"]).signed.version
        for role in (TIMESTAMP, SNAPSHOT, TARGETS):
            version = json.loads(served[role])["signed"]["version"]
            assert self.seen[role] == version, f"{self.channel} {role}"
        return trusted


def provision(factory: Factory, where: Path) -> dict[str, Device]:
    suffix = secrets.token_hex(3)
    return {c: Device.provision(factory, c, where / f"{c}-{suffix}") for c in CHANNELS}


def follow_all(devices: dict[str, Device]) -> dict[str, TrustedMetadataSet]:
    return {channel: device.follow() for channel, device in devices.items()}


# -- rotate-root and rotate-targets, every key type, both backends ---------------------------


def _check_root_rotated(
    owner: Owner, before: dict[str, Metadata[Root]], key_type: str
) -> ArchiveKey:
    """Both channels' roots moved to one new root key, a pair of keys (one per channel)
    that the archive holds; return it."""
    archive = OfflineArchive.load(owner.archive)
    roots = {c: served_root(owner.factory, c) for c in CHANNELS}
    (new_ci,) = roots["ci"].signed.roles[ROOT].keyids
    held = archive.find(new_ci)
    assert held is not None, "the archive lacks the new root key"
    assert held.role == ROOT
    assert not held.is_shared
    for channel, root in roots.items():
        (old,) = before[channel].signed.roles[ROOT].keyids
        new = held.half(Channel(channel))
        assert root.signed.version == before[channel].signed.version + 1
        assert root.signed.roles[ROOT].keyids == [new.keyid]
        assert root.signed.roles[ROOT].threshold == 1
        key = root.signed.keys[new.keyid]
        assert key == new.public
        assert (key.keytype, key.scheme) == KEY_TYPES[key_type]
        assert old not in root.signed.keys
        # Signed by the old key (the old root's threshold) and the new one (its own).
        assert set(root.signatures) == {old, new.keyid}
        before[channel].signed.verify_delegate(ROOT, root.signed_bytes, root.signatures)
        root.signed.verify_delegate(ROOT, root.signed_bytes, root.signatures)
        # The archive documents the roots its keys now govern.
        assert Metadata[Root].from_bytes(archive.roots[Channel(channel)]) == root
    # Whatever one channel's root key signs, the other channel's devices refuse.
    assert not set(roots["ci"].signed.keys) & set(roots["prod"].signed.roles[ROOT].keyids)
    return held


def _check_targets_rotated(
    owner: Owner, before_root: Root, before_prod: Metadata[Targets], key_type: str
) -> str:
    online = {c: online_keyids(owner.factory, c)[TARGETS] for c in CHANNELS}
    (old,) = set(before_root.roles[TARGETS].keyids) - {online["prod"]}
    roots = {c: served_root(owner.factory, c).signed for c in CHANNELS}
    (new,) = set(roots["prod"].roles[TARGETS].keyids) - {online["prod"]}
    assert new != old
    held = OfflineArchive.load(owner.archive).find(new)
    assert held is not None, "the archive lacks the new offline targets key"
    assert held.role == TARGETS
    for channel, threshold in (("ci", 1), ("prod", 2)):
        root = roots[channel]
        assert root.version == before_root.version + 1
        assert set(root.roles[TARGETS].keyids) == {online[channel], new}
        assert root.roles[TARGETS].threshold == threshold
        assert old not in root.keys
        assert (root.keys[new].keytype, root.keys[new].scheme) == KEY_TYPES[key_type]
        assert root.keys[new] == held.prod.public
    # Production targets were re-signed in the same change: same content, next version,
    # signed by the online key and the new offline key, which the new root requires.
    prod = served_targets(owner.factory, "prod")
    assert prod.signed.version == before_prod.signed.version + 1
    assert prod.signed.targets == before_prod.signed.targets
    assert_signed_by(prod, roots["prod"], TARGETS, {online["prod"], new})
    # CI targets stay signed by the CI channel's online key alone.
    assert_signed_by(served_targets(owner.factory, "ci"), roots["ci"], TARGETS, {online["ci"]})
    return new


def _rotate_root(owner: Owner, devices: dict[str, Device], key_type: str | None) -> ArchiveKey:
    before = {c: served_root(owner.factory, c) for c in CHANNELS}
    args = () if key_type is None else ("--key-type", key_type)
    out = owner.tufa("keys", "rotate-root", str(owner.archive), *args)
    new = _check_root_rotated(owner, before, key_type or "ed25519")
    assert new.ci.keyid in out
    assert new.prod.keyid in out
    trusted = follow_all(devices)
    for channel in CHANNELS:
        assert trusted[channel].root.roles[ROOT].keyids == halves([new], channel)
    return new


def _rotate_targets(owner: Owner, devices: dict[str, Device], key_type: str | None) -> str:
    before_root = served_root(owner.factory, "prod").signed
    before_prod = served_targets(owner.factory, "prod")
    devices["prod"].follow()  # a production device polls right before the rotation
    args = () if key_type is None else ("--key-type", key_type)
    owner.tufa("keys", "rotate-targets", str(owner.archive), *args)
    new = _check_targets_rotated(owner, before_root, before_prod, key_type or "ed25519")
    trusted = follow_all(devices)  # and right after it
    assert new in trusted["prod"].root.roles[TARGETS].keyids
    assert trusted["prod"].targets.version == before_prod.signed.version + 1
    return new


def _fresh_devices_reach(factory: Factory, where: Path, root_version: int) -> None:
    """A device provisioned with root v1 only walks the whole chain to the current state."""
    fresh = follow_all(provision(factory, where))
    for channel in CHANNELS:
        assert fresh[channel].root.version == root_version
        assert fresh[channel].root == served_root(factory, channel).signed


def test_root_then_targets_rotation_is_followed_by_devices(
    factory: Factory, tmp_path: Path
) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)  # provisioned and polling before anything changes
    _rotate_root(owner, devices, None)
    _rotate_targets(owner, devices, None)
    follow_all(devices)  # and later, with nothing new
    _fresh_devices_reach(factory, tmp_path / "fresh", 3)


@sqlite_only
def test_rotations_in_a_row_with_every_key_type(factory: Factory, tmp_path: Path) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    # RSA keys last: every later command would pay for loading them from the archive.
    _rotate_targets(owner, devices, "ecdsa")
    for key_type in ("ecdsa", "ed25519", "rsa"):  # three root rotations in a row
        _rotate_root(owner, devices, key_type)
    _rotate_targets(owner, devices, "rsa")
    follow_all(devices)
    _fresh_devices_reach(factory, tmp_path / "fresh", 1 + 3 + 2)


# -- several root key holders: 2 of 3 ----------------------------------------------------------


def _second_owner_archive(owner: Owner, name: str) -> Path:
    """Another key holder's own archive: empty until a key is generated into it."""
    path = owner.home / f"{name}.tgz"
    OfflineArchive(factory=owner.factory.name).save(path)
    return path


def _root_status(review: dict[str, Any], channel: str) -> dict[str, Any]:
    status: dict[str, Any] = review["channels"][channel]["status"]
    return status


@sqlite_only
def test_root_threshold_two_of_three_keys(factory: Factory, tmp_path: Path) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    (alice,) = owner.keys(ROOT)
    bob_archive = _second_owner_archive(owner, "bob")
    carol_archive = _second_owner_archive(owner, "carol")

    owner.tufa("keys", "updates", "init", "-m", "three root keys, two to sign")
    owner.tufa("keys", "updates", "add-offline-key", "-r", "root", "-k", str(bob_archive))
    owner.tufa("keys", "updates", "add-offline-key", "-r", "root", "-k", str(carol_archive))
    (bob,) = owner.keys(ROOT, bob_archive)
    (carol,) = owner.keys(ROOT, carol_archive)
    owner.tufa("keys", "updates", "set-threshold", "-r", "root", "2")

    # Nobody has signed: the old root needs alice, the new one two of the three.
    review = owner.review()
    assert review["message"] == "three root keys, two to sign"
    diff = owner.tufa("keys", "updates", "review", "--diff")
    for channel in CHANNELS:
        status = _root_status(review, channel)
        assert status["complete"] is False
        assert status["old_root"] == {
            "threshold": 1,
            "signed": [],
            "missing": 1,
            "can_sign": halves([alice], channel),
        }
        assert status["new_root"] == {
            "threshold": 2,
            "signed": [],
            "missing": 2,
            "can_sign": halves([alice, bob, carol], channel),
        }
        added = halves([bob, carol], channel)
        assert review["channels"][channel]["changes"] == [
            "version 1 -> 2",
            *sorted(f"root: + key {k} (ed25519)" for k in added),
            "root: threshold 1 -> 2",
        ]
        for keyid in added:
            assert diff.count(f"root: + key {keyid} (ed25519)") == 1, diff
    assert diff.count("root: threshold 1 -> 2") == 2, diff  # once per channel

    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    review = owner.review()
    for channel in CHANNELS:
        status = _root_status(review, channel)
        assert status["complete"] is False
        assert status["old_root"]["signed"] == halves([alice], channel)
        assert status["old_root"]["missing"] == 0
        assert status["new_root"]["signed"] == halves([alice], channel)
        assert status["new_root"]["missing"] == 1
        assert status["new_root"]["can_sign"] == halves([bob, carol], channel)
    refused = owner.fails("keys", "updates", "apply")
    assert "1 by keys of the new root" in refused.stderr
    follow_all(devices)  # still version 1

    owner.tufa("keys", "updates", "sign", "-k", str(bob_archive))
    review = owner.review()
    for channel in CHANNELS:
        status = _root_status(review, channel)
        assert status["complete"] is True
        assert status["new_root"]["signed"] == halves([alice, bob], channel)
        assert status["new_root"]["missing"] == 0
    owner.tufa("keys", "updates", "apply")
    trusted = follow_all(devices)
    for channel in CHANNELS:
        assert trusted[channel].root.version == 2
        assert sorted(trusted[channel].root.roles[ROOT].keyids) == halves(
            [alice, bob, carol], channel
        )
        assert trusted[channel].root.roles[ROOT].threshold == 2

    # One archive alone can no longer change the root: rotate-root stages and signs its
    # part, says who else must sign, and leaves the update open.
    refused = owner.fails("keys", "rotate-root", str(owner.archive))
    assert "needs more signatures" in refused.stderr
    assert "tufa keys updates sign -k" in refused.stderr
    (alice2,) = [k for k in owner.keys(ROOT) if k != alice]
    review = owner.review()
    assert review["message"] == "rotate-root"
    for channel in CHANNELS:
        status = _root_status(review, channel)
        assert status["complete"] is False
        assert status["old_root"]["signed"] == halves([alice], channel)
        assert status["old_root"]["missing"] == 1
        assert status["new_root"]["signed"] == halves([alice2], channel)
        assert status["new_root"]["missing"] == 1
        assert served_root(factory, channel).signed.version == 2
    follow_all(devices)

    owner.tufa("keys", "updates", "sign", "-k", str(carol_archive))
    owner.tufa("keys", "updates", "apply", "-k", str(owner.archive))
    trusted = follow_all(devices)
    for channel in CHANNELS:
        root = served_root(factory, channel)
        assert trusted[channel].root == root.signed
        assert root.signed.version == 3
        assert sorted(root.signed.roles[ROOT].keyids) == halves([alice2, bob, carol], channel)
        assert root.signed.roles[ROOT].threshold == 2
        assert sorted(root.signatures) == halves([alice, alice2, carol], channel)
    _fresh_devices_reach(factory, tmp_path / "fresh", 3)


# -- online keys ---------------------------------------------------------------------------


@sqlite_only
def test_online_key_rotation_is_followed_by_both_channels(factory: Factory, tmp_path: Path) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    before = owner.online_keyids()
    (offline_targets,) = owner.keyids(TARGETS)
    prod_before = served_targets(factory, "prod")

    owner.tufa("keys", "updates", "init", "-m", "rotate online keys")
    out = owner.tufa("keys", "updates", "rotate-online-key", "-r", "targets,snapshot,timestamp")
    assert "Staged new online keys" in out
    review = owner.review()
    # Production targets must be re-signed under the new online targets key: the owner's
    # offline targets key has to sign them too.
    assert review["prod_targets"][VIEW] == {
        "complete": False,
        "threshold": 2,
        "signed": [],
        "missing": 1,
        "can_sign": [offline_targets],
    }
    follow_all(devices)  # nothing served changes while the update is open
    assert owner.online_keyids() == before

    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    review = owner.review()
    assert review["prod_targets"][VIEW]["complete"] is True
    assert review["prod_targets"][VIEW]["signed"] == [offline_targets]
    assert all(_root_status(review, c)["complete"] for c in CHANNELS)
    owner.tufa("keys", "updates", "apply")

    after = owner.online_keyids()
    for channel in CHANNELS:
        assert set(after[channel]) == {TARGETS, SNAPSHOT, TIMESTAMP}
        for role in after[channel]:
            assert after[channel][role] != before[channel][role], role
    # Each channel got keys of its own.
    assert not set(after["ci"].values()) & set(after["prod"].values())
    for channel in CHANNELS:
        new = after[channel]
        served = served_metadata(factory, channel)
        root = Metadata[Root].from_bytes(served["root"]).signed
        assert root.version == 2
        for role in (SNAPSHOT, TIMESTAMP):
            assert root.roles[role].keyids == [new[role]]
            assert_signed_by(Metadata.from_bytes(served[role]), root, role, {new[role]})
        for old in before[channel].values():
            assert old not in root.keys
        targets_signers = {new[TARGETS]} | ({offline_targets} if channel == "prod" else set())
        assert set(root.roles[TARGETS].keyids) == {new[TARGETS], offline_targets}
        assert_signed_by(Metadata.from_bytes(served[TARGETS]), root, TARGETS, targets_signers)
    prod_after = served_targets(factory, "prod")
    assert prod_after.signed.version == prod_before.signed.version + 1
    assert prod_after.signed.targets == prod_before.signed.targets

    follow_all(devices)
    follow_all(devices)
    _fresh_devices_reach(factory, tmp_path / "fresh", 2)


@sqlite_only
def test_online_keys_of_one_channel_rotate_alone(factory: Factory, tmp_path: Path) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    before = owner.online_keyids()

    owner.tufa("keys", "updates", "init", "-m", "new CI timestamp key")
    owner.tufa("keys", "updates", "rotate-online-key", "-r", "timestamp", "--channel", "ci")
    review = owner.review()
    assert review["prod_targets"] == {}  # nothing of production needs re-signing
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "apply")

    after = owner.online_keyids()
    assert after["prod"] == before["prod"]
    assert after["ci"][TIMESTAMP] != before["ci"][TIMESTAMP]
    assert {r: k for r, k in after["ci"].items() if r != TIMESTAMP} == {
        r: k for r, k in before["ci"].items() if r != TIMESTAMP
    }
    trusted = follow_all(devices)
    assert trusted["ci"].root.roles[TIMESTAMP].keyids == [after["ci"][TIMESTAMP]]
    assert trusted["prod"].root.roles[TIMESTAMP].keyids == [before["prod"][TIMESTAMP]]


@sqlite_only
def test_a_root_key_is_removed_with_both_halves(factory: Factory, tmp_path: Path) -> None:
    """A key holder who left is removed by either id of their root key; both halves go."""
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    (alice,) = owner.keys(ROOT)
    bob_archive = _second_owner_archive(owner, "bob")
    owner.tufa("keys", "updates", "init", "-m", "bob joins")
    owner.tufa("keys", "updates", "add-offline-key", "-r", "root", "-k", str(bob_archive))
    (bob,) = owner.keys(ROOT, bob_archive)
    assert not bob.is_shared
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "sign", "-k", str(bob_archive))
    owner.tufa("keys", "updates", "apply")
    for channel, trusted in follow_all(devices).items():
        assert sorted(trusted.root.roles[ROOT].keyids) == halves([alice, bob], channel)

    owner.tufa("keys", "updates", "init", "-m", "bob leaves")
    out = owner.tufa(
        "keys", "updates", "delete-offline-key", "-r", "root", "--key-id", bob.prod.keyid
    )
    assert f"remove root key {bob.prod.keyid}" in out
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "apply")
    for channel, trusted in follow_all(devices).items():
        assert trusted.root.roles[ROOT].keyids == halves([alice], channel)
        assert not set(bob.keyids) & set(trusted.root.keys)
    pairs = owner.json("factory", "show")["root_key_pairs"]
    assert pairs == [{"ci": alice.ci.keyid, "prod": alice.prod.keyid}]


# -- retired keys in copies and backups -------------------------------------------------------


@sqlite_only
def test_copies_and_backups_leave_retired_keys_out_unless_asked(
    factory: Factory, tmp_path: Path
) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    (old_root,) = owner.keyids(ROOT)
    (old_targets,) = owner.keyids(TARGETS)
    owner.tufa("keys", "rotate-root", str(owner.archive))
    owner.tufa("keys", "rotate-targets", str(owner.archive))
    (new_root,) = owner.keyids(ROOT) - {old_root}
    (new_targets,) = owner.keyids(TARGETS) - {old_targets}
    # A key generated for an update not applied yet is no retired key: it is kept.
    owner.tufa("keys", "updates", "init", "-m", "pending key")
    owner.tufa("keys", "updates", "add-offline-key", "-r", "root", "-k", str(owner.archive))
    (pending,) = owner.keyids(ROOT) - {old_root, new_root}

    def backed_up(*flags: str) -> tuple[str, set[str]]:
        out = tmp_path / f"backup{'-'.join(flags)}.txt"
        printed = owner.tufa("keys", "backup", str(owner.archive), "--out", str(out), *flags)
        restored = tmp_path / f"restored{'-'.join(flags)}.tgz"
        owner.tufa("keys", "restore", str(out), "--out", str(restored))
        return printed, owner.keyids(ROOT, restored)

    printed, restored = backed_up()
    assert restored == {new_root, pending}
    assert f"Left out: retired root key {old_root}" in printed
    assert "--include-retired keeps it" in printed
    assert backed_up("--include-retired")[1] == {old_root, new_root, pending}

    def copied(*flags: str) -> tuple[str, set[str]]:
        copy = tmp_path / f"targets{'-'.join(flags)}.tgz"
        printed = owner.tufa("keys", "copy-targets", str(owner.archive), str(copy), *flags)
        return printed, owner.keyids(TARGETS, copy)

    printed, targets = copied()
    assert targets == {new_targets}
    assert f"Left out:     retired targets key {old_targets}" in printed
    assert copied("--include-retired")[1] == {old_targets, new_targets}
    left_out = owner.json(
        "keys", "copy-targets", str(owner.archive), str(tmp_path / "targets-json.tgz")
    )["left_out"]
    assert left_out["retired_targets_keyids"] == [old_targets]


# -- signing on an air-gapped machine ----------------------------------------------------------


@sqlite_only
def test_air_gapped_signing_through_an_exported_file(factory: Factory, tmp_path: Path) -> None:
    owner = Owner.start(factory, tmp_path / "owner")
    devices = provision(factory, tmp_path / "devices")
    follow_all(devices)
    (root_key,) = owner.keys(ROOT)
    (old_targets,) = owner.keyids(TARGETS)

    owner.tufa("keys", "updates", "init", "-m", "signed offline")
    owner.tufa("keys", "updates", "extend-expiry", "--days", "500")
    owner.tufa("keys", "updates", "rotate-offline-key", "-r", "targets", "-k", str(owner.archive))
    (new_targets,) = owner.keyids(TARGETS) - {old_targets}
    exported = tmp_path / "update.json"
    owner.tufa("keys", "updates", "export", str(exported))
    assert exported.stat().st_mode & 0o777 == 0o600
    data = json.loads(exported.read_text())
    assert data["factory"] == factory.name
    for channel in CHANNELS:
        assert data["staged"][channel]["signatures"] == []
    assert data["prod_targets"][VIEW]["signatures"] == []

    # The offline machine has no server: nothing listens where TUFA_SERVER points, and
    # there is no token, factory or config file.
    offline_env = {
        "TUFA_SERVER": f"http://127.0.0.1:{free_port()}",
        "TUFA_CONFIG": str(tmp_path / "offline" / "no-config.json"),
        "TUFA_FACTORY": "not-a-factory",
        "TUFA_TOKEN": "tufa_not_a_token",
    }
    out = owner.tufa("keys", "sign-file", str(exported), "-k", str(owner.archive), env=offline_env)
    assert "ready" in out
    signed = json.loads(exported.read_text())
    for channel in CHANNELS:
        assert [s["keyid"] for s in signed["staged"][channel]["signatures"]] == halves(
            [root_key], channel
        )
    assert [s["keyid"] for s in signed["prod_targets"][VIEW]["signatures"]] == [new_targets]
    # Until imported, the server has none of these signatures.
    review = owner.review()
    assert not any(_root_status(review, c)["complete"] for c in CHANNELS)
    assert review["prod_targets"][VIEW]["missing"] == 1

    owner.tufa("keys", "updates", "import", str(exported))
    review = owner.review()
    assert all(_root_status(review, c)["complete"] for c in CHANNELS)
    assert review["prod_targets"][VIEW]["complete"] is True
    owner.tufa("keys", "updates", "apply", "-k", str(owner.archive))

    trusted = follow_all(devices)
    online = {c: online_keyids(factory, c)[TARGETS] for c in CHANNELS}
    for channel in CHANNELS:
        root = trusted[channel].root
        assert root.version == 2
        assert abs(root.expires - (datetime.now(UTC) + timedelta(days=500))) < timedelta(hours=1)
        assert set(root.roles[TARGETS].keyids) == {online[channel], new_targets}
    assert_signed_by(
        served_targets(factory, "prod"),
        trusted["prod"].root,
        TARGETS,
        {online["prod"], new_targets},
    )
    archive = OfflineArchive.load(owner.archive)
    assert Metadata[Root].from_bytes(archive.roots[Channel.PROD]).signed.version == 2
    _fresh_devices_reach(factory, tmp_path / "fresh", 2)


@sqlite_only
def test_signing_refuses_staged_roots_that_break_a_rule(factory: Factory, tmp_path: Path) -> None:
    """Whoever staged them (a compromised server, a file altered on its way to the
    air-gapped machine), roots that break a rule get no signature of the owner's: here a
    production root whose online key alone would sign targets."""
    owner = Owner.start(factory, tmp_path / "owner")
    owner.tufa("keys", "updates", "init", "-m", "longer roots")
    owner.tufa("keys", "updates", "extend-expiry", "--days", "400")
    exported = tmp_path / "update.json"
    owner.tufa("keys", "updates", "export", str(exported))
    data = json.loads(exported.read_text())
    data["staged"]["prod"]["signed"]["roles"]["targets"]["threshold"] = 1
    exported.write_text(json.dumps(data))

    refused = owner.fails("keys", "sign-file", str(exported), "-k", str(owner.archive))

    assert "refusing to sign: prod root: the targets threshold must be at least 2" in (
        refused.stderr
    )
    for channel in CHANNELS:
        assert json.loads(exported.read_text())["staged"][channel]["signatures"] == []


# -- attacks with stolen keys ------------------------------------------------------------------


def stolen_online_signers(server: Server, factory: Factory, channel: str) -> dict[str, Signer]:
    """`channel`'s online keys in force, decrypted from the server's database with its
    master key: what an attacker who took the server's disk has."""
    master = MasterKey.load(server.local.data_dir / "master.key")
    engine = create_engine(server.local.db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(db.online_keys)
                .join(db.factories, db.factories.c.id == db.online_keys.c.factory_id)
                .where(
                    db.factories.c.name == factory.name,
                    db.online_keys.c.channel == channel,
                    db.online_keys.c.pending.is_(False),
                    db.online_keys.c.retired_at.is_(None),
                )
            ).all()
    finally:
        engine.dispose()
    signers: dict[str, Signer] = {}
    for row in rows:
        private = master.decrypt(row.private_encrypted, f"online-key:{row.keyid}")
        signers[row.role] = KeyPair.from_pem(private, key_from_json(row.public.encode())).signer()
    assert set(signers) == {TARGETS, SNAPSHOT, TIMESTAMP}
    return signers


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A plain static HTTP server on loopback: the attacker's mirror."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


EVIL_PATH = "evil-firmware.bin"


def forge_repository(
    factory: Factory,
    channel: str,
    targets_signers: list[Signer],
    stolen: dict[str, Signer],
    directory: Path,
) -> int:
    """Write a copy of the channel's served metadata with one more targets version that
    adds a malicious target, signed by `targets_signers`, and a snapshot and timestamp
    naming it, signed by the stolen online keys. Return the forged targets version."""
    served = served_metadata(factory, channel)
    targets = Metadata[Targets].from_bytes(served[TARGETS])
    targets.signed.version += 1
    evil = TargetFile.from_data(EVIL_PATH, b"the attacker's firmware")
    targets.signed.targets[EVIL_PATH] = evil
    targets.signatures.clear()
    for signer in targets_signers:
        targets.sign(signer, append=True)
    write_forged_mirror(served, targets, stolen, directory / "metadata")
    return targets.signed.version


# id -> (channel, whose keys sign the forged targets, whether the device must accept it)
ATTACKS = {
    "prod-online-key-alone": ("prod", ("online",), False),
    "prod-offline-key-alone": ("prod", ("offline",), False),
    # Controls: the forgery itself is sound, so the refusals above come from the threshold.
    "prod-online-and-offline-keys": ("prod", ("online", "offline"), True),
    "ci-online-key-alone": ("ci", ("online",), True),  # the documented CI trust model
}


@sqlite_only
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_stolen_keys_and_what_devices_accept(
    server: Server, factory: Factory, tmp_path: Path, attack: str
) -> None:
    channel, holders, accepted = ATTACKS[attack]
    owner = Owner.start(factory, tmp_path / "owner")
    stolen = stolen_online_signers(server, factory, channel)
    (offline,) = OfflineArchive.load(owner.archive).keys_for(TARGETS)
    by_holder = {"online": stolen[TARGETS], "offline": offline.prod.signer()}
    device = Device.provision(factory, channel, tmp_path / "device")
    honest = device.follow().targets

    # The device's trusted state, as it would be when the attacker's mirror answers.
    attacked_dir = tmp_path / "attacked"
    shutil.copytree(device.trust_dir, attacked_dir)
    mirror = tmp_path / "mirror"
    forged_version = forge_repository(
        factory, channel, [by_holder[h] for h in holders], stolen, mirror
    )
    with serve_directory(mirror) as url:
        updater = Updater(
            str(attacked_dir),
            f"{url}/metadata/",
            target_base_url=f"{url}/targets/",
            bootstrap=None,  # what the device trusts: its stored, current root
        )
        if accepted:
            updater.refresh()
            found = updater.get_targetinfo(EVIL_PATH)
            assert found is not None
            assert updater._trusted_set.targets.version == forged_version
            return
        with pytest.raises(UnsignedMetadataError, match="targets"):
            updater.refresh()

    # The forged targets never became trusted: the stored copy is the honest one.
    kept = Metadata[Targets].from_file(str(attacked_dir / "targets.json")).signed
    assert kept == honest
    assert EVIL_PATH not in kept.targets
    assert kept.version == forged_version - 1
    # And the real repository still serves the device without the attacker's target.
    assert EVIL_PATH not in device.follow().targets.targets
