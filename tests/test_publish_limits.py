"""No CI token can break every device: limits on what a publish may put in the metadata
that every device downloads, and `tufa targets delete`.

Staged on real servers (both backends), with python-tuf's ngclient at its default
limits and real `tufa-agent` processes as the devices:

- targets at every per-target limit (name, url, custom, labels) publish and reach a
  device; over them, a 4xx names the field and the limit (the bad-input table of
  tests/test_ci_publishing.py);
- a CI token publishing the fattest targets allowed, publish after publish, is refused
  before the CI targets metadata outgrows what ngclient accepts by default, with a
  message saying how to prune or delete; devices keep updating; deleting makes room;
- a wave that would outgrow it is refused before anyone signs, until pruned;
- `tufa targets delete` removes targets in one publish or not at all, and production
  keeps serving what its releases list;
- custom "url" means one thing: tufa writes it from the target's `url`, tufa-agent
  downloads from it, and nobody may set it any other way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import UpdaterConfig

from tests.agent_helpers import AgentDevice, build_bytes, image_name, publish_build
from tests.helpers import (
    Factory,
    assert_error,
    cli_env,
    dump_all_tables,
    run_cli,
    send,
    served_metadata,
    target_updater,
)
from tests.test_prod_downloads import act, wave
from tests.test_waves import post_wave, prepared, start_owner
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS
from tufa.demo.impostor import FileServer
from tufa.server.publishing import (
    MAX_CUSTOM_BYTES,
    MAX_CUSTOM_DEPTH,
    MAX_LABELS,
    MAX_TARGETS_BYTES,
    MAX_URL_LENGTH,
)

HARDWARE_ID, TAG = "rpi4", "main"
# python-tuf's ngclient with DEFAULT settings: what any TUF client out there may use.
NGCLIENT_DEFAULT = UpdaterConfig()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def post(factory: Factory, suffix: str, body: dict[str, Any], token: str) -> httpx.Response:
    return send(factory.server, "POST", factory.path(suffix), token, json=body)


def ci_env(factory: Factory, tmp_path: Path) -> dict[str, str]:
    return cli_env(factory, tmp_path / "ci-config.json") | {"TUFA_TOKEN": factory.token("ci")}


def label(n: int, prefix: str) -> str:
    return f"{prefix}{n:03d}".ljust(128, "x")


def fattest(prefix: str, i: int, version: str = "1", *, tags: int = 1) -> dict[str, Any]:
    """An external target as large as a publish allows: every field at its limit, with
    one hardware id and `tags` tags (each pair is a view the target is signed into)."""
    name = f"{prefix}-{i:05d}-".ljust(255, "n")
    notes = "n" * (MAX_CUSTOM_BYTES - len('{"notes":""}'))
    return {
        "name": name,
        "version": version,
        "hardware_ids": [HARDWARE_ID],
        "tags": [TAG, *(label(k, "tag") for k in range(tags - 1))],
        "url": "https://cdn.example.com/".ljust(MAX_URL_LENGTH, "u"),
        "sha256": sha256(name.encode()),
        "length": 1,
        "custom": {"notes": notes},
    }


def nested(levels: int) -> dict[str, Any]:
    """A custom object `levels` deep (itself one level)."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"in": value}
    return value


# -- per-target limits ---------------------------------------------------------------------


def test_a_target_at_every_limit_is_published_and_reaches_devices(
    factory: Factory, tmp_path: Path
) -> None:
    at_limits = fattest("edge", 1, tags=MAX_LABELS) | {"custom": nested(MAX_CUSTOM_DEPTH)}
    assert len(json.dumps(fattest("edge", 1)["custom"], separators=(",", ":"))) == 4096
    many_hardware = fattest("edge", 2) | {
        "hardware_ids": [HARDWARE_ID, *(label(k, "hw") for k in range(MAX_LABELS - 1))]
    }
    for item in (fattest("edge", 0, tags=MAX_LABELS), at_limits, many_hardware):
        added = post(factory, "/targets", {"targets": [item]}, factory.admin_token)
        assert added.status_code == 201, added.text
    device = factory.register_device("ci")["credential"]
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    info = updater.get_targetinfo(at_limits["name"])
    assert info is not None
    assert info.custom["in"] == nested(MAX_CUSTOM_DEPTH)["in"]
    assert len(info.custom["tags"]) == MAX_LABELS
    assert info.custom["url"] == at_limits["url"]


