"""Factories created before the channels were separated (ADR 0009), upgraded in place.

The fixture is a real factory made by the last release before the separation (see
`tests/legacy_factory.py`): one root key and one set of online keys for both channels.
After the upgrade it must serve exactly what it served, warn its owner, and keep its
devices updating; its next root update must separate the channels, and from then on no
file of one channel, old or new, may verify for a device of the other.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from tuf.api.metadata import Metadata, Root

from tests.agent_helpers import TamperingProxy, publish_build
from tests.channel_attacks import (
    CHANNELS,
    ChannelFiles,
    ChannelSwap,
    NgclientDevice,
    assert_all_refused,
    attempt,
    follow,
    other,
    record,
    register_devices,
    substitutions,
)
from tests.conftest import BACKENDS
from tests.helpers import (
    Factory,
    Server,
    cli_env,
    db_rows,
    dump_all_tables,
    online_keyids,
    run_cli,
    send,
)
from tests.legacy_factory import ADMIN_TOKEN, FIXTURE, NAME, archive_copy, install
from tests.test_rotations import Owner
from tests.test_waves import release
from tufa.core.archive import FIRST_ROOT_KEY_NAME, OfflineArchive
from tufa.core.metadata import ROOT, TARGETS
from tufa.server import db


@dataclass
class Legacy:
    server: Server
    factory: Factory
    owner: Owner


@pytest.fixture(params=BACKENDS)
def legacy(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
) -> Legacy:
    backend: str = request.param
    db_url = make_db_url(backend)
    install(tmp_path / "data", db_url)
    server = make_server(backend, data_dir=tmp_path / "data", db_url=db_url)
    factory = Factory(server, NAME, ADMIN_TOKEN)
    home = tmp_path / "owner"
    owner = Owner(factory, home, cli_env(factory, home / "config.json"))
    archive_copy(owner.archive)
    return Legacy(server, factory, owner)


def _timestamp_version(factory: Factory, channel: str, credential: str) -> int:
    path = factory.path(f"/repo/{channel}/metadata/timestamp.json")
    served = send(factory.server, "GET", path, credential)
    assert served.status_code == 200, served.text
    version: int = json.loads(served.content)["signed"]["version"]
    return version


def _fixture_root_v1(channel: str) -> bytes:
    """The bytes the server stored, and served, as `channel`'s 1.root.json."""
    rows = json.loads((FIXTURE / "tables.json").read_text())["metadata_files"]
    (row,) = [r for r in rows if (r["channel"], r["role"], r["version"]) == (channel, ROOT, 1)]
    return base64.b64decode(row["body"]["b64"])


def _root(factory: Factory, channel: str) -> Root:
    path = factory.path(f"/repo/{channel}/metadata/root.json")
    return (
        Metadata[Root]
        .from_bytes(send(factory.server, "GET", path, factory.admin_token).content)
        .signed
    )


def test_an_upgraded_factory_serves_what_it_served_and_warns_its_owner(
    legacy: Legacy, tmp_path: Path
) -> None:
    factory, owner = legacy.factory, legacy.owner
    for channel in CHANNELS:
        path = factory.path(f"/repo/{channel}/metadata/1.root.json")
        served = send(factory.server, "GET", path, factory.admin_token).content
        assert served == _fixture_root_v1(channel)
    # The online keys were copied to both channels: the same keys, nothing re-signed.
    assert online_keyids(factory, "ci") == online_keyids(factory, "prod")

    shown = owner.json("factory", "show")
    assert shown["channels_share_keys"]
    assert shown["first_separated_root_version"] is None
    (warning,) = [w for w in shown["warnings"] if "share" in w]
    assert "tufa keys rotate-root ARCHIVE" in warning
    table = owner.tufa("keys", "show-root", "-k", str(owner.archive))
    assert "one key for both channels: rotate it" in table
    for args in (("keys", "show-root", "--prod"), ("keys", "show-root", "--json")):
        done = run_cli(*args, env=owner.env)
        assert done.returncode == 0, done.stderr
        assert "still share" in done.stderr
        assert "tufa keys rotate-root ARCHIVE" in done.stderr

    # Its devices keep updating: CI builds 1 and 2, production release 1.
    with TamperingProxy(factory.server.url) as proxy:
        follow(register_devices(factory, proxy, tmp_path / "devices"), {"ci": "2", "prod": "1"})


