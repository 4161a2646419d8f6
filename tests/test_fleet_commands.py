"""The fleet commands as an operator reads them: `tufa devices show`, `tufa waves`,
`tufa device-groups`, durations on the command line, what a device without a release
says, and the server's answer to a URL it has no route for.

Real `tufa`, `tufa-agent` and `tufa-server` processes against a real server on loopback;
all on SQLite (the commands are HTTP clients of the same server code on both backends).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import AgentDevice, publish_build
from tests.helpers import Factory, Server, send
from tests.test_rotations import Owner
from tests.test_waves import start_owner
from tufa.agent.reports import EventQueue
from tufa.demo.local_server import console_script

pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def refused(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """The command failed, printing nothing on stdout, and said each phrase on stderr."""
    assert done.returncode != 0, done.stdout
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


# -- events of one second, newest first -----------------------------------------------------


def test_events_of_one_second_show_newest_first(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    """The agent's clock counts whole seconds: five events made within one second are
    still listed in the order they happened, newest first."""
    owner = start_owner(factory, tmp_path / "owner")
    device = AgentDevice.register(factory, tmp_path)
    queue = EventQueue(device.dir)
    for step in range(1, 6):
        queue.add("check-failed", None, f"step {step}")
    queued = json.loads((device.dir / "events.json").read_bytes())
    for event in queued:  # however long the adds took: one second
        event["at"] = queued[0]["at"]
    (device.dir / "events.json").write_text(json.dumps(queued))
    assert device.run_once().returncode == 0

    shown = owner.json("devices", "show", device.name)
    assert [e["detail"] for e in shown["events"]] == [f"step {n}" for n in (5, 4, 3, 2, 1)]
    assert len({e["at"] for e in shown["events"]}) == 1
    text = owner.tufa("devices", "show", device.name, env={**owner.env, "COLUMNS": "250"})
    assert "Last 5 event(s), newest first" in text
    order = [text.index(f"step {n}") for n in (5, 4, 3, 2, 1)]
    assert order == sorted(order), text


# -- the targets of a wave ------------------------------------------------------------------


def test_waves_name_the_targets_version_and_the_targets_apart(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    publish_build(factory, "7")

    out = owner.tufa("waves", "init", "rel-7", "7", "main", "-k", str(owner.archive))
    assert out == "Wave rel-7: tag main, version 7, production targets version 2 (1 target).\n"

    wide = {**owner.env, "COLUMNS": "200"}
    header, row = owner.tufa("waves", "list", env=wide).splitlines()[1::2][:2]
    assert "targets version" in header
    assert "devices served" in header
    assert row.split("│")[5].strip() == "2"  # the version, under "targets version"
    (listed,) = owner.json("waves", "list")
    assert listed["targets_version"] == 2
    assert listed["targets"] == ["rpi4-image-7"]  # `targets` is names, as in `waves show`
    assert owner.json("waves", "show", "rel-7")["targets"] == listed["targets"]


# -- durations need their unit --------------------------------------------------------------


def test_a_duration_without_its_unit_is_refused_by_every_option(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    no_unit = "'90' has no unit: write 90s for seconds, 90d for days"
    units = "s, m, h, d or w, e.g. 90s, 15m, 12h, 30d or 2w"
    before = owner.json("tokens", "list")
    refused(owner.fails("tokens", "create", "-s", "read", "--expires", "90"), no_unit, units)
    assert owner.json("tokens", "list") == before, "nothing created"
    created = owner.json("tokens", "create", "-s", "read", "--expires", "90s")
    assert created["expires_at"] is not None

    publish_build(factory, "7")
    wave = ("waves", "init", "rel-7", "7", "main", "-k", str(owner.archive))
    refused(owner.fails(*wave, "--expires", "90"), "--expires", no_unit)
    refused(owner.fails(*wave, "--expires", "36h"), "--expires", "whole days, 1d to 3650d")
    assert owner.json("waves", "list") == [], "nothing created"
    owner.tufa(*wave, "--expires", "2w")
    (listed,) = owner.json("waves", "list")
    assert listed["name"] == "rel-7"

    for option in ("--resign-interval", "--timestamp-expiry", "--root-expiry"):
        data_dir = tmp_path / f"server{option}"
        done = subprocess.run(
            [console_script("tufa-server"), "run", "--data-dir", str(data_dir), option, "90"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        refused(done, option, no_unit, units)
        assert not data_dir.exists(), "nothing created before the options are read"


# -- a production device with nothing released ----------------------------------------------


def test_a_device_with_nothing_to_install_says_what_its_channel_lacks(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    publish_build(factory, "42")  # to CI: a production device gets it only by a wave
    prod = AgentDevice.register(factory, tmp_path, "prod", root=factory.root_v1("prod"))
    checked = prod.agent("check")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == (
        "Nothing is released to production for hardware id 'rpi4' and tag 'main' (a CI "
        "build reaches production devices through a wave: tufa waves init, then tufa "
        "waves rollout).\n"
    )
    ci = AgentDevice.register(factory, tmp_path, tag="beta")
    checked = ci.agent("check")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "No target is published to CI for hardware id 'rpi4' and tag 'beta'.\n"


# -- device groups --------------------------------------------------------------------------


def group_members(owner: Owner, name: str) -> list[str]:
    shown: dict[str, Any] = owner.json("device-groups", "show", name)
    return [m["name"] for m in shown["members"]]


def test_device_groups_hold_production_devices_and_show_and_lose_them(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    bench = factory.register_device("ci", name="bench-1")
    for name in ("unit-a", "unit-b"):
        factory.register_device("prod", name=name)
    owner.tufa("device-groups", "create", "canaries")

    # A CI device never gets a wave: refused by name, and nothing is added.
    refused(
        owner.fails("device-groups", "add", "canaries", "unit-a", "bench-1"),
        f"'bench-1' ({bench['id']}) follow the CI channel",
        "nothing was added",
        "HTTP 409 conflict",
    )
    assert group_members(owner, "canaries") == []
    out = owner.tufa("device-groups", "add", "canaries", "unit-a", "unit-b")
    assert out == "Group canaries has 2 device(s).\n"

    wide = {**owner.env, "COLUMNS": "200"}
    listed = owner.tufa("device-groups", "list", env=wide)
    assert listed.splitlines()[1].split() == ["┃", "name", "┃", "devices", "┃", "created", "┃"]
    assert listed.splitlines()[3].split()[:4] == ["│", "canaries", "│", "2"]
    shown = owner.tufa("device-groups", "show", "canaries", env=wide)
    assert shown.startswith("Device group canaries, created ")
    assert "2 device(s)" in shown
    assert "unit-a" in shown
    assert "unit-b" in shown
    assert "bench-1" not in shown
    (group,) = owner.json("device-groups", "list")
    assert group["devices"] == owner.json("device-groups", "show", "canaries")["devices"]

    # Removing takes members only, all of them or none.
    refused(
        owner.fails("device-groups", "remove", "canaries", "unit-b", "bench-1"),
        "'bench-1'",
        "not in group 'canaries'; nothing was removed",
    )
    refused(
        owner.fails("device-groups", "remove", "canaries", "nobody"), "no such device(s): nobody"
    )
    assert group_members(owner, "canaries") == ["unit-a", "unit-b"]
    out = owner.tufa("device-groups", "remove", "canaries", "unit-b")
    assert out == "Group canaries has 1 device(s).\n"
    assert group_members(owner, "canaries") == ["unit-a"]

    out = owner.tufa("device-groups", "delete", "canaries")
    assert out == "Deleted device group canaries (1 device(s) in it).\n"
    refused(owner.fails("device-groups", "show", "canaries"), "no device group named 'canaries'")
    assert owner.json("device-groups", "list") == []
    assert len(owner.json("devices", "list")) == 3, "the devices stay"


def test_member_changes_refuse_bad_fields(server: Server, factory: Factory, tmp_path: Path) -> None:
    factory.register_device("prod", name="unit-a")
    assert factory.request("POST", "/device-groups", json={"name": "g"}).status_code == 201
    members = factory.path("/device-groups/g/devices")
    for body, says in [
        ({"devices": []}, "field 'devices' must name at least one device"),
        ({"devices": "unit-a"}, "field 'devices' must be of type array"),
        ({"devices": [1]}, "field 'devices' must be a list of strings"),
        ({}, "'devices'"),
    ]:
        response = send(server, "DELETE", members, factory.admin_token, json=body)
        assert response.status_code == 400, response.text
        assert says in response.json()["error"]["message"]
    response = send(server, "DELETE", factory.path("/device-groups/nope"), factory.admin_token)
    assert response.status_code == 404
    assert "no device group named 'nope'" in response.json()["error"]["message"]


# -- a URL with no route --------------------------------------------------------------------


def test_an_unknown_route_is_named_with_the_fix(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    path = f"/api/v1/factories/{factory.name}/nope"
    refused(
        owner.fails("get", path),
        f"no API route matches '{path}': check the URL against the API paths in the README",
        "HTTP 404 not_found",
    )