# -- the size of the CI targets metadata -----------------------------------------------------


def publish_fattest(
    factory: Factory, token: str, names: Iterator[int], count: int
) -> httpx.Response:
    items = [fattest("fat", next(names)) for _ in range(count)]
    return post(factory, "/targets", {"targets": items}, token)


def test_a_ci_token_cannot_make_the_ci_targets_too_large_for_devices(
    factory: Factory, tmp_path: Path
) -> None:
    token = factory.token("ci")
    agent = AgentDevice.register(factory, tmp_path / "devices")
    numbers = iter(range(100_000))
    # Fill the CI targets with the fattest targets allowed, as many per publish as one
    # request body holds, then fewer and fewer, until not even one more fits.
    batch, refusal = 100, None
    for _publish in range(30):  # the limit holds about 750 of them: some 14 publishes
        if not batch:
            break
        before = dump_all_tables(factory.server)
        answer = publish_fattest(factory, token, numbers, batch)
        if answer.status_code == 201:
            continue
        assert_error(
            answer,
            409,
            "targets_too_large",
            f"the CI targets of hardware id {HARDWARE_ID!r} and tag {TAG!r} would be",
        )
        assert dump_all_tables(factory.server) == before
        refusal = answer.json()["error"]["message"]
        batch //= 2
    assert not batch, "the server never refused to grow the CI targets"
    assert refusal is not None
    for advice in ("tufa targets prune --keep N", "tufa targets delete NAME...", "5000000"):
        assert advice in refusal, refusal
    served = served_metadata(factory, "ci")["targets"]
    published = Metadata[Targets].from_bytes(served).signed.targets
    # Full to within one target of the limit, and below what ngclient accepts.
    assert MAX_TARGETS_BYTES - 2 * len(served) / len(published) < len(served) <= MAX_TARGETS_BYTES
    assert NGCLIENT_DEFAULT.targets_max_length > MAX_TARGETS_BYTES

    # Devices keep updating: ngclient at its default limits, and tufa-agent.
    device = factory.register_device("ci")["credential"]
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    listed = updater._trusted_set.targets.targets
    assert set(listed) == set(published)
    checked = agent.agent("check", "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["install"]["version"] == "1"

    # The way out the refusal names: delete some, and the next publish fits again.
    env = ci_env(factory, tmp_path)
    doomed = sorted(listed)[:3]
    deleted = run_cli("targets", "delete", *doomed, "--json", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["removed"] == doomed
    assert publish_fattest(factory, token, numbers, 2).status_code == 201
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    assert not set(doomed) & set(updater._trusted_set.targets.targets)


def test_a_wave_too_large_for_devices_is_refused_until_pruned(
    factory: Factory, tmp_path: Path
) -> None:
    """Production targets grow with every wave that keeps older builds. Build 1 (over
    half the limit) is released, deleted from CI (production keeps it), and build 2 of
    the same size published: the wave of build 2 is refused before anyone signs it,
    and goes through once it leaves build 1 out."""
    owner = start_owner(factory, tmp_path / "owner")
    numbers = iter(range(100_000))
    builds: dict[str, list[str]] = {}
    for version in ("1", "2"):
        # Over half the limit in production, and under it in CI.
        items = [fattest("fat", next(numbers), version) for _ in range(400)]
        for start in range(0, len(items), 100):
            batch = {"targets": items[start : start + 100]}
            assert post(factory, "/targets", batch, factory.admin_token).status_code == 201
        builds[version] = [item["name"] for item in items]
        if version == "1":
            wave(owner, "w-1", "1", TAG)
            act(owner, "w-1", "complete")
            doomed = {"names": builds["1"]}
            deleted = post(factory, "/targets/delete", doomed, factory.admin_token)
            assert deleted.status_code == 200, deleted.text

    before = dump_all_tables(factory.server)
    body = {"tag": TAG, "version": "2", "prune": [], "expires_days": 30}
    refused = post(factory, "/waves/prepare", body, factory.admin_token)
    assert_error(refused, 409, "targets_too_large", f"the production targets of tag {TAG!r}")
    assert "--prune V1,V2" in refused.json()["error"]["message"]
    assert dump_all_tables(factory.server) == before
    # Built and signed by hand rather than from `prepare`: refused the same.
    whole = prepared(factory, "2", prune=("1",))
    kept = Metadata[Targets].from_bytes(fetch_tag_targets(factory, TAG)).signed.targets
    whole.signed.targets = {**kept, **whole.signed.targets}
    for key in OfflineArchive.load(owner.archive).keys_for(TARGETS):
        whole.sign(key.prod.signer(), append=True)
    refused = post_wave(factory, "w-2", "2", whole)
    assert_error(refused, 409, "targets_too_large", "Nothing was published")
    assert dump_all_tables(factory.server) == before

    wave(owner, "w-2", "2", TAG, prune=("1",))
    act(owner, "w-2", "complete")
    device = factory.register_device("prod")["credential"]
    updater = target_updater(factory, "prod", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    assert set(updater._trusted_set.targets.targets) == set(builds["2"])


def fetch_tag_targets(factory: Factory, tag: str) -> bytes:
    """The production targets devices of `tag` are served now."""
    base = factory.path("/repo/prod/metadata/")
    token = factory.admin_token
    timestamp = send(factory.server, "GET", f"{base}timestamp.json?tag={tag}", token).json()
    snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = send(factory.server, "GET", f"{base}{snapshot_version}.snapshot.json", token).json()
    targets_version = snapshot["signed"]["meta"]["targets.json"]["version"]
    return send(factory.server, "GET", f"{base}{targets_version}.targets.json", token).content


# -- tufa targets delete ---------------------------------------------------------------------


def test_delete_removes_targets_in_one_publish_or_none(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    for version in ("1", "2", "3"):
        publish_build(factory, version, build_bytes(version, 1024))
    device = factory.register_device("ci")["credential"]

    def poll() -> Targets:
        """A CI device's next poll (ngclient over the metadata it trusts on disk)."""
        updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
        updater.refresh()
        return updater._trusted_set.targets

    version_before = poll().version

    # A name not in the CI targets refuses the whole command: nothing changes.
    state = dump_all_tables(factory.server)
    metadata = served_metadata(factory, "ci")
    for names in (["rpi4-image-1", "no-such-image"], ["rpi4-image-1", "rpi4-image-1"]):
        refused = run_cli("targets", "delete", *names, env=env)
        assert refused.returncode == 1, refused.stdout
        assert "no-such-image" in refused.stderr or "twice" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    assert run_cli("targets", "delete", env=env).returncode == 2  # no NAME: usage error
    api = post(factory, "/targets/delete", {"names": ["rpi4-image-1", 7]}, factory.admin_token)
    assert_error(api, 400, "bad_request", "'names'")
    assert dump_all_tables(factory.server) == state
    assert served_metadata(factory, "ci") == metadata

    # Two at once: one new targets version without them.
    done = run_cli("targets", "delete", "rpi4-image-1", "rpi4-image-2", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Removed rpi4-image-1 from CI targets.",
        "Removed rpi4-image-2 from CI targets.",
        f"CI targets version {version_before + 1}.",
    ]
    polled = poll()
    assert polled.version == version_before + 1
    assert set(polled.targets) == {"rpi4-image-3"}
    gone = run_cli("targets", "delete", "rpi4-image-1", env=env)
    assert gone.returncode == 1
    assert "not in the CI targets: rpi4-image-1" in gone.stderr
    shown = json.loads(run_cli("targets", "show", "rpi4-image-1", "--json", env=env).stdout)
    assert shown["pruned_at"] is not None

    # Published again, identical, it is back.
    publish_build(factory, "1", build_bytes("1", 1024))
    assert set(poll().targets) == {"rpi4-image-1", "rpi4-image-3"}
    helped = run_cli("targets", "delete", "--help")
    assert "Example:" in helped.stdout
    assert "tufa targets delete rpi4-image-40" in helped.stdout


def test_deleting_a_released_target_keeps_production_working(
    factory: Factory, tmp_path: Path
) -> None:
    """Build 1 is released to production, then deleted from CI: production devices
    (real `tufa-agent` processes, one registered only after the delete) still install
    it, CI devices no longer see it, and the next wave still carries it."""
    owner = start_owner(factory, tmp_path / "owner")
    publish_build(factory, "1")
    wave(owner, "w-1", "1", TAG)
    act(owner, "w-1", "complete")
    early = AgentDevice.register(factory, tmp_path / "devices", "prod", name="early")
    ci = AgentDevice.register(factory, tmp_path / "devices", "ci", name="ci")

    done = run_cli("targets", "delete", image_name("1"), env=ci_env(factory, tmp_path))
    assert done.returncode == 0, done.stderr
    late = AgentDevice.register(factory, tmp_path / "devices", "prod", name="late")
    for device in (early, late):
        ran = device.run_once()
        assert ran.returncode == 0, ran.stderr
        assert device.installed_version() == "1"
        assert device.running_bytes() == build_bytes("1")
    checked = ci.agent("check", "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["install"] is None

    # The next release builds on production's own list, which still holds build 1.
    publish_build(factory, "2")
    assert set(prepared(factory, "2").signed.targets) == {image_name("1"), image_name("2")}
    wave(owner, "w-2", "2", TAG)
    act(owner, "w-2", "complete")
    ran = early.run_once()
    assert ran.returncode == 0, ran.stderr
    assert early.running_bytes() == build_bytes("2")


# -- custom "url" ----------------------------------------------------------------------------


@pytest.fixture
def cdn() -> Iterator[FileServer]:
    with ExitStack() as stack:
        host = FileServer({"/app-7.bin": build_bytes("7")})
        stack.callback(host.close)
        yield host


def test_custom_url_means_the_same_to_server_and_agent(
    factory: Factory, tmp_path: Path, cdn: FileServer
) -> None:
    """tufa-agent downloads a target from its custom "url". The server writes that key
    from the target's own `url` only, which makes it an external target; a custom "url"
    given any other way is refused, since the server would serve its uploaded file and
    the agent fetch from elsewhere."""
    env = ci_env(factory, tmp_path)
    data = build_bytes("7")
    (tmp_path / "app-7.bin").write_bytes(data)
    uploaded = send(factory.server, "PUT", factory.path(f"/blobs/{sha256(data)}"),
                    factory.admin_token, content=data)  # fmt: skip
    assert uploaded.status_code == 201  # so the CLI's upload below changes nothing
    base = ("targets", "add", "app-7", "--version", "7", "--hardware-id", HARDWARE_ID, "--tag", TAG)
    external = (
        "--url",
        f"{cdn.url}/app-7.bin",
        "--sha256",
        sha256(data),
        "--length",
        str(len(data)),
    )
    state = dump_all_tables(factory.server)
    custom = json.dumps({"url": f"{cdn.url}/app-7.bin"})
    for how in (("--file", str(tmp_path / "app-7.bin")), external):
        refused = run_cli(*base, *how, "--custom", custom, env=env)
        assert refused.returncode == 1, refused.stdout
        assert "'custom.url' is written by tufa from the target's 'url' field" in refused.stderr
    assert dump_all_tables(factory.server) == state
    assert cdn.seen == []

    published = run_cli(*base, *external, env=env)
    assert published.returncode == 0, published.stderr
    device = AgentDevice.register(factory, tmp_path / "devices")
    ran = device.run_once()
    assert ran.returncode == 0, ran.stderr
    assert device.running_bytes() == data
    assert [seen.path for seen in cdn.seen] == ["/app-7.bin"]
    assert "authorization" not in {k.lower() for k in cdn.seen[0].headers}
