"""Serving a device the other channel's genuine files, as anyone in the middle can.

The two channels of a factory are two TUF repositories owned by one owner. If any file
of one verified for a client of the other, a man in the middle holding no key at all
could move a production device onto the CI chain (a CI root has a targets threshold of
1: CI builds nobody released), or freeze it with CI's higher version numbers (ADR 0009).
These helpers collect every file of a channel that an attacker could have recorded, and
serve them, one substitution at a time, through a tampering proxy in front of the
server, to devices of the other channel: python-tuf's ngclient (the independent
verifier, with no tufa code in its way) and the real `tufa-agent`.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater

from tests.agent_helpers import AgentDevice, Exchange, TamperingProxy, image_name
from tests.helpers import Factory, send
from tufa.core.fetcher import BearerFetcher

CHANNELS = ("ci", "prod")
TRUSTED_FILES = ("root.json", "timestamp.json", "snapshot.json", "targets.json")
_METADATA = re.compile(
    r"/repo/(ci|prod)/metadata/(?:([0-9]+)\.)?(root|timestamp|snapshot|targets)\.json$"
)


def other(channel: str) -> str:
    return "prod" if channel == "ci" else "ci"


def metadata_request(url: str) -> tuple[str, str, int | None] | None:
    """(channel, role, version or None) of a request for a channel's TUF metadata."""
    match = _METADATA.search(url.split("?")[0])
    if match is None:
        return None
    channel, number, role = match.groups()
    return channel, role, int(number) if number else None


@dataclass
class ChannelFiles:
    """Every genuine metadata file of one channel an attacker can have recorded: each
    version of the versioned roles, and each timestamp seen on the way."""

    roots: dict[int, bytes] = field(default_factory=dict)
    snapshots: dict[int, bytes] = field(default_factory=dict)
    targets: dict[int, bytes] = field(default_factory=dict)
    timestamps: list[bytes] = field(default_factory=list)

    def versioned(self, role: str) -> dict[int, bytes]:
        return {"root": self.roots, "snapshot": self.snapshots, "targets": self.targets}[role]

    def all_bytes(self) -> set[bytes]:
        return {*self.roots.values(), *self.snapshots.values(), *self.targets.values(),
                *self.timestamps}  # fmt: skip


def record(
    factory: Factory,
    channel: str,
    files: ChannelFiles,
    tags: Iterable[str] = ("main",),
    credentials: Iterable[str] = (),
) -> ChannelFiles:
    """Add what `channel` serves now to `files`: every versioned file, and the current
    timestamp of the channel, of each production tag in `tags`, and of the view each
    device credential in `credentials` is served (a wave, say), as anyone in the middle
    sees them go by."""

    def get(name: str, query: str = "", credential: str | None = None) -> bytes | None:
        path = factory.path(f"/repo/{channel}/metadata/{name}{query}")
        response = send(factory.server, "GET", path, credential or factory.admin_token)
        return response.content if response.status_code == 200 else None

    for role in ("root", "snapshot", "targets"):
        found, version, misses = files.versioned(role), 1, 0
        while misses < 5:  # a wave's reserved but unused version leaves a gap
            data = found.get(version) or get(f"{version}.{role}.json")
            if data is None:
                misses += 1
            else:
                found[version], misses = data, 0
            version += 1
    seen = [get("timestamp.json", query) for query in ("", *(f"?tag={t}" for t in tags))]
    seen += [get("timestamp.json", credential=credential) for credential in credentials]
    for timestamp in seen:
        if timestamp is not None and timestamp not in files.timestamps:
            files.timestamps.append(timestamp)
    return files


def version_of(data: bytes) -> int:
    version: int = json.loads(data)["signed"]["version"]
    return version


# A substitution answers some of a device's metadata requests with the other channel's
# file: returns the bytes to serve (or None: pass the genuine answer through).
Substitution = Callable[[str, int | None], bytes | None]


def substitutions(foreign: ChannelFiles, *, every_version: bool = True) -> dict[str, Substitution]:
    """Each way to serve the other channel's files: each version of each role in place
    of whatever version is asked for, each recorded timestamp, and everything at once,
    by version (the whole other chain: "move the device onto the other channel").
    With `every_version` off, only the newest of each role (for the slower agent runs)."""

    def one(role: str, data: bytes) -> Substitution:
        return lambda asked, _version: data if asked == role else None

    def everything(asked: str, version: int | None) -> bytes | None:
        if asked == "timestamp":
            return max(foreign.timestamps, key=version_of)
        return foreign.versioned(asked).get(version or 0)

    found: dict[str, Substitution] = {"everything": everything}
    for role in ("root", "snapshot", "targets"):
        versions = sorted(foreign.versioned(role))
        for version in versions if every_version else versions[-1:]:
            found[f"{role}-v{version}"] = one(role, foreign.versioned(role)[version])
    timestamps = sorted(foreign.timestamps, key=version_of)
    for timestamp in timestamps if every_version else timestamps[-1:]:
        found[f"timestamp-v{version_of(timestamp)}"] = one("timestamp", timestamp)
    return found


