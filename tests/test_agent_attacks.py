"""Attacks on a real device agent: `tufa-agent` processes behind a tampering proxy, a
fake update server with its own keys, and mirrors forged with stolen online keys.

Every test first shows the genuine path works through the same proxy (the device
installs a first build), then stages one attack and checks that the agent

  (a) refuses: `run --once` exits 1, `status --json` names the kind of refusal (the
      same line is logged) and nothing new is downloaded, staged or installed;
  (b) keeps running its last good build: the bytes in the `current` slot and the
      installed version are what they were;
  (c) recovers once the attack stops, installing the genuine next build.

The one exception to (a) is a lower version offered by metadata that does verify (a
thief of the CI online keys): the agent declines it as a decision, not a failure, so
`run --once` exits 0 and says why.

Where an attack could be refused for a reason other than the one under test (a forgery
that is simply malformed), a control shows the forgery is otherwise sound: the same
construction with the missing key, or an independent client trusting the forger's root,
goes through.

The agent does not depend on the database backend: the man in the middle of seed 003
runs on both, the rest on SQLite only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient import Updater

from tests.agent_helpers import (
    HARDWARE_ID,
    TAG,
    AgentDevice,
    Exchange,
    Tamper,
    TamperingProxy,
    build_bytes,
    image_name,
    publish_build,
)
from tests.helpers import (
    Factory,
    Server,
    create_factory,
    served_metadata,
    set_clock_offset,
    write_forged_mirror,
)
from tests.test_rotations import stolen_online_signers
from tests.test_waves import release, start_owner
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP
from tufa.demo.impostor import FileServer, SeenRequest

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

DAY = 86400
ROLES = (ROOT, TIMESTAMP, SNAPSHOT, TARGETS)
EVIL = b"the attacker's firmware\n" * 2048

# What the agent says (`status --json` last_error, and its log) for each refusal.
UNSIGNED = "refused: metadata not signed by the trusted keys"
ROLLBACK = "refused: rollback attack or bad version"
MISMATCH = "refused: length or hash mismatch"
EXPIRED = "refused: expired metadata"
TOO_LONG = "refused: response longer than allowed"
BAD_HASH = "the bytes do not match the signed hash, so they were thrown away"
OVERSIZED = "bytes the signed metadata allows; download refused"


# -- the stage ------------------------------------------------------------------------------


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Closes the proxies and fake servers a test starts."""
    with ExitStack() as stack:
        yield stack


def proxy_to(stack: ExitStack, upstream: str) -> TamperingProxy:
    proxy = TamperingProxy(upstream)
    stack.callback(proxy.close)
    return proxy


def fake_server(stack: ExitStack, files: Mapping[str, bytes] | None = None) -> FileServer:
    """An impersonator of the update server, or the evil host a forged target points at."""
    fake = FileServer(files)
    stack.callback(fake.close)
    return fake


def device_behind(
    factory: Factory, proxy: TamperingProxy, where: Path, channel: str = "ci"
) -> AgentDevice:
    """A device registered through the proxy: all its traffic goes through it."""
    return AgentDevice.register(factory, where / "devices", channel, server_url=proxy.url)


# -- what the device does and has -------------------------------------------------------------


def install(device: AgentDevice, version: str, data: bytes | None = None) -> None:
    """One `run --once` installs build `version` (`data`, or the CI build's bytes)."""
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    status = status_file(device)
    assert status["last_error"] is None, status
    assert status["pending"] is None, status
    assert (status["installed"] or {}).get("version") == version, (status, done.stderr)
    assert device.running_bytes() == (build_bytes(version) if data is None else data)


def status_file(device: AgentDevice) -> dict[str, Any]:
    """The agent's status.json, read directly (`status --json` costs a process)."""
    found: dict[str, Any] = json.loads((device.dir / "status.json").read_bytes())
    return found


def trusted_versions(device: AgentDevice) -> dict[str, int]:
    """The version of each role in the device's trust store (read directly)."""
    return {role: version_of(data) for role, data in trusted_files(device).items()}


