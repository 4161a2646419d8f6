"""The agent with no network: offline bundles, and the plain TUF debug commands.

`tufa targets offline-update` (the real CLI) writes a bundle; a real `tufa-agent
install-bundle` installs it on a device whose server is unreachable, with the same
checks as online, and the events wait for the server. Bundles for another channel,
tampered with, or older than what the device already trusts are refused (exit 1, one
line naming the problem) and change nothing that runs.

`tufa-agent tuf init/refresh/download` are checked against the tufa server and against
a plain python-tuf repository written here with the Metadata API and served by a static
`http.server`: exit 0 with the right bytes, exit 1 on any verification failure.

A bundle expires like the metadata it carries: the device's clock cannot be moved, so
the server's is (`--clock-offset-file`), and time passes for a bundle whose timestamp the
server signed almost a day late.

The agent does not depend on the database backend: SQLite only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from tests.agent_helpers import AgentDevice, image_name, publish_build
from tests.helpers import (
    Factory,
    Server,
    cli_env,
    create_factory,
    run_cli,
    send,
    served_metadata,
    set_clock_offset,
)
from tests.test_agent_attacks import DAY, EXPIRED, expires
from tests.test_rotations import serve_directory
from tests.test_waves import release, start_owner
from tufa.core.crashpoints import ENV_VAR as CRASH_AT
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP
from tufa.demo.local_server import console_script, free_port

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


# -- bundles ----------------------------------------------------------------------------------


def write_bundle(env: dict[str, str], directory: Path, version: str, *flags: str) -> Path:
    """`tufa targets offline-update main VERSION DIR FLAGS`."""
    done = run_cli("targets", "offline-update", "main", version, str(directory), *flags, env=env)
    assert done.returncode == 0, done.stderr
    assert f"tufa-agent install-bundle {directory}" in done.stdout
    return directory


def ci_env(factory: Factory, where: Path) -> dict[str, str]:
    """`tufa` as a CI job: a token of scope ci."""
    return cli_env(factory, where / "ci-config.json") | {"TUFA_TOKEN": factory.token("ci")}


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"


def status_file(device: AgentDevice) -> dict[str, object]:
    path = device.dir / "status.json"
    found: dict[str, object] = json.loads(path.read_bytes()) if path.exists() else {}
    return found


def runs(device: AgentDevice, version: str | None, builds: dict[str, bytes]) -> None:
    """`version` is what the device's status says it runs, and what its slot holds."""
    report = device.status()
    assert (report["installed"] or {}).get("version") == version, report
    assert report["installing"] is None, report
    assert device.running_bytes() == (None if version is None else builds[version])


def queued(device: AgentDevice) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads((device.dir / "events.json").read_bytes())
    return found


def shown(factory: Factory, device: AgentDevice) -> dict[str, Any]:
    """What the server knows of the device (`tufa devices show NAME --json`)."""
    response = send(
        factory.server, "GET", factory.path(f"/devices/{device.name}"), factory.admin_token
    )
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def refuses(device: AgentDevice, bundle: Path, says: str) -> str:
    """`install-bundle` exits 1 with one line saying `says`, and nothing else happens:
    no install in progress, no partial file."""
    done = device.agent("install-bundle", str(bundle))
    assert done.returncode == 1, f"{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("Error: ")]
    assert says in line, done.stderr
    assert status_file(device).get("pending") is None
    assert not [p for p in device.dir.rglob("*") if p.name.endswith((".part", ".tmp"))]
    return line