def test_before_the_separation_the_other_channels_files_verify(
    legacy: Legacy, tmp_path: Path
) -> None:
    """The exposure the separation ends, staged with the same harness that must find
    nothing after it: a production device trusts the CI channel's timestamp (both are
    signed by the one timestamp key), and then refuses its own channel's (a freeze)."""
    factory = legacy.factory
    with TamperingProxy(factory.server.url) as proxy:
        swap = ChannelSwap(proxy)
        device = NgclientDevice.register(factory, "prod", proxy, tmp_path / "prod")
        # CI's timestamp versions run ahead of the one production serves the device,
        # whatever the start-up re-signing of the fixture's expired files did to either.
        served = _timestamp_version(factory, "prod", device.credential)
        ci_device = factory.register_device("ci")["credential"]
        for build in range(3, 23):
            publish_build(factory, str(build))
            ci = record(factory, "ci", ChannelFiles(), credentials=[ci_device])
            newest = max(ci.timestamps, key=lambda t: json.loads(t)["signed"]["version"])
            if json.loads(newest)["signed"]["version"] > served:
                break
        ci_timestamp = substitutions(ci)[f"timestamp-v{json.loads(newest)['signed']['version']}"]
        found = attempt(swap, "ngclient-prod", device, "ci-timestamp", ci_timestamp, ci)
        assert found.accepted == ["timestamp.json"], found
        with pytest.raises(Exception, match="version"):
            device.refresh()  # frozen: its own channel's timestamp is now "a rollback"