def on_disk(device: AgentDevice) -> dict[str, Any]:
    """What the device holds that an install or a download would change: the `current`
    link and every file in its slots and downloads, by content."""
    files = {
        str(path.relative_to(device.dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("slots", "downloads")
        for path in sorted((device.dir / folder).rglob("*"))
        if path.is_file()
    }
    current = device.dir / "current"
    return {"current": os.readlink(current) if current.is_symlink() else None, "files": files}


def assert_refused(
    device: AgentDevice, says: str, version: str, *also: str, data: bytes | None = None
) -> dict[str, Any]:
    """`run --once` fails with an error saying `says` (and each of `also`); the device
    still runs build `version` (`data`), and nothing was downloaded, staged or installed.
    No trusted metadata went down. Returns the status after."""
    before, trusted = on_disk(device), trusted_versions(device)
    done = device.run_once()
    assert done.returncode == 1, f"the attack was not refused:\n{done.stderr}"
    status = device.status()
    error = status["last_error"]
    assert isinstance(error, str), status
    for fragment in (says, *also):
        assert fragment in error, f"{fragment!r} not in {error!r}"
    assert f"check failed: {error}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert status["installing"] is None, status
    assert (status["installed"] or {}).get("version") == version, status
    assert device.running_bytes() == (build_bytes(version) if data is None else data)
    assert on_disk(device) == before, "the attack left files on the device"
    for role, seen in trusted.items():
        assert status["trusted_metadata"][role] >= seen, (role, trusted, status)
    return status


def recover(device: AgentDevice, proxy: TamperingProxy, version: str) -> None:
    """The attack stops: the next check installs the genuine build `version`."""
    proxy.tamper = None
    install(device, version)


def trusted_files(device: AgentDevice) -> dict[str, bytes]:
    """The metadata the device trusts now, as ngclient stored it (the exact bytes)."""
    return {role: (device.dir / "metadata" / f"{role}.json").read_bytes() for role in ROLES}


def version_of(data: bytes) -> int:
    version: int = json.loads(data)["signed"]["version"]
    return version


# -- tampering ----------------------------------------------------------------------------------


def running_build_1(
    factory: Factory, where: Path, stack: ExitStack
) -> tuple[TamperingProxy, AgentDevice]:
    """The genuine path first: a CI device behind a proxy that tampers with nothing yet,
    with build 1 published and installed through it."""
    proxy = proxy_to(stack, factory.server.url)
    device = device_behind(factory, proxy, where)
    publish_build(factory, "1")
    install(device, "1")
    return proxy, device


def filename(exchange: SeenRequest) -> str:
    """The last component of the request path: `timestamp.json`, `3.snapshot.json`,
    `SHA256.NAME` of a target."""
    return exchange.path.split("?")[0].rsplit("/", 1)[-1]


def is_role(exchange: SeenRequest, role: str) -> bool:
    """A request for `role`'s metadata (consistent snapshots: `N.ROLE.json`)."""
    name = filename(exchange)
    if "/metadata/" not in exchange.path:
        return False
    return name == "timestamp.json" if role == TIMESTAMP else name.endswith(f".{role}.json")


def is_target(exchange: SeenRequest) -> bool:
    return "/repo/" in exchange.path and "/targets/" in exchange.path


def answer(exchange: Exchange, body: bytes, status: int = 200) -> None:
    exchange.status, exchange.body = status, body
    exchange.response_headers = {"Content-Type": "application/octet-stream"}


def serving(files: Mapping[str, bytes]) -> Tamper:
    """Answer a GET for any of `files` (by file name) with its bytes; pass the rest."""

    def tamper(exchange: Exchange) -> None:
        if exchange.method == "GET" and filename(exchange) in files:
            answer(exchange, files[filename(exchange)])

    return tamper


def rewriting(role: str, change: Callable[[bytes], bytes]) -> Tamper:
    """Pass every answer, but `change` the body of the genuine `role` metadata."""

    def tamper(exchange: Exchange) -> None:
        if is_role(exchange, role) and exchange.status == 200:
            exchange.body = change(exchange.body)

    return tamper


def rewriting_targets(change: Callable[[bytes], bytes]) -> Tamper:
    """Pass every answer, but `change` the bytes of each target file downloaded."""

    def tamper(exchange: Exchange) -> None:
        if is_target(exchange) and exchange.status in (200, 206):
            exchange.body = change(exchange.body)

    return tamper


def flip_signature(body: bytes) -> bytes:
    """One byte of the (first) signature changed, nothing else."""
    sig: str = json.loads(body)["signatures"][0]["sig"]
    assert body.count(sig.encode()) == 1
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    return body.replace(sig.encode(), flipped.encode())


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


# -- forgeries ------------------------------------------------------------------------------------


def custom(version: str, url: str | None = None) -> dict[str, Any]:
    """A target's custom metadata as the server writes it, for this device's kind."""
    found: dict[str, Any] = {"version": version, "hardwareIds": [HARDWARE_ID], "tags": [TAG]}
    if url is not None:
        found["url"] = url
    return found


def target_file(version: str, data: bytes, url: str | None = None) -> TargetFile:
    target = TargetFile.from_data(image_name(version), data, ["sha256"])
    target.unrecognized_fields["custom"] = custom(version, url)
    return target


def target_filename(target: TargetFile) -> str:
    return f"{target.hashes['sha256']}.{target.path}"


def signed_bytes(signed: Root | Timestamp | Snapshot | Targets, *signers: Signer) -> bytes:
    md: Metadata[Any] = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


def fake_repository(
    factory: Factory, channel: str, version: str, data: bytes, *, root_v2: bool, url: str | None
) -> tuple[dict[str, bytes], bytes]:
    """A whole TUF repository made with python-tuf's Metadata API and fresh keys, laid out
    at the URLs of `factory`'s `channel`, offering build `version` (`data`, hosted by the
    fake server itself or at `url`). Its metadata versions are far above anything the
    device trusts, so only the keys can make it refuse. With `root_v2`, the fake also
    serves a root v2 (chained from its own root v1), claiming to be the next root.
    Returns the files by URL path and the fake root v1."""
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    root = Root(version=1, expires=expires, consistent_snapshot=True)
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    root_v1 = signed_bytes(root, signers[ROOT])
    target = target_file(version, data, url)
    n = 1000
    targets_bytes = signed_bytes(
        Targets(version=n, expires=expires, targets={target.path: target}), signers[TARGETS]
    )
    snapshot_bytes = signed_bytes(
        Snapshot(version=n, expires=expires, meta={"targets.json": MetaFile(n)}),
        signers[SNAPSHOT],
    )
    snapshot_meta = MetaFile(
        n, len(snapshot_bytes), {"sha256": hashlib.sha256(snapshot_bytes).hexdigest()}
    )
    timestamp_bytes = signed_bytes(
        Timestamp(version=n, expires=expires, snapshot_meta=snapshot_meta), signers[TIMESTAMP]
    )
    base = factory.path(f"/repo/{channel}")
    files = {
        f"{base}/metadata/1.root.json": root_v1,
        f"{base}/metadata/root.json": root_v1,
        f"{base}/metadata/timestamp.json": timestamp_bytes,
        f"{base}/metadata/{n}.snapshot.json": snapshot_bytes,
        f"{base}/metadata/{n}.targets.json": targets_bytes,
    }
    if url is None:
        files[f"{base}/targets/{target_filename(target)}"] = data
    if root_v2:
        root.version = 2
        files[f"{base}/metadata/2.root.json"] = signed_bytes(root, signers[ROOT])
    return files, root_v1


def assert_sound_repository(
    fake: FileServer, factory: Factory, channel: str, root_v1: bytes, where: Path
) -> TargetFile:
    """Control: python-tuf's ngclient, trusting the fake's own root, refreshes from it
    without error. So a device refuses it for its keys, not for a malformed repository."""
    where.mkdir(parents=True)
    base = f"{fake.url}{factory.path(f'/repo/{channel}')}"
    updater = Updater(
        str(where), f"{base}/metadata/", str(where), f"{base}/targets/", bootstrap=root_v1
    )
    updater.refresh()
    targets = updater._trusted_set.targets.targets  # read-only look at what it trusts
    (found,) = targets.values()
    return found


def forged_files(
    device: AgentDevice, targets: Metadata[Targets], stolen: dict[str, Signer], where: Path
) -> dict[str, bytes]:
    """What a mirror holding the stolen online keys serves `device` (by file name):
    `targets`, and a snapshot and timestamp naming it, re-signed with those keys."""
    write_forged_mirror(trusted_files(device), targets, stolen, where)
    return {path.name: path.read_bytes() for path in where.iterdir() if path.name != "root.json"}


def next_targets(device: AgentDevice) -> Metadata[Targets]:
    """The targets the device trusts, as the next version, unsigned: for a forger to edit."""
    md = Metadata[Targets].from_bytes(trusted_files(device)[TARGETS])
    md.signed.version += 1
    md.signatures.clear()
    return md


# -- 1. seed 003: the man in the middle with its own keys ------------------------------------


@pytest.mark.parametrize("root_v2", [False, True], ids=["keeps-root-v1", "claims-root-v2"])
def test_a_fake_server_with_its_own_keys_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, root_v2: bool
) -> None:
    """Build 764 runs; a fake update server offers build 765 from a complete repository
    signed with its own fresh keys. The device refuses it, and once it talks to the real
    server again it installs the genuine 766."""
    proxy = proxy_to(stack, factory.server.url)
    device = device_behind(factory, proxy, tmp_path)
    publish_build(factory, "764")
    install(device, "764")
    trusted = trusted_versions(device)

    files, fake_root = fake_repository(factory, "ci", "765", EVIL, root_v2=root_v2, url=None)
    fake = fake_server(stack, files)
    offered = assert_sound_repository(fake, factory, "ci", fake_root, tmp_path / "control")
    assert offered.unrecognized_fields["custom"]["version"] == "765"
    fake.seen.clear()
    device.point_at(fake.url)
    refused_role = ROOT if root_v2 else TIMESTAMP
    status = assert_refused(device, UNSIGNED, "764", f"{refused_role} was signed by 0/1")
    assert status["trusted_metadata"] == trusted, "the device trusted some of the fake's metadata"
    asked = [filename(e) for e in fake.seen if e.method == "GET"]
    assert asked == ["2.root.json"] + ([] if root_v2 else ["timestamp.json"]), asked
    assert not any("/targets/" in e.path for e in fake.seen), "the fake build was downloaded"

    device.point_at(proxy.url)
    publish_build(factory, "766")
    recover(device, proxy, "766")
    assert trusted_versions(device)[ROOT] == 1


# -- 2-4, 12. replays of genuine metadata the device has seen superseded -----------------------

# what is replayed -> what the agent says
REPLAYS = {
    "timestamp": ((TIMESTAMP,), ROLLBACK),
    "snapshot": ((SNAPSHOT,), MISMATCH),  # the newer timestamp pins the snapshot's hash
    "targets": ((TARGETS,), MISMATCH),  # the newer snapshot pins the targets' hash too
    "whole-set": ((TIMESTAMP, SNAPSHOT, TARGETS), ROLLBACK),
}


@sqlite_only
@pytest.mark.parametrize("replayed", list(REPLAYS))
def test_replayed_old_metadata_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, replayed: str
) -> None:
    roles, says = REPLAYS[replayed]
    proxy, device = running_build_1(factory, tmp_path, stack)
    old = trusted_files(device)  # genuine, captured while build 1 was the newest
    publish_build(factory, "2")
    install(device, "2")
    publish_build(factory, "3")
    targets_version = trusted_versions(device)[TARGETS]

    def replay(exchange: Exchange) -> None:
        for role in roles:
            if is_role(exchange, role):
                answer(exchange, old[role])

    proxy.tamper = replay
    status = assert_refused(device, says, "2")
    assert status["trusted_metadata"][TARGETS] == targets_version
    assert any(is_role(e, roles[0]) for e in proxy.seen[-5:]), "the replay was not served"
    recover(device, proxy, "3")


