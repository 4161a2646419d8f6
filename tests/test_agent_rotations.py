"""The agent follows the owner's key rotations and waves, from start to end.

Every device is a real `tufa-agent` process, provisioned with its channel's root
version 1 (`tufa-agent register --root`); the owner runs the real `tufa` CLI for what is
under test (`keys rotate-root`, `keys rotate-targets`, `waves init/rollout/status/
complete`, `device-groups`) and the HTTP helpers of tests/test_waves.py for the releases
that only set the scene. After each step a device runs `tufa-agent run --once`: it must
walk the root chain, verify the new keys' signatures, and install what is meant for it
and nothing else.

The agent does not depend on the database backend: SQLite only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from tests.agent_helpers import AgentDevice, publish_build
from tests.helpers import Factory, send
from tests.test_rotations import Owner, served_root
from tests.test_waves import offline_targets_keyid, release, rollout, start_owner
from tufa.core.metadata import ROOT, TARGETS

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

# The health check of a device on which build 43 does not work.
REJECTS_43 = 'test "$TUFA_TARGET_VERSION" != 43'


def run(device: AgentDevice) -> None:
    """One check (and install), which must succeed."""
    done = device.run_once()
    assert done.returncode == 0, f"{device.name}:\n{done.stderr}"
    assert "Traceback" not in done.stderr


def runs(device: AgentDevice, version: str | None, builds: dict[str, bytes]) -> None:
    """`version` is what the device's status says it runs, and what its slot holds."""
    status = json.loads((device.dir / "status.json").read_bytes())
    assert (status["installed"] or {}).get("version") == version, f"{device.name}: {status}"
    assert status["pending"] is None
    assert device.running_bytes() == (None if version is None else builds[version])


def trusted_root(device: AgentDevice) -> int:
    """The root version `tufa-agent status --json` says the device trusts; it is the
    very root the server serves now."""
    version = int(device.status()["trusted_metadata"][ROOT])
    served = served_root(device.factory, device.channel)
    assert version == served.signed.version, device.name
    stored = Metadata[Root].from_file(str(device.dir / "metadata" / "root.json"))
    assert stored == served
    return version


def stored_targets(device: AgentDevice) -> Metadata[Targets]:
    return Metadata[Targets].from_file(str(device.dir / "metadata" / "targets.json"))


# -- root rotations ---------------------------------------------------------------------------