def test_rotate_root_separates_the_channels(legacy: Legacy, tmp_path: Path) -> None:
    factory, owner = legacy.factory, legacy.owner
    before = {c: online_keyids(factory, c) for c in CHANNELS}
    with TamperingProxy(factory.server.url) as proxy:
        swap = ChannelSwap(proxy)
        devices = register_devices(factory, proxy, tmp_path / "devices")
        follow(devices, {"ci": "2", "prod": "1"})
        files = {c: record(factory, c, ChannelFiles()) for c in CHANNELS}

        out = owner.tufa("keys", "rotate-root", str(owner.archive))

        assert "Rotated the root key" in out
        assert owner.json("factory", "show")["first_separated_root_version"] == 2
        roots = {c: _root(factory, c) for c in CHANNELS}
        assert not set(roots["ci"].roles[ROOT].keyids) & set(roots["prod"].roles[ROOT].keyids)
        after = {c: online_keyids(factory, c) for c in CHANNELS}
        assert not set(after["ci"].values()) & set(after["prod"].values())
        # Production keeps its online targets key (its releases stay valid); everything
        # else is new.
        assert after["prod"][TARGETS] == before["prod"][TARGETS]
        for channel in CHANNELS:
            for role, keyid in after[channel].items():
                if (channel, role) != ("prod", TARGETS):
                    assert keyid != before[channel][role], (channel, role)
        shown = owner.json("factory", "show")
        assert shown["channels_share_keys"] == []
        assert not [w for w in shown["warnings"] if "share" in w]
        archive = OfflineArchive.load(owner.archive)
        old, new = archive.keys_for(ROOT)
        assert old.name == FIRST_ROOT_KEY_NAME
        assert old.is_shared
        assert not new.is_shared
        assert roots["ci"].roles[ROOT].keyids == [new.ci.keyid]
        assert roots["prod"].roles[ROOT].keyids == [new.prod.keyid]
        with tarfile.open(owner.archive) as tar:
            assert f"keys/{FIRST_ROOT_KEY_NAME}.sec" in tar.getnames()  # nothing renamed

        # The transition itself is the last exposure: both version-2 roots are signed by
        # the shared old root key, so a device still on version 1 verifies the other
        # channel's. ngclient accepts it (staged on a copy of each ngclient device);
        # tufa-agent refuses it, and keeps what it runs.
        for channel in CHANNELS:
            record(factory, channel, files[channel])
        for name, device in devices.items():
            foreign = files[other(device.channel)]
            swap_root = substitutions(foreign)["root-v2"]
            if isinstance(device, NgclientDevice):
                scratch = dataclasses.replace(device, trust_dir=tmp_path / f"{name}-window")
                shutil.copytree(device.trust_dir, scratch.trust_dir)
                found = attempt(swap, name, scratch, "root-v2", swap_root, foreign)
                assert found.accepted == ["root.json"], found
            else:
                found = attempt(swap, name, device, "root-v2", swap_root, foreign)
                assert found.refused, found
                assert "it is a root of the" in found.said, found.said
                assert not found.accepted, found
                assert found.installed_after == found.installed_before
        follow(devices, {"ci": "2", "prod": "1"})  # each device takes its own new root

        # From now on every file of the other channel, from before the separation and
        # after it, is refused by every device, and nobody froze.
        publish_build(factory, "3")
        release(owner, "release-3", "3")
        for channel in CHANNELS:
            record(factory, channel, files[channel])
        assert assert_all_refused(swap, devices, files, "the separation") > 40
        follow(devices, {"ci": "3", "prod": "3"})

        # A device provisioned from now on with the first separated root (version 2,
        # as `factory show` says) is never exposed: from version 1, it still is.
        late = {
            f"from-v{version}": NgclientDevice.register(
                factory, "prod", proxy, tmp_path / f"late-v{version}", root_version=version
            )
            for version in (1, 2)
        }
        ci_root_v2 = substitutions(files["ci"])["root-v2"]
        exposed = attempt(swap, "from-v1", late["from-v1"], "root-v2", ci_root_v2, files["ci"])
        assert exposed.accepted == ["root.json"], exposed
        assert assert_all_refused(swap, {"from-v2": late["from-v2"]}, files, "late") > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_root_update_left_open_across_the_upgrade_is_cancelled(
    backend: str,
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
) -> None:
    """It could never be applied: only an update opened after the upgrade stages the
    online keys that separate the channels. The owner opens it again."""
    db_url = make_db_url(backend)
    install(tmp_path / "data", db_url, open_update=True)
    server = make_server(backend, data_dir=tmp_path / "data", db_url=db_url)
    factory = Factory(server, NAME, ADMIN_TOKEN)
    assert factory.request("GET", "/keys/updates").status_code == 404
    assert db_rows(server, select(db.root_updates)) == []
    assert db_rows(server, select(db.online_keys).where(db.online_keys.c.pending)) == []
    home = tmp_path / "owner"
    owner = Owner(factory, home, cli_env(factory, home / "config.json"))
    archive_copy(owner.archive)
    owner.tufa("keys", "rotate-root", str(owner.archive))
    assert owner.json("factory", "show")["channels_share_keys"] == []


def test_other_root_updates_name_the_command_that_separates_the_channels(
    legacy: Legacy,
) -> None:
    owner = legacy.owner
    before = dump_all_tables(legacy.server)
    refused = owner.fails("keys", "rotate-targets", str(owner.archive))
    assert "tufa keys rotate-root ARCHIVE" in refused.stderr, refused.stderr
    assert dump_all_tables(legacy.server) == before

    # In a transaction: any edit, and any signature, is refused until the shared root
    # key is replaced.
    owner.tufa("keys", "updates", "init", "-m", "longer roots")
    staged = owner.review()
    assert staged["channels"]["ci"]["status"]["complete"] is False
    for args in (("extend-expiry", "--days", "400"), ("sign", "-k", str(owner.archive))):
        refused = owner.fails("keys", "updates", *args)
        assert "the CI and production roots share key" in refused.stderr, refused.stderr
        assert "rotate-offline-key -r root" in refused.stderr
    owner.tufa("keys", "updates", "rotate-offline-key", "-r", "root", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "extend-expiry", "--days", "400")
    owner.tufa("keys", "updates", "sign", "-k", str(owner.archive))
    owner.tufa("keys", "updates", "apply", "-k", str(owner.archive))
    assert owner.json("factory", "show")["channels_share_keys"] == []
    # And now the targets key rotates as on any factory.
    owner.tufa("keys", "rotate-targets", str(owner.archive))