# -- 5. expiry -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clock_server(
    make_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Server, Path]:
    """A server whose clock a test moves; it re-signs online metadata every second."""
    offset_file = tmp_path_factory.mktemp("clock") / "offset"
    set_clock_offset(offset_file, 0)
    extra = ("--clock-offset-file", str(offset_file), "--resign-interval", "1s")
    return make_server("sqlite", extra_args=extra), offset_file


def expires(data: bytes) -> datetime:
    return Metadata.from_bytes(data).signed.expires


def test_a_timestamp_signed_already_expired_is_refused(
    clock_server: tuple[Server, Path], tmp_path: Path, stack: ExitStack
) -> None:
    """The server's clock runs two days late (a dead RTC, a bad NTP answer): the genuine
    timestamp it signs for build 2 expired a day ago for the device. Once the clock is
    right again the server re-signs, and the device installs build 2."""
    server, offset_file = clock_server
    factory = create_factory(server)
    proxy, device = running_build_1(factory, tmp_path, stack)
    try:
        set_clock_offset(offset_file, -2 * DAY)
        publish_build(factory, "2")
        timestamp = served_metadata(factory, "ci")[TIMESTAMP]
        assert expires(timestamp) < datetime.now(UTC) - timedelta(hours=23)
        assert_refused(device, EXPIRED, "1", "timestamp")
    finally:
        set_clock_offset(offset_file, 0)
    deadline = time.monotonic() + 15
    while expires(served_metadata(factory, "ci")[TIMESTAMP]) < datetime.now(UTC):
        assert time.monotonic() < deadline, "the server did not re-sign its timestamp"
        time.sleep(0.2)
    recover(device, proxy, "2")