class ChannelSwap:
    """A tamper hook for a TamperingProxy: while `active` is set, a request for channel
    X's metadata gets what the active substitution takes from channel Y's files. It
    counts what it served, so a test knows the attack was staged, not skipped."""

    def __init__(self, proxy: TamperingProxy) -> None:
        self.active: dict[str, Substitution] = {}
        self.served = 0
        proxy.tamper = self

    def __call__(self, exchange: Exchange) -> None:
        request = metadata_request(exchange.path)
        if request is None or exchange.method != "GET":
            return
        channel, role, version = request
        substitution = self.active.get(channel)
        data = None if substitution is None else substitution(role, version)
        if data is None:
            return
        self.served += 1
        exchange.status, exchange.body = 200, data
        exchange.response_headers = {"Content-Type": "application/json"}

    def stage(self, substitution_by_channel: dict[str, Substitution]) -> None:
        self.active, self.served = substitution_by_channel, 0

    def stop(self) -> None:
        self.active = {}


# -- devices ------------------------------------------------------------------------------


@dataclass
class NgclientDevice:
    """python-tuf's ngclient as a device runs it, through the proxy: bootstrapped with its
    channel's root v1, a new Updater over the same trust directory at each poll."""

    factory: Factory
    channel: str
    trust_dir: Path
    metadata_url: str
    device_id: str
    credential: str
    fetcher: BearerFetcher

    @classmethod
    def register(
        cls,
        factory: Factory,
        channel: str,
        proxy: TamperingProxy,
        where: Path,
        root_version: int = 1,
    ) -> NgclientDevice:
        """A device provisioned with its channel's root of `root_version`."""
        device = factory.register_device(channel)
        where.mkdir(parents=True)
        path = factory.path(f"/repo/{channel}/metadata/{root_version}.root.json")
        root = send(factory.server, "GET", path, factory.admin_token)
        assert root.status_code == 200, root.text
        (where / "root.json").write_bytes(root.content)
        url = f"{proxy.url}{factory.path(f'/repo/{channel}/metadata/')}"
        credential = device["credential"]
        return cls(
            factory, channel, where, url, device["id"], credential, BearerFetcher(credential)
        )

    def refresh(self) -> None:
        updater = Updater(
            str(self.trust_dir), self.metadata_url, fetcher=self.fetcher, bootstrap=None
        )
        updater.refresh()

    def trusted(self) -> dict[str, bytes]:
        return {name: (self.trust_dir / name).read_bytes() for name in TRUSTED_FILES
                if (self.trust_dir / name).exists()}  # fmt: skip


def _agent_installed(device: AgentDevice) -> str | None:
    """The version the agent runs, from its status.json (`status --json` costs a process)."""
    status = device.dir / "status.json"
    installed = json.loads(status.read_bytes()).get("installed") if status.exists() else None
    return None if installed is None else str(installed["version"])


def _agent_trusted(device: AgentDevice) -> dict[str, bytes]:
    folder = device.dir / "metadata"
    return {
        name: (folder / name).read_bytes() for name in TRUSTED_FILES if (folder / name).exists()
    }


Device = NgclientDevice | AgentDevice


def register_devices(factory: Factory, proxy: TamperingProxy, where: Path) -> dict[str, Device]:
    """An ngclient device and a tufa-agent device of each channel, all behind `proxy`."""
    devices: dict[str, Device] = {}
    for channel in CHANNELS:
        devices[f"ngclient-{channel}"] = NgclientDevice.register(
            factory, channel, proxy, where / f"ngclient-{channel}"
        )
        devices[f"agent-{channel}"] = AgentDevice.register(
            factory, where / "agents", channel, server_url=proxy.url
        )
    return devices


def credential_of(device: Device) -> str:
    if isinstance(device, AgentDevice):
        return (device.dir / "credential").read_text().strip()
    return device.credential