@sqlite_only
def test_a_ci_bundle_installs_with_the_server_unreachable(factory: Factory, tmp_path: Path) -> None:
    device = AgentDevice.register(factory, tmp_path)
    builds = {"42": publish_build(factory, "42")}
    assert device.run_once().returncode == 0
    runs(device, "42", builds)
    builds["43"] = publish_build(factory, "43")
    builds["44"] = publish_build(factory, "44")
    # The metadata in the bundle lists 44 too; the bundle holds 43, which is installed.
    bundle = write_bundle(ci_env(factory, tmp_path), tmp_path / "usb" / "update-43", "43")

    device.point_at(unreachable())
    offline = device.run_once()
    assert offline.returncode == 1
    assert "cannot reach the server" in offline.stderr, offline.stderr
    done = device.agent("install-bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"Installed version 43 (rpi4-image-43) from {bundle}.\n"
    runs(device, "43", builds)
    events = queued(device)
    assert [(e["kind"], e["version"]) for e in events] == [("installed", "43")]
    assert device.status()["unsent_events"] == 1
    assert shown(factory, device)["installed_version"] == "42"  # not yet told
    # Again: nothing to do, exit 0.
    again = device.agent("install-bundle", str(bundle))
    assert again.returncode == 0, again.stderr
    assert "Version 43 (rpi4-image-43) is up to date." in again.stdout

    # Back online: the queued events are delivered, once, and 44 comes from the server.
    device.point_at(factory.server.url)
    assert device.run_once().returncode == 0
    assert queued(device) == []
    runs(device, "44", builds)
    known = shown(factory, device)
    assert known["installed_version"] == "44"
    ids = [e["id"] for e in known["events"]]
    assert ids.count(events[0]["id"]) == 1
    assert device.run_once().returncode == 0
    assert [e["id"] for e in shown(factory, device)["events"]] == ids


@sqlite_only
def test_a_prod_bundle_after_a_wave_completes_installs_on_an_offline_prod_agent(
    factory: Factory, tmp_path: Path
) -> None:
    """A production device provisioned with root v1 and never online since: the bundle
    carries the root chain (the owner rotated the root meanwhile) and targets signed
    with the offline key."""
    owner = start_owner(factory, tmp_path / "owner")
    device = AgentDevice.register(factory, tmp_path, "prod")
    device.point_at(unreachable())
    owner.tufa("keys", "rotate-root", str(owner.archive))
    builds = {"42": publish_build(factory, "42")}
    release(owner, "rel-42", "42")
    bundle = write_bundle(owner.env, tmp_path / "usb" / "prod-42", "42", "--prod")

    done = device.agent("install-bundle", str(bundle), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["install"]["version"] == "42"
    assert plan["install"]["target"] == image_name("42")
    runs(device, "42", builds)
    assert device.status()["trusted_metadata"][ROOT] == 2
    targets = Metadata[Targets].from_file(str(device.dir / "metadata" / "targets.json"))
    assert len(targets.signatures) == 2  # the online and the offline targets keys

    device.point_at(factory.server.url)
    assert device.run_once().returncode == 0
    assert shown(factory, device)["installed_version"] == "42"
    assert queued(device) == []


@sqlite_only
def test_a_power_cut_during_install_bundle_is_finished_offline(
    factory: Factory, tmp_path: Path
) -> None:
    device = AgentDevice.register(factory, tmp_path)
    builds = {"42": publish_build(factory, "42")}
    bundle = write_bundle(ci_env(factory, tmp_path), tmp_path / "usb" / "update-42", "42")
    device.point_at(unreachable())
    cut = device.agent("install-bundle", str(bundle), env={CRASH_AT: "install:switched"})
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert device.running_bytes() == builds["42"]  # switched, not yet concluded
    assert status_file(device)["installed"] is None

    done = device.agent("install-bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "finishing the install of version 42" in done.stderr
    assert "Version 42 (rpi4-image-42) is up to date." in done.stdout
    runs(device, "42", builds)
    assert [(e["kind"], e["version"]) for e in queued(device)] == [("installed", "42")]


@sqlite_only
def test_bundles_a_device_must_refuse(factory: Factory, tmp_path: Path) -> None:
    ci = AgentDevice.register(factory, tmp_path, "ci")
    prod = AgentDevice.register(factory, tmp_path, "prod")
    beta = AgentDevice.register(factory, tmp_path, "ci", tag="beta")
    env = ci_env(factory, tmp_path)
    builds = {"42": publish_build(factory, "42")}
    old = write_bundle(env, tmp_path / "usb" / "update-42", "42")
    assert ci.run_once().returncode == 0
    builds["43"] = publish_build(factory, "43")
    bundle = write_bundle(env, tmp_path / "usb" / "update-43", "43")
    for device in (ci, prod, beta):
        device.point_at(unreachable())

    # A CI bundle on a production device.
    line = refuses(prod, bundle, f"{bundle} is a ci bundle and this device follows the prod")
    assert "write the bundle with --prod" in line
    runs(prod, None, builds)
    # A bundle for another tag.
    line = refuses(beta, bundle, f"{bundle} is a bundle for tag main and this device follows tag")
    assert "write the bundle for tag beta" in line
    runs(beta, None, builds)

    # The targets metadata edited to vouch for other bytes: the snapshot pins the
    # targets by hash, and the targets' own signature breaks too.
    name = image_name("43")
    forged = bytearray(builds["43"])
    forged[len(forged) // 2] ^= 0x01
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    (edited / "targets" / name).write_bytes(bytes(forged))
    (targets_file,) = (edited / "metadata").glob("*.targets.json")
    md = Metadata[Targets].from_bytes(targets_file.read_bytes())
    md.signed.targets[name].hashes = {"sha256": hashlib.sha256(forged).hexdigest()}
    targets_file.write_bytes(md.to_bytes())
    line = refuses(ci, edited, f"{edited} failed verification: refused: length or hash mismatch")
    runs(ci, "42", builds)

    # One byte of the target flipped: the metadata verifies, the file does not.
    flipped = tmp_path / "flipped"
    shutil.copytree(bundle, flipped)
    (flipped / "targets" / name).write_bytes(bytes(forged))
    refuses(ci, flipped, f"{name}: the bytes do not match the signed hash")
    runs(ci, "42", builds)
    assert sorted(p.name for p in (ci.dir / "downloads").iterdir()) == [
        hashlib.sha256(builds["42"]).hexdigest()
    ]

    # A bundle older than what the device has seen online: a rollback.
    ci.point_at(factory.server.url)
    assert ci.run_once().returncode == 0
    runs(ci, "43", builds)
    ci.point_at(unreachable())
    refuses(ci, old, f"{old} failed verification: refused: rollback attack or bad version")
    runs(ci, "43", builds)
    (newer,) = (bundle / "metadata").glob("*.targets.json")
    newest_seen = Metadata[Targets].from_bytes(newer.read_bytes()).signed.version
    assert ci.status()["trusted_metadata"][TARGETS] == newest_seen


def test_an_expired_bundle_is_refused_and_a_fresh_one_installs(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The server's clock runs late when the bundle is written: its timestamp, valid
    for a day of the server's time, expires seconds later for everyone else. Two days
    late, it has expired already and `offline-update` writes nothing; almost a day
    late, the bundle is written, and refused once it expires. With the clock right, the
    server re-signs and a fresh bundle installs."""
    offset_file = tmp_path / "clock-offset"
    set_clock_offset(offset_file, 0)
    extra = ("--clock-offset-file", str(offset_file), "--resign-interval", "1s")
    factory = create_factory(make_server("sqlite", extra_args=extra))
    env = ci_env(factory, tmp_path)
    device = AgentDevice.register(factory, tmp_path)
    builds = {"42": publish_build(factory, "42")}
    assert device.run_once().returncode == 0
    runs(device, "42", builds)
    trusted = device.status()["trusted_metadata"]
    device.point_at(unreachable())

    def served_timestamp_expires() -> datetime:
        return expires(served_metadata(factory, "ci")[TIMESTAMP])

    margin = 5  # seconds a timestamp stays valid after the late server signs it
    try:
        set_clock_offset(offset_file, -2 * DAY)
        builds["43"] = publish_build(factory, "43")
        assert served_timestamp_expires() < datetime.now(UTC) - timedelta(hours=23)
        stale = tmp_path / "usb" / "stale-43"
        done = run_cli("targets", "offline-update", "main", "43", str(stale), env=env)
        assert done.returncode == 1, done.stdout
        assert "the metadata the server serves has expired" in done.stderr, done.stderr
        assert not stale.exists()
        assert not stale.with_name(f"{stale.name}.partial").exists()

        # The re-signer sees the timestamp expired for the server and signs a new one.
        set_clock_offset(offset_file, -(DAY - margin))
        deadline = time.monotonic() + 15
        while served_timestamp_expires() < datetime.now(UTC):
            assert time.monotonic() < deadline, "the server did not re-sign its timestamp"
            time.sleep(0.2)
        bundle = write_bundle(env, tmp_path / "usb" / "update-43", "43")
    finally:
        set_clock_offset(offset_file, 0)
    until = expires((bundle / "metadata" / "timestamp.json").read_bytes())
    assert until <= datetime.now(UTC) + timedelta(seconds=margin + 1), until
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.0)

    line = refuses(device, bundle, f"{bundle} failed verification: {EXPIRED}")
    assert "timestamp" in line, line
    runs(device, "42", builds)
    assert sorted(p.name for p in (device.dir / "downloads").iterdir()) == [
        hashlib.sha256(builds["42"]).hexdigest()
    ]
    assert device.status()["trusted_metadata"] == trusted
    assert [(e["kind"], e["version"]) for e in queued(device)] == [("check-failed", None)]

    # The clock right again: the server re-signs; a bundle written now installs.
    deadline = time.monotonic() + 15
    while served_timestamp_expires() < datetime.now(UTC) + timedelta(hours=12):
        assert time.monotonic() < deadline, "the server did not re-sign its timestamp"
        time.sleep(0.2)
    fresh = write_bundle(env, tmp_path / "usb" / "fresh-43", "43")
    done = device.agent("install-bundle", str(fresh))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"Installed version 43 (rpi4-image-43) from {fresh}.\n"
    runs(device, "43", builds)
    assert sorted(p.name for p in (device.dir / "downloads").iterdir()) == [
        hashlib.sha256(builds["43"]).hexdigest()
    ]
    assert [(e["kind"], e["version"]) for e in queued(device)] == [
        ("check-failed", None),
        ("installed", "43"),
    ]


# -- tufa-agent tuf -------------------------------------------------------------------------


def tuf(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [console_script("tufa-agent"), "tuf", *args],
        env={k: v for k, v in os.environ.items() if k != "TUFA_TOKEN"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def tuf_fails(*args: str, says: str) -> str:
    done = tuf(*args)
    assert done.returncode == 1, f"tufa-agent tuf {' '.join(args)}:\n{done.stdout}"
    assert says in done.stderr, done.stderr
    return done.stderr


def tuf_ok(*args: str) -> str:
    done = tuf(*args)
    assert done.returncode == 0, f"tufa-agent tuf {' '.join(args)}:\n{done.stderr}"
    return done.stdout


@sqlite_only
def test_tuf_commands_against_the_tufa_server(factory: Factory, tmp_path: Path) -> None:
    data = publish_build(factory, "42")
    root = tmp_path / "ci-root.json"
    root.write_bytes(factory.root_v1("ci"))
    url = factory.metadata_url("ci")
    targets_url = f"{factory.server.url}{factory.path('/repo/ci/targets/')}"
    token = factory.token("read")
    trust = tmp_path / "trust"

    assert "Trusting root version 1" in tuf_ok("init", "--metadata-dir", str(trust), str(root))
    tuf_fails("init", "--metadata-dir", str(trust), str(root), says="already holds a trusted root")
    tuf_fails(
        "refresh", "--metadata-url", url, "--metadata-dir", str(trust), says="HTTP 401"
    )  # the CI channel is not public
    out = tuf_ok("refresh", "--metadata-url", url, "--metadata-dir", str(trust), "--token", token)
    assert out.startswith("Trusted: root v1, timestamp v")
    files = tmp_path / "files"
    # A token reads the default view, which lists nothing; --view names a device's view.
    tuf_fails(
        "download", "--metadata-url", url, "--metadata-dir", str(trust),
        "--target-base-url", targets_url, "--target-dir", str(files), "--token", token,
        image_name("42"), says=f"{image_name('42')} is not a target",
    )  # fmt: skip
    out = tuf_ok(
        "download", "--metadata-url", url, "--metadata-dir", str(trust),
        "--target-base-url", targets_url, "--target-dir", str(files), "--token", token,
        "--view", "rpi4/main", image_name("42"),
    )  # fmt: skip
    assert out == f"{image_name('42')}: {files / image_name('42')}\n"
    assert (files / image_name("42")).read_bytes() == data
    tuf_fails(
        "download", "--metadata-url", url, "--metadata-dir", str(trust),
        "--target-base-url", targets_url, "--target-dir", str(files), "--token", token,
        "--view", "rpi4/main", "no-such-image", says="no-such-image is not a target",
    )  # fmt: skip

    # The production root does not lead to the CI channel: its targets need two keys.
    prod_root = tmp_path / "prod-root.json"
    prod_root.write_bytes(factory.root_v1("prod"))
    wrong = tmp_path / "wrong-trust"
    tuf_ok("init", "--metadata-dir", str(wrong), str(prod_root))
    tuf_fails(
        "refresh", "--metadata-url", url, "--metadata-dir", str(wrong), "--token", token,
        says="verification failed: refused: metadata not signed by the trusted keys",
    )  # fmt: skip


# -- a plain python-tuf repository ------------------------------------------------------------


ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)


def in_a_week() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)


def new_root(signers: dict[str, CryptoSigner], version: int = 1) -> Metadata[Root]:
    root = Metadata(Root(version=version, expires=in_a_week(), consistent_snapshot=True))
    for role in ROLES:
        root.signed.add_key(signers[role].public_key, role)
    return root


@dataclass
class PlainRepository:
    """A TUF repository written with python-tuf's Metadata API alone: consistent
    snapshots, one key per role, files under `directory` as a static server serves them."""

    directory: Path
    signers: dict[str, CryptoSigner]

    @classmethod
    def create(cls, directory: Path, files: dict[str, bytes]) -> PlainRepository:
        (directory / "metadata").mkdir(parents=True)
        (directory / "targets").mkdir()
        repo = cls(directory, {role: CryptoSigner.generate_ed25519() for role in ROLES})
        root = new_root(repo.signers)
        root.sign(repo.signers[ROOT])
        repo.write("1.root.json", root)
        targets = Metadata(Targets(expires=in_a_week()))
        for name, data in files.items():
            info = TargetFile.from_data(name, data, ["sha256"])
            targets.signed.targets[name] = info
            (directory / "targets" / f"{info.hashes['sha256']}.{name}").write_bytes(data)
        targets.sign(repo.signers[TARGETS])
        repo.write("1.targets.json", targets)
        snapshot = Metadata(Snapshot(expires=in_a_week()))
        snapshot.signed.meta["targets.json"] = MetaFile(1)
        snapshot.sign(repo.signers[SNAPSHOT])
        repo.write("1.snapshot.json", snapshot)
        timestamp = Metadata(Timestamp(expires=in_a_week()))
        timestamp.signed.snapshot_meta = MetaFile(1)
        timestamp.sign(repo.signers[TIMESTAMP])
        repo.write("timestamp.json", timestamp)
        return repo

    def write(self, filename: str, md: Metadata[Any]) -> None:
        (self.directory / "metadata" / filename).write_bytes(md.to_bytes())

    def root_file(self, version: int = 1) -> Path:
        return self.directory / "metadata" / f"{version}.root.json"

    def rotate_root(self) -> None:
        """Root v2 with a new root key, signed by the old key and the new one."""
        old = self.signers[ROOT]
        self.signers[ROOT] = CryptoSigner.generate_ed25519()
        root = new_root(self.signers, version=2)
        root.sign(old, append=True)
        root.sign(self.signers[ROOT], append=True)
        self.write("2.root.json", root)


def test_tuf_commands_against_a_plain_python_tuf_repository(tmp_path: Path) -> None:
    files = {"firmware.bin": b"plain TUF firmware\n" * 1000, "notes.txt": b"hello\n"}
    repo = PlainRepository.create(tmp_path / "repo", files)
    trust = tmp_path / "trust"
    out = tuf_ok("init", "--metadata-dir", str(trust), str(repo.root_file()))
    assert out == f"Trusting root version 1 in {trust}.\n"

    with serve_directory(repo.directory) as base:
        url, targets_url = f"{base}/metadata/", f"{base}/targets/"
        out = tuf_ok("refresh", "--metadata-url", url, "--metadata-dir", str(trust))
        assert out == "Trusted: root v1, timestamp v1, snapshot v1, targets v1\n"

        good = tmp_path / "good"
        out = tuf_ok(
            "download", "--metadata-url", url, "--metadata-dir", str(trust),
            "--target-base-url", targets_url, "--target-dir", str(good), *files,
        )  # fmt: skip
        assert out.splitlines() == [f"{name}: {good / name}" for name in files]
        assert {p.name: p.read_bytes() for p in good.iterdir()} == files

        # A root rotation: the next refresh steps to root v2.
        repo.rotate_root()
        out = tuf_ok("refresh", "--metadata-url", url, "--metadata-dir", str(trust))
        assert out.startswith("Trusted: root v2, ")
        assert Metadata[Root].from_file(str(trust / "root.json")).signed.version == 2

        # A tampered file on the server: not written.
        served = next((repo.directory / "targets").glob("*.firmware.bin"))
        data = bytearray(served.read_bytes())
        data[100] ^= 0x01
        served.write_bytes(bytes(data))
        bad = tmp_path / "bad"
        tuf_fails(
            "download", "--metadata-url", url, "--metadata-dir", str(trust),
            "--target-base-url", targets_url, "--target-dir", str(bad), "firmware.bin",
            says="verification failed: refused: length or hash mismatch",
        )  # fmt: skip
        assert list(bad.iterdir()) == []

        # A trust store started from another repository's root refuses this one.
        other = PlainRepository.create(tmp_path / "other", {"x": b"x"})
        wrong = tmp_path / "wrong-trust"
        tuf_ok("init", "--metadata-dir", str(wrong), str(other.root_file()))
        tuf_fails(
            "refresh", "--metadata-url", url, "--metadata-dir", str(wrong),
            says="verification failed: refused: metadata not signed by the trusted keys",
        )  # fmt: skip
        assert Metadata[Root].from_file(str(wrong / "root.json")).signed.version == 1
        assert not (wrong / "timestamp.json").exists()

    # `tuf init` takes only a root signed by its own root keys.
    unsigned = new_root(repo.signers)
    unsigned.sign(repo.signers[TARGETS])  # a key of the root, but not a root key
    forged = tmp_path / "forged-root.json"
    forged.write_bytes(unsigned.to_bytes())
    empty = tmp_path / "refused-trust"
    tuf_fails(
        "init", "--metadata-dir", str(empty), str(forged),
        says="is not signed by enough of its own root keys",
    )  # fmt: skip
    assert not (empty / "root.json").exists()
    not_root = tmp_path / "timestamp.json"
    shutil.copy(repo.directory / "metadata" / "timestamp.json", not_root)
    tuf_fails(
        "init",
        "--metadata-dir",
        str(empty),
        str(not_root),
        says="is timestamp metadata, not a root",
    )