def test_a_frozen_timestamp_is_refused_once_it_expires(
    clock_server: tuple[Server, Path], tmp_path: Path, stack: ExitStack
) -> None:
    """A freeze attack: the man in the middle keeps serving the last timestamp the device
    trusted and hides build 3. Once that timestamp expires, the device says so rather than
    believe nothing is new."""
    server, offset_file = clock_server
    factory = create_factory(server)
    proxy, device = running_build_1(factory, tmp_path, stack)
    try:
        # A timestamp valid for eight more seconds of the device's time (the server's
        # clock is almost a day late when it signs it).
        set_clock_offset(offset_file, -(DAY - 8))
        publish_build(factory, "2")
        install(device, "2")
    finally:
        set_clock_offset(offset_file, 0)
    frozen = trusted_files(device)[TIMESTAMP]
    publish_build(factory, "3")
    proxy.tamper = serving({"timestamp.json": frozen})
    install(device, "2")  # still valid: the freeze goes unnoticed for now
    time.sleep(max(0.0, (expires(frozen) - datetime.now(UTC)).total_seconds()) + 1.0)
    assert_refused(device, EXPIRED, "2", "timestamp")
    recover(device, proxy, "3")


# -- 6, 7. target files: other bytes, more bytes -------------------------------------------------

# how the proxy changes the bytes of build 2
SWAPS: dict[str, Callable[[bytes], bytes]] = {
    "one-byte-flipped": flip_byte,
    "older-signed-build": lambda _: build_bytes("1"),  # same length, a genuine old image
    "attacker-firmware": lambda data: (EVIL * (len(data) // len(EVIL) + 1))[: len(data)],
}


@sqlite_only
@pytest.mark.parametrize("swap", list(SWAPS))
def test_target_bytes_that_differ_from_their_hash_are_thrown_away(
    factory: Factory, tmp_path: Path, stack: ExitStack, swap: str
) -> None:
    proxy, device = running_build_1(factory, tmp_path, stack)
    publish_build(factory, "2")
    proxy.tamper = rewriting_targets(SWAPS[swap])
    assert_refused(device, BAD_HASH, "1", image_name("2"))
    assert proxy.requests_for(image_name("2")), "build 2 was not downloaded"
    recover(device, proxy, "2")


@sqlite_only
def test_a_forged_tail_on_a_resumed_download_is_thrown_away(
    factory: Factory, tmp_path: Path, stack: ExitStack
) -> None:
    """The link drops halfway through build 2; when the device resumes (a Range request),
    the man in the middle supplies the rest. The whole file fails the hash and goes."""
    proxy, device = running_build_1(factory, tmp_path, stack)
    data = publish_build(factory, "2")
    half = len(data) // 2
    proxy.tamper = rewriting_targets(lambda body: body[:half])
    done = device.run_once()
    assert done.returncode == 1, done.stderr
    assert "the next attempt resumes" in device.status()["last_error"]
    part = device.dir / "downloads" / f"{hashlib.sha256(data).hexdigest()}.part"
    assert part.read_bytes() == data[:half]

    def forged_tail(exchange: Exchange) -> None:
        if is_target(exchange):
            answer(exchange, EVIL[: len(data) - half], 206)
            exchange.response_headers["Content-Range"] = f"bytes {half}-{len(data) - 1}/{len(data)}"

    proxy.tamper = forged_tail
    before = on_disk(device)
    done = device.run_once()
    assert done.returncode == 1, done.stderr
    resumed = proxy.requests_for(image_name("2"))[-1]
    assert resumed.headers.get("Range") == f"bytes={half}-", resumed.headers
    status = device.status()
    assert BAD_HASH in status["last_error"], status
    assert not part.exists()
    assert on_disk(device) == {
        **before,
        "files": {k: v for k, v in before["files"].items() if not k.endswith(".part")},
    }
    assert status["installed"]["version"] == "1"
    assert device.running_bytes() == build_bytes("1")
    recover(device, proxy, "2")


@sqlite_only
def test_a_target_download_far_longer_than_signed_is_cut_off(
    factory: Factory, tmp_path: Path, stack: ExitStack
) -> None:
    proxy, device = running_build_1(factory, tmp_path, stack)
    data = publish_build(factory, "2")
    proxy.tamper = rewriting_targets(lambda body: body + os.urandom(8 * 1024 * 1024))
    assert_refused(device, OVERSIZED, "1", f"more than the {len(data)} bytes")
    recover(device, proxy, "2")


# padded role -> padding (whitespace after the JSON: still valid, still verifying)
PADDINGS = {
    TIMESTAMP: 32 * 1024,  # the agent accepts 16 KiB of timestamp
    SNAPSHOT: 64 * 1024,  # the timestamp gives the snapshot's exact length
    TARGETS: 9 * 1024 * 1024,  # no length is signed for targets: the agent caps them at 8 MiB
}


@sqlite_only
@pytest.mark.parametrize("role", list(PADDINGS))
def test_metadata_far_longer_than_allowed_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, role: str
) -> None:
    proxy, device = running_build_1(factory, tmp_path, stack)
    publish_build(factory, "2")
    padded = rewriting(role, lambda body: body + b" " * PADDINGS[role])
    # Control: padded, the metadata still parses and verifies; only its size is wrong.
    trusted = trusted_files(device)
    root = Metadata[Root].from_bytes(trusted[ROOT])
    root.verify_delegate(role, Metadata.from_bytes(trusted[role] + b" " * PADDINGS[role]))
    proxy.tamper = padded
    assert_refused(device, TOO_LONG, "1")
    recover(device, proxy, "2")


# -- 8. targets that do not match what the snapshot names ------------------------------------


def compact(md: Any) -> bytes:
    """JSON as the server writes metadata: sorted keys, no spaces."""
    return json.dumps(md, separators=(",", ":"), sort_keys=True).encode()


def snapshot_naming(body: bytes, targets_version: int) -> bytes:
    """The snapshot `body` rewritten to name `targets_version`, its signature left as is."""
    md = json.loads(body)
    md["signed"]["meta"]["targets.json"]["version"] = targets_version
    return compact(md)


def timestamp_pinning(body: bytes, snapshot: bytes) -> bytes:
    """The timestamp `body` rewritten to pin `snapshot`'s length and hash, unsigned."""
    md = json.loads(body)
    md["signed"]["meta"]["snapshot.json"]["length"] = len(snapshot)
    md["signed"]["meta"]["snapshot.json"]["hashes"] = {
        "sha256": hashlib.sha256(snapshot).hexdigest()
    }
    return compact(md)


@sqlite_only
@pytest.mark.parametrize(
    "how", ["other-genuine-targets", "snapshot-rewritten", "snapshot-and-timestamp-rewritten"]
)
def test_targets_that_do_not_match_the_snapshot_are_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, how: str
) -> None:
    proxy, device = running_build_1(factory, tmp_path, stack)
    kept = trusted_versions(device)[TARGETS]
    publish_build(factory, "2")
    genuine = served_metadata(factory, "ci")
    if how == "other-genuine-targets":
        # Genuine timestamp and snapshot for build 2, and under the targets file name
        # they ask for, the genuine (newer) targets of build 3: the snapshot pins the
        # targets it names by length and hash, and the longer file is cut off there.
        named = json.loads(genuine[SNAPSHOT])["signed"]["meta"]["targets.json"]["version"]
        publish_build(factory, "3")
        other = served_metadata(factory, "ci")[TARGETS]
        assert version_of(other) != named
        proxy.tamper = serving(
            {
                "timestamp.json": genuine[TIMESTAMP],
                f"{version_of(genuine[SNAPSHOT])}.snapshot.json": genuine[SNAPSHOT],
                f"{named}.targets.json": other,
            }
        )
        says, also, after = TOO_LONG, "", "3"
    else:
        # The snapshot of build 2 rewritten to name the targets the device already has:
        # accepted, it would keep the device on build 1 without a word.
        forged = snapshot_naming(genuine[SNAPSHOT], kept)
        files = {f"{version_of(genuine[SNAPSHOT])}.snapshot.json": forged}
        says, also, after = MISMATCH, "", "2"
        if how == "snapshot-and-timestamp-rewritten":
            files["timestamp.json"] = timestamp_pinning(genuine[TIMESTAMP], forged)
            says, also = UNSIGNED, "timestamp"
        proxy.tamper = serving(files)
    status = assert_refused(device, says, "1", also)
    assert status["trusted_metadata"][TARGETS] == kept
    recover(device, proxy, after)