def follow(devices: Mapping[str, Device], expected: Mapping[str, str]) -> None:
    """With nothing tampered, every device reaches its channel's release on its next
    poll: `expected` names the build each channel's devices must then have."""
    for name, device in devices.items():
        version = expected[device.channel]
        if isinstance(device, AgentDevice):
            done = device.run_once()
            assert done.returncode == 0, f"{name}: {done.stderr}"
            assert _agent_installed(device) == version, f"{name}: {done.stderr}"
        else:
            device.refresh()
            targets = Metadata[Targets].from_bytes(device.trusted()["targets.json"]).signed
            assert image_name(version) in targets.targets, f"{name} misses build {version}"


@dataclass
class Attempt:
    """One substitution tried on one device, and what came of it."""

    device: str
    substitution: str
    refused: bool  # the refresh failed
    said: str  # the error
    accepted: list[str]  # trusted files that are the other channel's (must stay empty)
    staged: bool = True  # the device asked for what the substitution replaces
    installed_before: str | None = None
    installed_after: str | None = None


def attempt(swap: ChannelSwap, name: str, device: Device, label: str, substitution: Substitution,
            foreign: ChannelFiles) -> Attempt:  # fmt: skip
    """Serve `device` the other channel's files by `substitution` for one poll."""
    swap.stage({device.channel: substitution})
    try:
        if isinstance(device, AgentDevice):
            before = _agent_installed(device)
            done = device.run_once()
            trusted = _agent_trusted(device)
            found = Attempt(
                name,
                label,
                refused=done.returncode != 0,
                said=done.stderr[-600:],
                accepted=[],
                installed_before=before,
                installed_after=_agent_installed(device),
            )
        else:
            try:
                device.refresh()
                found = Attempt(name, label, False, "", [])
            except (exceptions.RepositoryError, exceptions.DownloadError) as e:
                found = Attempt(name, label, True, f"{type(e).__name__}: {e}", [])
            trusted = device.trusted()
    finally:
        swap.stop()
    found.staged = swap.served > 0
    foreign_bytes = foreign.all_bytes()
    found.accepted = sorted(f for f, data in trusted.items() if data in foreign_bytes)
    return found


def attempt_all(
    swap: ChannelSwap, devices: Mapping[str, Device], files: Mapping[str, ChannelFiles]
) -> Iterator[Attempt]:
    """Every substitution of the other channel's files, on every device: all versions
    for ngclient devices, the newest of each role and the whole chain for agents."""
    for name, device in devices.items():
        foreign = files[other(device.channel)]
        every_version = not isinstance(device, AgentDevice)
        for label, substitution in substitutions(foreign, every_version=every_version).items():
            yield attempt(swap, name, device, label, substitution, foreign)


def assert_all_refused(
    swap: ChannelSwap, devices: Mapping[str, Device], files: Mapping[str, ChannelFiles], step: str
) -> int:
    """Every substitution is refused, no device trusts any file of the other channel
    after it, and every agent still runs what it ran. Returns how many were staged.

    A device asks for its root, timestamp and snapshot at every poll while it is behind,
    so those substitutions are always staged; targets only when its targets changed (a
    completed wave it already had names the same targets version)."""
    staged = 0
    for found in attempt_all(swap, devices, files):
        where = f"after {step}: {found.device} served {found.substitution}"
        if not found.substitution.startswith("targets-"):
            assert found.staged, f"{where}: never asked for, so the attack was not staged"
        assert not found.accepted, f"{where}: now trusts the other channel's {found.accepted}"
        assert found.installed_after == found.installed_before, (
            f"{where}: install changed from {found.installed_before} to {found.installed_after}"
            f" ({found.said})"
        )
        if found.staged:
            assert found.refused, f"{where}: accepted"
            staged += 1
    return staged


def run_once_served_view(
    device: AgentDevice, proxy: TamperingProxy, factory: Factory, channel: str, query: str
) -> subprocess.CompletedProcess[str]:
    """One `tufa-agent run --once` while the proxy answers the device's `timestamp.json`
    with the genuine one of another view of its channel (`query`, as a token reads it)."""
    path = factory.path(f"/repo/{channel}/metadata/timestamp.json")
    other = send(factory.server, "GET", f"{path}?{query}", factory.admin_token).content

    def serve_other(exchange: Exchange) -> None:
        if exchange.path.endswith(f"/repo/{channel}/metadata/timestamp.json"):
            exchange.status, exchange.body = 200, other

    proxy.tamper = serve_other
    try:
        return device.run_once()
    finally:
        proxy.tamper = None
