"""CI views (ADR 0016): each CI device is served the targets of its own hardware id and
tag, and a publish re-signs only the views it changes.

On real servers (both backends), with python-tuf's ngclient at its default settings and
real `tufa-agent` processes as devices:

- a device downloads its own view only: what other hardware ids publish never reaches
  it, and never moves its timestamp;
- through publishes, prunes and deletes over several views, no device sees any version
  go down, and every snapshot names a targets version that is served;
- the attack: a device served another view's genuine, validly signed files installs
  nothing from them, keeps what it runs, and updates normally afterwards;
- token holders read a view with `?hardware_id=&tag=`, and bad or partial queries are
  refused naming the parameter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from tests.agent_helpers import AgentDevice, TamperingProxy, build_bytes, publish_build
from tests.channel_attacks import run_once_served_view
from tests.helpers import (
    Factory,
    assert_error,
    cli_env,
    poll_device,
    run_cli,
    send,
    target_updater,
)
from tufa.core.fetcher import BearerFetcher

BOARDS = ("rpi4", "rpi5", "imx8")


@pytest.fixture
def proxy(factory: Factory) -> Iterator[TamperingProxy]:
    proxy = TamperingProxy(factory.server.url)
    yield proxy
    proxy.close()


def register(factory: Factory, hardware_id: str, tag: str = "main") -> str:
    body = {"name": f"{hardware_id}-{tag}", "hardware_id": hardware_id, "tag": tag, "channel": "ci"}
    response = factory.request("POST", "/devices", json=body)
    assert response.status_code == 201, response.text
    credential: str = response.json()["credential"]
    return credential


def view_files(factory: Factory, hardware_id: str, tag: str = "main") -> dict[str, Any]:
    """What a token holder reads of the view of `hardware_id` and `tag`, parsed."""
    base = factory.path("/repo/ci/metadata/")
    token = factory.admin_token
    query = f"?hardware_id={hardware_id}&tag={tag}"
    timestamp = send(factory.server, "GET", f"{base}timestamp.json{query}", token)
    assert timestamp.status_code == 200, timestamp.text
    stamp = Metadata[Timestamp].from_bytes(timestamp.content).signed
    snapshot = send(
        factory.server, "GET", f"{base}{stamp.snapshot_meta.version}.snapshot.json", token
    )
    snap = Metadata[Snapshot].from_bytes(snapshot.content).signed
    targets = send(
        factory.server, "GET", f"{base}{snap.meta['targets.json'].version}.targets.json", token
    )
    assert targets.status_code == 200, targets.text
    return {
        "timestamp": stamp,
        "snapshot": snap,
        "targets": Metadata[Targets].from_bytes(targets.content).signed,
        "targets_bytes": targets.content,
    }


def test_a_device_downloads_only_its_own_view(factory: Factory, tmp_path: Path) -> None:
    """Other hardware ids' builds are neither downloaded by nor announced to a device:
    its timestamp does not move when they publish, and its targets list only its own."""
    for board in BOARDS:
        for version in range(1, 4):
            publish_build(
                factory, str(version), name=f"{board}-image-{version}", hardware_ids=(board,)
            )
    device = register(factory, "rpi4")
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    listed = set(updater._trusted_set.targets.targets)
    assert listed == {f"rpi4-image-{v}" for v in range(1, 4)}
    before = view_files(factory, "rpi4")

    publish_build(factory, "4", name="rpi5-image-4", hardware_ids=("rpi5",))
    publish_build(factory, "4", name="imx8-image-4", hardware_ids=("imx8",))
    after = view_files(factory, "rpi4")
    assert after["timestamp"] == before["timestamp"]  # the same file: nothing to download
    assert "rpi5-image-4" in view_files(factory, "rpi5")["targets"].targets

    # A build for two boards reaches both views in one publish.
    publish_build(factory, "5", name="multi-image-5", hardware_ids=("rpi4", "rpi5"))
    for board in ("rpi4", "rpi5"):
        assert "multi-image-5" in view_files(factory, board)["targets"].targets
    assert "multi-image-5" not in view_files(factory, "imx8")["targets"].targets
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    info = updater.get_targetinfo("multi-image-5")
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == build_bytes("5")
    assert updater.get_targetinfo("rpi5-image-4") is None


def test_no_version_goes_down_for_any_device_over_publishes_prunes_and_deletes(
    factory: Factory, tmp_path: Path
) -> None:
    """Random publishes, prunes and deletes over three views; after each, every device
    polls (ngclient over what it trusts on disk) and no role's version may go down, every
    snapshot naming a targets version that is served."""
    rng = random.Random(7)  # noqa: S311 - a reproducible sequence, not a secret
    env = cli_env(factory, tmp_path / "config.json")
    devices = {board: register(factory, board) for board in BOARDS}
    seen: dict[str, dict[str, int]] = {board: {} for board in BOARDS}
    root = factory.root_v1("ci")
    published: list[str] = []
    for step in range(14):
        action = rng.choice(["publish", "publish", "publish", "prune", "delete"])
        if action == "publish" or not published:
            boards = tuple(rng.sample(BOARDS, rng.randint(1, 2)))
            name = f"step{step}-image"
            publish_build(factory, str(step), name=name, hardware_ids=boards)
            published.append(name)
        elif action == "prune":
            done = run_cli("targets", "prune", "--keep", "2", "--json", env=env)
            assert done.returncode == 0, done.stderr
            published = [n for n in published if n not in json.loads(done.stdout)["removed"]]
        else:
            doomed = rng.choice(published)
            done = run_cli("targets", "delete", doomed, env=env)
            assert done.returncode == 0, done.stderr
            published.remove(doomed)
        for board, credential in devices.items():
            trusted, seen[board] = poll_device(
                tmp_path / board,
                factory.metadata_url("ci"),
                BearerFetcher(credential),
                root,
                seen[board],
                f"{board} after step {step} ({action})",
            )
            listed = set(trusted.targets.targets)
            assert listed <= set(published), (board, listed - set(published))
            assert trusted.snapshot.meta["targets.json"].version == trusted.targets.version


def test_another_views_genuine_files_give_a_device_nothing_to_install(
    factory: Factory, proxy: TamperingProxy, tmp_path: Path
) -> None:
    """Every CI view is signed by the CI channel's keys, so anyone in the middle can
    serve a device of rpi4 the genuine view of rpi5, newer than its own. The device
    finds nothing for its hardware there, keeps running build 1, and installs build 3
    once its own view publishes it (a higher number from the shared counter)."""
    device = AgentDevice.register(factory, tmp_path / "agents", "ci", server_url=proxy.url)
    publish_build(factory, "1")
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert device.installed_version() == "1"
    publish_build(factory, "2", name="rpi5-image-2", hardware_ids=("rpi5",))
    done = run_once_served_view(device, proxy, factory, "ci", "hardware_id=rpi5&tag=main")
    assert done.returncode == 0, done.stderr  # verified and valid, just nothing for rpi4
    assert not any(e.path.endswith(".rpi5-image-2") for e in proxy.seen)
    assert device.installed_version() == "1"
    assert device.running_bytes() == build_bytes("1")

    publish_build(factory, "3")
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert device.installed_version() == "3"


def test_token_holders_read_a_view_by_hardware_id_and_tag(factory: Factory) -> None:
    publish_build(factory, "1")
    publish_build(factory, "1", name="rpi5-image-1", hardware_ids=("rpi5",))
    assert set(view_files(factory, "rpi5")["targets"].targets) == {"rpi5-image-1"}
    # No view named: the default view, which lists nothing.
    base = factory.path("/repo/ci/metadata/timestamp.json")
    plain = send(factory.server, "GET", base, factory.admin_token)
    assert plain.status_code == 200
    for query, field in (
        ("?tag=main", "'?hardware_id='"),
        ("?hardware_id=rpi4", "'?tag='"),
        ("?hardware_id=../x&tag=main", "?hardware_id="),
    ):
        refused = send(factory.server, "GET", base + query, factory.admin_token)
        assert_error(refused, 400, "bad_request", field.strip("'"))
    prod = factory.path("/repo/prod/metadata/timestamp.json?hardware_id=rpi4&tag=main")
    assert_error(
        send(factory.server, "GET", prod, factory.admin_token), 400, "bad_request", "?tag="
    )
    # A device is always served its own view, whatever it asks for.
    device = register(factory, "rpi5")
    asked = send(factory.server, "GET", base + "?hardware_id=rpi4&tag=main", device)
    assert asked.status_code == 200
    assert asked.content == send(factory.server, "GET", base, device).content
    stamp = Metadata[Timestamp].from_bytes(asked.content).signed
    assert stamp == view_files(factory, "rpi5")["timestamp"]


def test_a_publish_of_ten_thousand_targets_goes_through(factory: Factory, tmp_path: Path) -> None:
    """`tufa targets add --batch` with 10,000 external targets across 100 views."""
    items = [
        {
            "name": f"board{i % 100}-image-{i}",
            "version": str(i),
            "hardware_ids": [f"board{i % 100}"],
            "tags": ["main"],
            "url": f"https://cdn.example.com/{i}.img",
            "sha256": f"{i:064x}",
            "length": 1000 + i,
        }
        for i in range(10_000)
    ]
    batch = tmp_path / "targets.json"
    batch.write_text(json.dumps(items))
    env = cli_env(factory, tmp_path / "config.json")
    done = run_cli("targets", "add", "--batch", str(batch), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["added"]) == 10_000
    listed = view_files(factory, "board7")["targets"].targets
    assert len(listed) == 100
    assert "board7-image-9907" in listed
    # One build of the 10,000, read by its version (an index probe, not the whole list),
    # by the CLI and by the API, in CI and in production (where it is not released).
    found = run_cli("targets", "list", "--tag", "main", "--version", "9907", "--json", env=env)
    assert found.returncode == 0, found.stderr
    assert [t["name"] for t in json.loads(found.stdout)] == ["board7-image-9907"]
    for query, names in (
        ("?version=42&hardware_id=board42", ["board42-image-42"]),
        ("?version=42&hardware_id=board43", []),
        ("?version=10000", []),
        ("?version=42&channel=prod", []),
    ):
        answer = factory.request("GET", f"/targets{query}")
        assert answer.status_code == 200, answer.text
        assert [t["name"] for t in answer.json()] == names, query