# -- 9, 14. production: the online keys alone, and targets hosted by an evil host --------------


def forge_production(
    device: AgentDevice,
    proxy: TamperingProxy,
    target: TargetFile,
    data: bytes,
    signers: list[Signer],
    stolen: dict[str, Signer],
    where: Path,
) -> None:
    """The proxy serves `device` a forged production repository: the targets it trusts
    plus `target` (whose bytes are `data`), signed by `signers`, and a snapshot and a
    timestamp naming them, signed with the stolen online keys."""
    md = next_targets(device)
    md.signed.targets[target.path] = target
    for signer in signers:
        md.sign(signer, append=True)
    files = forged_files(device, md, stolen, where)
    files[target_filename(target)] = data
    proxy.tamper = serving(files)


@sqlite_only
@pytest.mark.parametrize("holders", [("online",), ("offline",)], ids=lambda h: f"{h[0]}-key-alone")
def test_production_targets_need_the_online_and_an_offline_signature(
    server: Server, factory: Factory, tmp_path: Path, stack: ExitStack, holders: tuple[str]
) -> None:
    """An attacker with the server's disk (all its online keys) signs production targets
    offering its firmware as build 2; or holds the owner's offline targets key without the
    online one. A production device refuses both; the same forgery with both signatures,
    as a control, is installed."""
    owner = start_owner(factory, tmp_path / "owner")
    stolen = stolen_online_signers(server, factory, "prod")
    (offline,) = OfflineArchive.load(owner.archive).keys_for(TARGETS)
    by_holder = {"online": stolen[TARGETS], "offline": offline.prod.signer()}
    proxy = proxy_to(stack, factory.server.url)
    device = device_behind(factory, proxy, tmp_path, "prod")
    publish_build(factory, "1")
    release(owner, "w-1", "1")
    install(device, "1")
    kept = trusted_versions(device)[TARGETS]

    publish_build(factory, "2")  # a CI build, not released to production
    evil = target_file("2", EVIL)
    signers = [by_holder[h] for h in holders]
    forge_production(device, proxy, evil, EVIL, signers, stolen, tmp_path / "mirror")
    status = assert_refused(device, UNSIGNED, "1", "targets was signed by 1/2 keys")
    assert status["trusted_metadata"][TARGETS] == kept
    assert not proxy.requests_for(target_filename(evil)), "the forged build was downloaded"

    proxy.tamper = None
    release(owner, "w-2", "2")
    install(device, "2")

    # Control: the forgery signed by both keys is what a production device installs.
    control = target_file("3", EVIL)
    both = [stolen[TARGETS], offline.prod.signer()]
    forge_production(device, proxy, control, EVIL, both, stolen, tmp_path / "control")
    install(device, "3", EVIL)