@sqlite_only
def test_agents_follow_root_rotations_one_and_two_in_a_row(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    devices = [AgentDevice.register(factory, tmp_path, c) for c in ("ci", "prod")]
    builds = {"42": publish_build(factory, "42")}
    release(owner, "rel-42", "42")
    for device in devices:
        run(device)
        runs(device, "42", builds)
    assert [trusted_root(d) for d in devices] == [1, 1]

    owner.tufa("keys", "rotate-root", str(owner.archive))
    builds["43"] = publish_build(factory, "43")
    release(owner, "rel-43", "43")
    for device in devices:
        run(device)
        runs(device, "43", builds)
    assert [trusted_root(d) for d in devices] == [2, 2]

    # Two rotations with no poll in between: the agents step through both roots.
    for _ in range(2):
        owner.tufa("keys", "rotate-root", str(owner.archive))
    builds["44"] = publish_build(factory, "44")
    release(owner, "rel-44", "44")
    for device in devices:
        run(device)
        runs(device, "44", builds)
    assert [trusted_root(d) for d in devices] == [4, 4]
    root_keys = served_root(factory, "ci").signed.roles[ROOT].keyids
    assert stored_root_keys(devices[0]) == root_keys

    # A device provisioned now, still with root v1, walks the whole chain.
    late = AgentDevice.register(factory, tmp_path, "prod")
    run(late)
    runs(late, "44", builds)
    assert trusted_root(late) == 4


def stored_root_keys(device: AgentDevice) -> list[str]:
    stored = Metadata[Root].from_file(str(device.dir / "metadata" / "root.json"))
    return stored.signed.roles[ROOT].keyids


# -- a targets key rotation -----------------------------------------------------------------


@sqlite_only
def test_a_production_agent_follows_a_targets_key_rotation(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    prod = AgentDevice.register(factory, tmp_path, "prod")
    ci = AgentDevice.register(factory, tmp_path, "ci")
    builds = {"42": publish_build(factory, "42")}
    release(owner, "rel-42", "42")
    for device in (prod, ci):
        run(device)
        runs(device, "42", builds)
    old = offline_targets_keyid(owner)
    assert old in stored_targets(prod).signatures
    targets_before = stored_targets(prod).signed.version

    owner.tufa("keys", "rotate-targets", str(owner.archive))
    new = offline_targets_keyid(owner)
    assert new != old
    # The next check: the new root, and the production targets re-signed with the new
    # key (same content, next version); nothing to install.
    run(prod)
    runs(prod, "42", builds)
    assert trusted_root(prod) == 2
    root = Metadata[Root].from_file(str(prod.dir / "metadata" / "root.json")).signed
    assert new in root.roles[TARGETS].keyids
    assert old not in root.keys
    assert root.roles[TARGETS].threshold == 2
    targets = stored_targets(prod)
    assert targets.signed.version > targets_before
    assert new in targets.signatures
    assert old not in targets.signatures

    # A release signed with the new offline key, by `tufa waves init` and `complete`.
    builds["43"] = publish_build(factory, "43")
    owner.tufa("waves", "init", "rel-43", "43", "main", "-k", str(owner.archive))
    assert "Wave rel-43 is now complete." in owner.tufa("waves", "complete", "rel-43")
    for device in (prod, ci):
        run(device)
        runs(device, "43", builds)
    targets = stored_targets(prod)
    assert "rpi4-image-43" in targets.signed.targets
    assert new in targets.signatures
    assert old not in targets.signatures
    assert trusted_root(ci) == 2


# -- a wave -----------------------------------------------------------------------------------


def wave_status(owner: Owner, name: str) -> dict[str, Any]:
    (row,) = owner.json("waves", "status", name)
    assert row["name"] == name
    found: dict[str, Any] = row
    return found


@sqlite_only
def test_a_wave_from_start_to_end_with_production_agents(factory: Factory, tmp_path: Path) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    canary = AgentDevice.register(factory, tmp_path, "prod", name="canary-1")
    other = AgentDevice.register(factory, tmp_path, "prod", name="other-1")
    picky = AgentDevice.register(
        factory, tmp_path, "prod", name="picky-1", extra=("--health-check", REJECTS_43)
    )
    beta = AgentDevice.register(factory, tmp_path, "prod", name="beta-1", tag="beta")
    fleet = (canary, other, picky)
    builds = {"42": publish_build(factory, "42")}
    release(owner, "rel-42", "42")
    builds["43"] = publish_build(factory, "43", tags=("main", "beta"))
    for device in fleet:
        run(device)
        runs(device, "42", builds)

    # Signed with the owner's offline key; it reaches no device yet.
    out = owner.tufa("waves", "init", "rel-43", "43", "main", "-k", str(owner.archive))
    assert "Wave rel-43: tag main, version 43" in out
    for device in (*fleet, beta):
        run(device)
    for device in fleet:
        runs(device, "42", builds)
    runs(beta, None, builds)

    # A group of one: only that agent installs.
    owner.tufa("device-groups", "create", "canaries")
    assert "1 device(s)" in owner.tufa("device-groups", "add", "canaries", canary.name)
    assert rollout(owner, "rel-43", "canaries") == [canary.name]
    for device in fleet:
        run(device)
    runs(canary, "43", builds)
    runs(other, "42", builds)
    runs(picky, "42", builds)
    # What the canary verified: the wave's targets, signed with the owner's offline key.
    wave_targets = stored_targets(canary)
    assert "rpi4-image-43" in wave_targets.signed.targets
    assert offline_targets_keyid(owner) in wave_targets.signatures
    assert "rpi4-image-43" not in stored_targets(other).signed.targets
    status = wave_status(owner, "rel-43")
    assert (status["status"], status["devices_served"], status["devices_of_tag"]) == (
        "active",
        1,
        3,
    )
    assert (status["devices_installed"], status["devices_failed"]) == (1, 0)

    # A device on which 43 fails its health check: rolled back, and counted.
    assert rollout(owner, "rel-43", "--uuids", picky.name) == [picky.name]
    done = picky.run_once()
    assert done.returncode == 1, done.stderr
    assert "version 43 failed to install: the health check exited with status 1" in done.stderr
    runs(picky, "42", builds)
    status = wave_status(owner, "rel-43")
    assert (status["devices_served"], status["devices_installed"]) == (2, 1)
    assert status["devices_failed"] == 1
    shown = send(factory.server, "GET", factory.path(f"/devices/{picky.name}"), factory.admin_token)
    assert {(e["kind"], e["version"]) for e in shown.json()["events"]} >= {
        ("install-failed", "43"),
        ("rolled-back", "43"),
    }

    # Complete: the other device of the tag installs; the one 43 failed on does not
    # try it again; the device of another tag gets nothing.
    assert "Wave rel-43 is now complete." in owner.tufa("waves", "complete", "rel-43")
    for device in (*fleet, beta):
        run(device)
    runs(canary, "43", builds)
    runs(other, "43", builds)
    runs(picky, "42", builds)
    runs(beta, None, builds)
    status = wave_status(owner, "rel-43")
    assert status["status"] == "complete"
    assert (status["devices_installed"], status["devices_failed"]) == (2, 1)
    devices = {d["name"]: d for d in owner.json("devices", "list")}
    assert {n: devices[n]["installed_version"] for n in devices} == {
        canary.name: "43",
        other.name: "43",
        picky.name: "42",
        beta.name: None,
    }