@sqlite_only
def test_a_fake_server_redirecting_targets_to_an_evil_host_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack
) -> None:
    """The fake server of seed 003 lists build 2 with a custom "url" on the attacker's
    host. Refused before any download: the evil host never hears from the device."""
    evil_host = fake_server(stack, {"/firmware.bin": EVIL})
    url = f"{evil_host.url}/firmware.bin"
    proxy, device = running_build_1(factory, tmp_path, stack)
    files, fake_root = fake_repository(factory, "ci", "2", EVIL, root_v2=False, url=url)
    fake = fake_server(stack, files)
    offered = assert_sound_repository(fake, factory, "ci", fake_root, tmp_path / "control")
    assert offered.unrecognized_fields["custom"]["url"] == url
    device.point_at(fake.url)
    assert_refused(device, UNSIGNED, "1", "timestamp was signed by 0/1")
    assert evil_host.seen == [], "the device contacted the evil host"
    device.point_at(proxy.url)
    publish_build(factory, "2")
    recover(device, proxy, "2")
    assert evil_host.seen == []


@sqlite_only
def test_production_targets_on_an_evil_host_need_the_offline_signature(
    server: Server, factory: Factory, tmp_path: Path, stack: ExitStack
) -> None:
    """With the server's online keys, an attacker lists build 2 for production devices
    with a custom "url" on its own host. Refused before any download; as a control, the
    same forgery with the owner's offline signature too is fetched from that URL (without
    the device credential) and installed."""
    evil_host = fake_server(stack, {"/firmware.bin": EVIL})
    url = f"{evil_host.url}/firmware.bin"
    owner = start_owner(factory, tmp_path / "owner")
    stolen = stolen_online_signers(server, factory, "prod")
    proxy = proxy_to(stack, factory.server.url)
    device = device_behind(factory, proxy, tmp_path, "prod")
    publish_build(factory, "1")
    release(owner, "w-1", "1")
    install(device, "1")
    evil = target_file("2", EVIL, url)
    forge_production(device, proxy, evil, EVIL, [stolen[TARGETS]], stolen, tmp_path / "m")
    assert_refused(device, UNSIGNED, "1", "targets was signed by 1/2 keys")
    assert evil_host.seen == [], "the device contacted the evil host"
    publish_build(factory, "2")
    proxy.tamper = None
    release(owner, "w-2", "2")
    install(device, "2")

    (offline,) = OfflineArchive.load(owner.archive).keys_for(TARGETS)
    both = [stolen[TARGETS], offline.prod.signer()]
    control = target_file("3", EVIL, url)
    forge_production(device, proxy, control, EVIL, both, stolen, tmp_path / "control")
    assert evil_host.seen == []
    install(device, "3", EVIL)
    assert [e.path for e in evil_host.seen] == ["/firmware.bin"]
    assert "authorization" not in {k.lower() for k in evil_host.seen[0].headers}


@sqlite_only
def test_a_target_download_redirected_to_an_evil_host_is_not_followed(
    factory: Factory, tmp_path: Path, stack: ExitStack
) -> None:
    """The man in the middle answers the download of build 2 with a redirect to its own
    host: the device does not follow it (its credential stays home), installs nothing."""
    evil_host = fake_server(stack, {"/firmware.bin": EVIL})
    proxy, device = running_build_1(factory, tmp_path, stack)
    publish_build(factory, "2")

    def redirect(exchange: Exchange) -> None:
        if is_target(exchange):
            answer(exchange, b"", 302)
            exchange.response_headers["Location"] = f"{evil_host.url}/firmware.bin"

    proxy.tamper = redirect
    assert_refused(device, "the server answered HTTP 302", "1")
    assert evil_host.seen == []
    recover(device, proxy, "2")


# -- 10. never down, even under metadata that verifies ------------------------------------------


@sqlite_only
@pytest.mark.parametrize("offer", ["lower-version", "same-version-other-bytes"])
def test_validly_signed_metadata_never_moves_the_device_down(
    server: Server, factory: Factory, tmp_path: Path, stack: ExitStack, offer: str
) -> None:
    """On the CI channel the online keys are the whole trust: whoever holds them (the
    server, or a thief of its disk) signs metadata the device accepts. Offered only build
    1 again, or other bytes as build 2, the device keeps build 2: its own rule is that the
    version only goes up. This is a decision, not a failure: `run --once` exits 0."""
    stolen = stolen_online_signers(server, factory, "ci")
    proxy, device = running_build_1(factory, tmp_path, stack)
    publish_build(factory, "2")
    install(device, "2")

    md = next_targets(device)
    if offer == "lower-version":
        del md.signed.targets[image_name("2")]  # as if CI had pruned build 2
        offered, data = "1", build_bytes("1")
    else:
        md.signed.targets[image_name("2")] = target_file("2", EVIL)
        offered, data = "2", EVIL
    md.sign(stolen[TARGETS])
    files = forged_files(device, md, stolen, tmp_path / "mirror")
    files[target_filename(md.signed.targets[image_name(offered)])] = data
    proxy.tamper = serving(files)
    before, seen = on_disk(device), len(proxy.seen)
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert f"refusing to move from version 2 to {offered}" in done.stderr, done.stderr
    status = device.status()
    assert status["trusted_metadata"][TARGETS] == md.signed.version, "not even verified"
    assert status["last_error"] is None
    assert status["installed"]["version"] == "2"
    assert device.running_bytes() == build_bytes("2")
    assert on_disk(device) == before
    assert not any(is_target(e) for e in proxy.seen[seen:]), "a lower build was downloaded"
    check = device.agent("check", "--json")
    assert check.returncode == 0, check.stderr
    plan = json.loads(check.stdout)
    assert plan["install"] is None
    assert "never installs a lower or equal version" in plan["reason"]

    # The forged set took the server's next version numbers (an equal timestamp version
    # is ignored): the device moves on once the server has published past them.
    proxy.tamper = None
    publish_build(factory, "3")
    publish_build(factory, "4")
    install(device, "4")


# -- 11. a new root without enough signatures ------------------------------------------------


def rotated_root(trusted: bytes, new_key: Signer, signers: list[Signer]) -> Metadata[Root]:
    """Root v(N+1) where `new_key` replaces the root keys, signed by `signers`."""
    md = Metadata[Root].from_bytes(trusted)
    for keyid in list(md.signed.roles[ROOT].keyids):
        md.signed.revoke_key(keyid, ROOT)
    md.signed.add_key(new_key.public_key, ROOT)
    md.signed.version += 1
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md


@sqlite_only
@pytest.mark.parametrize("forgery", ["new-key-only", "old-key-only", "old-signature-corrupted"])
def test_a_new_root_without_enough_signatures_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, forgery: str
) -> None:
    """A 2.root.json that hands the root role to a new key must be signed by the root key
    the device trusts and by the new key. With one of them missing (or corrupted) the
    device refuses it and keeps trusting root v1; with both, as a control, it follows."""
    owner = start_owner(factory, tmp_path / "owner")
    proxy, device = running_build_1(factory, tmp_path, stack)
    trusted = trusted_files(device)[ROOT]
    root_keyids = Metadata[Root].from_bytes(trusted).signed.roles[ROOT].keyids
    (old,) = [
        k.ci.signer()
        for k in OfflineArchive.load(owner.archive).keys_for(ROOT)
        if k.ci.keyid in root_keyids
    ]
    new = CryptoSigner.generate_ed25519()
    if forgery == "new-key-only":
        forged = rotated_root(trusted, new, [new]).to_bytes()
    elif forgery == "old-key-only":
        forged = rotated_root(trusted, new, [old]).to_bytes()
    else:
        forged = flip_signature(rotated_root(trusted, new, [old, new]).to_bytes())
    publish_build(factory, "2")
    proxy.tamper = serving({"2.root.json": forged})
    status = assert_refused(device, UNSIGNED, "1", "root was signed by 0/1 keys")
    assert status["trusted_metadata"][ROOT] == 1
    assert trusted_files(device)[ROOT] == trusted
    recover(device, proxy, "2")
    assert trusted_versions(device)[ROOT] == 1

    # Control: the same rotation signed by both keys is followed.
    publish_build(factory, "3")
    proxy.tamper = serving({"2.root.json": rotated_root(trusted, new, [old, new]).to_bytes()})
    install(device, "3")
    assert trusted_versions(device)[ROOT] == 2


# -- 13. one byte of a signature changed -------------------------------------------------------

# role -> what the agent says. The snapshot's bytes are pinned by the timestamp, so a
# changed byte there is caught by the hash before its signature is looked at.
# The timestamp pins the snapshot's hash and the snapshot the targets', so a flipped
# signature in either is caught as a hash mismatch before its signature is checked.
BAD_SIGNATURES = {
    TIMESTAMP: (UNSIGNED, "timestamp was signed by 0/1 keys"),
    SNAPSHOT: (MISMATCH, ""),
    TARGETS: (MISMATCH, ""),
}


@sqlite_only
@pytest.mark.parametrize("role", list(BAD_SIGNATURES))
def test_metadata_with_a_bad_signature_is_refused(
    factory: Factory, tmp_path: Path, stack: ExitStack, role: str
) -> None:
    proxy, device = running_build_1(factory, tmp_path, stack)
    kept = trusted_versions(device)[TARGETS]
    publish_build(factory, "2")
    proxy.tamper = rewriting(role, flip_signature)
    says, also = BAD_SIGNATURES[role]
    status = assert_refused(device, says, "1", also)
    assert status["trusted_metadata"][TARGETS] == kept
    recover(device, proxy, "2")


# -- names from the metadata are not paths ------------------------------------------------------

# what the forged target for build 3 carries -> the file on the device it aims at
ESCAPES = {
    "name-leaves-the-slot": ("../../escaped", None),
    "hash-names-the-trusted-root": (image_name("3"), "../metadata/root.json"),
}


@sqlite_only
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_target_names_and_hashes_that_are_paths_are_refused(
    server: Server, factory: Factory, tmp_path: Path, stack: ExitStack, escape: str
) -> None:
    """Whoever holds the CI online keys signs targets the device accepts; still, the
    name and hash of a target are not file paths. A name climbing out of the install slot
    (to overwrite the trust anchor, say, so that rotating the stolen keys no longer
    helps) or a "hash" naming a file of the device is refused, and nothing outside the
    agent's downloads and slots is written or removed. (The server only accepts plain
    names and hex digests.)"""
    stolen = stolen_online_signers(server, factory, "ci")
    proxy, device = running_build_1(factory, tmp_path, stack)
    root = trusted_files(device)[ROOT]
    name, sha256 = ESCAPES[escape]
    target = target_file("3", EVIL)
    target.path = name
    if sha256 is not None:
        target.hashes = {"sha256": sha256}
    md = next_targets(device)
    md.signed.targets[name] = target
    md.sign(stolen[TARGETS])
    files = forged_files(device, md, stolen, tmp_path / "mirror")
    files[name.rsplit("/", 1)[-1]] = EVIL
    proxy.tamper = serving(files)
    outside = sorted(p for p in tmp_path.rglob("*") if "slots" not in p.parts)
    status = assert_refused(
        device, "refused: target", "1", repr(name if sha256 is None else sha256)
    )
    assert trusted_files(device)[ROOT] == root
    assert status["trusted_metadata"][TARGETS] == md.signed.version
    assert sorted(p for p in tmp_path.rglob("*") if "slots" not in p.parts) == outside
    # The forged set took the server's next version numbers (an equal timestamp version
    # is ignored): the device moves on once the server has published past them.
    publish_build(factory, "2")
    publish_build(factory, "3")
    recover(device, proxy, "3")
