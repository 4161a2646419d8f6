"""No version a device has seen ever goes down, whatever view it is served: a
property-based test of design invariant 3 (section 4).

Hypothesis draws random sequences of steps - CI publishes, waves (init, rollout,
complete, cancel) and offline targets key rotations with the real `tufa keys
rotate-targets` - and runs them against a real tufa-server, while two CI devices and four
production devices (tags main and beta) poll in between with python-tuf's ngclient:
each device has its own metadata directory and credential, is bootstrapped with its
channel's version-1 root, and runs a new Updater on every poll.

A step may also serve one device the other channel's genuine files (the newest of one
role, or the whole other chain), as anyone in the middle can (ADR 0009).

Checked on every poll:
- no refresh fails, and no trusted root, timestamp, snapshot or targets version goes down;
- a device served the other channel's files refuses them and trusts none of them (and,
  by the first property, is not frozen by them: its next genuine poll works);
- a production device sees only targets of a wave it was rolled out to or of a completed
  wave of its tag, and exactly what a model of its view says (its wave, a cancelled wave
  it got, or its tag's releases);
- a CI device sees every published build.

One SQLite server serves the module; each example gets a fresh factory on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tuf.api import exceptions
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from tests.channel_attacks import (
    ChannelFiles,
    Substitution,
    metadata_request,
    other,
    record,
    substitutions,
)
from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    download_archive,
    http,
    poll_device,
    run_cli,
    send,
)
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import ROOT, SNAPSHOT, TARGETS, TIMESTAMP

ROLES = (ROOT, TIMESTAMP, SNAPSHOT, TARGETS)
TAGS = ("main", "beta")
CI_DEVICES = ("ci-1", "ci-2")
PROD_DEVICES = {
    "prod-beta-1": "beta",
    "prod-beta-2": "beta",
    "prod-main-1": "main",
    "prod-main-2": "main",
}
DEVICES = (*CI_DEVICES, *sorted(PROD_DEVICES))
# The CLI takes over a second a run: at most this many rotations an example.
MAX_ROTATIONS = 2


@pytest.fixture(scope="module")
def waves_server(make_server: Callable[..., Server]) -> Server:
    """A server of this module's own: its examples make many factories."""
    return make_server("sqlite")


# -- devices --------------------------------------------------------------------------


@dataclass
class Polled:
    versions: dict[str, int]
    targets: frozenset[str]


@dataclass
class Device:
    """A device's TUF client: its own metadata dir and credential, a new Updater a poll."""

    name: str
    channel: str
    metadata_url: str
    metadata_dir: Path
    credential: str
    bootstrap: bytes | None
    seen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))

    def poll(self) -> Polled:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        # Properties: no refresh ever fails (an exception fails the test), and no version
        # this device has seen ever goes down, for any role (poll_device checks both).
        trusted, self.seen = poll_device(
            self.metadata_dir,
            self.metadata_url,
            DeviceFetcher(self.credential),
            self.bootstrap,
            self.seen,
            self.name,
        )
        self.bootstrap = None  # from now on, what it verified and stored
        return Polled(self.seen, frozenset(trusted.targets.targets))


class DeviceFetcher(FetcherInterface):
    """ngclient's fetcher for one device: its credential on every request, on the test
    process's keep-alive client (a new httpx client costs ~60 ms, most of a poll). With a
    `substitution`, it answers as a man in the middle serving the other channel's files
    would, and counts what it swapped in."""

    def __init__(self, credential: str, substitution: Substitution | None = None) -> None:
        self.credential = credential
        self.substitution = substitution
        self.swapped = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        request = metadata_request(url)
        if self.substitution is not None and request is not None:
            _channel, role, version = request
            data = self.substitution(role, version)
            if data is not None:
                self.swapped += 1
                return iter([data])
        response = http().get(url, headers={"Authorization": f"Bearer {self.credential}"})
        if response.status_code >= 400:
            raise DownloadHTTPError(f"HTTP {response.status_code} for {url}", response.status_code)
        return iter([response.content])


# -- steps ----------------------------------------------------------------------------
# Each step says which devices poll after it: any subset, so that some devices see every
# state and others skip some. `which` and `pick` choose among what exists when it runs:
# a wave step acts on active wave number `which` (modulo), or, if there is none, checks
# that the last wave refuses it.


@dataclass(frozen=True)
class Publish:
    """CI publishes the next build (one image) for one tag or both."""

    tags: tuple[str, ...]
    poll: frozenset[str]


@dataclass(frozen=True)
class InitWave:
    """A wave for tag TAGS[which] of a build newer than every version attempted for it
    (published first if there is none), optionally pruning the tag's oldest release."""

    which: int
    pick: int
    prune: bool
    poll: frozenset[str]


@dataclass(frozen=True)
class Rollout:
    """An active wave goes to all its tag's devices (None), a count, or a list of names
    (refused if it names a device of the other tag)."""

    which: int
    chosen: int | frozenset[str] | None
    poll: frozenset[str]


@dataclass(frozen=True)
class Complete:
    """An active wave becomes its tag's release, for every device of the tag."""

    which: int
    poll: frozenset[str]


@dataclass(frozen=True)
class Cancel:
    """An active wave stops; its devices keep it until their tag's next release."""

    which: int
    poll: frozenset[str]


@dataclass(frozen=True)
class RotateTargetsKey:
    """`tufa keys rotate-targets`: refused while a wave is active."""

    poll: frozenset[str]


@dataclass(frozen=True)
class ServeOtherChannel:
    """A man in the middle serves `device` the other channel's newest file of `role`
    in place of whatever it asks for, or (`everything`) the whole other chain."""

    device: str
    role: str
    poll: frozenset[str]


Step = Publish | InitWave | Rollout | Complete | Cancel | RotateTargetsKey | ServeOtherChannel

POLL = st.frozensets(st.sampled_from(DEVICES))
WHICH = st.integers(0, 1)


def step_strategy(kind: str) -> st.SearchStrategy[Step]:
    match kind:
        case "publish":
            return st.builds(
                Publish, st.sampled_from([("main",), ("beta",), ("beta", "main")]), POLL
            )
        case "init":
            return st.builds(InitWave, WHICH, st.integers(0, 2), st.booleans(), POLL)
        case "rollout":
            everyone, some = st.none(), st.frozensets(st.sampled_from(sorted(PROD_DEVICES)))
            return st.builds(Rollout, WHICH, st.one_of(everyone, st.integers(1, 2), some), POLL)
        case "complete":
            return st.builds(Complete, WHICH, POLL)
        case "cancel":
            return st.builds(Cancel, WHICH, POLL)
        case "swap":
            return st.builds(
                ServeOtherChannel, st.sampled_from(DEVICES), st.sampled_from(SWAPS), POLL
            )
        case _:
            return st.builds(RotateTargetsKey, POLL)


SWAPS = ("everything", "root", "timestamp", "snapshot", "targets")
# Weighted by repetition: waves need builds, and rotations are slow.
KINDS = [
    "publish", "init", "init", "init", "rollout", "rollout", "complete", "cancel", "rotate",
    "swap",
]  # fmt: skip
STEP = st.sampled_from(KINDS).flatmap(step_strategy)
EVERYONE = frozenset(DEVICES)


# -- the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    target: str
    tags: frozenset[str]


@dataclass
class Wave:
    name: str
    tag: str
    build: int
    targets: frozenset[str]
    status: str = "active"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class World:
    """One factory, its six devices, and what each production device must be served."""

    def __init__(self, server: Server, workdir: Path) -> None:
        self.server = server
        self.factory: Factory = create_factory(server)
        self.home = workdir / self.factory.name
        self.home.mkdir(parents=True)
        self.archive = self.home / "keys.tgz"
        download_archive(self.factory, self.archive)
        self.env = cli_env(self.factory, self.home / "config.json")
        self.devices = {name: self._register(name, "ci", "main") for name in CI_DEVICES} | {
            name: self._register(name, "prod", tag) for name, tag in PROD_DEVICES.items()
        }
        self.builds: dict[int, Build] = {}
        self.waves: list[Wave] = []
        self.released: dict[str, frozenset[str]] = dict.fromkeys(TAGS, frozenset())
        # A production device's view: the name of the wave it is served, None for its tag's.
        self.view: dict[str, str | None] = dict.fromkeys(PROD_DEVICES)
        # What a production device may ever see: waves it got, completed waves of its tag.
        self.allowed: dict[str, set[str]] = {name: set() for name in PROD_DEVICES}
        self.rotations = 0

    # -- talking to the server -------------------------------------------------------

    def _call(self, method: str, suffix: str, **kwargs: Any) -> Any:
        path = self.factory.path(suffix)
        return send(self.server, method, path, self.factory.admin_token, **kwargs)

    def _ok(self, method: str, suffix: str, status: int = 200, **kwargs: Any) -> Any:
        response = self._call(method, suffix, **kwargs)
        assert response.status_code == status, f"{method} {suffix}: {response.text}"
        return response.json()

    def _register(self, name: str, channel: str, tag: str) -> Device:
        body = {"name": name, "hardware_id": "rpi4", "tag": tag, "channel": channel}
        credential = self._ok("POST", "/devices", 201, json=body)["credential"]
        root_v1 = self._call("GET", f"/repo/{channel}/metadata/1.root.json")
        assert root_v1.status_code == 200, root_v1.text
        return Device(
            name,
            channel,
            self.factory.metadata_url(channel),
            self.home / "devices" / name,
            credential,
            root_v1.content,
        )

    def _offline_targets_keyids(self) -> set[str]:
        """The targets keys the production root trusts, less the server's online key."""
        root = Metadata[Root].from_dict(self._ok("GET", "/repo/prod/metadata/root.json")).signed
        online = {k["keyid"] for k in self._ok("GET", "")["online_keys"]}
        return set(root.roles[TARGETS].keyids) - online

    def _sign_offline(self, md: Metadata[Targets]) -> None:
        """What `tufa waves init -k ARCHIVE` does: sign with the archive's offline targets
        keys that the production root trusts."""
        trusted = self._offline_targets_keyids()
        keys = OfflineArchive.load(self.archive).keys_for(TARGETS)
        used = [k for k in keys if k.keyid in trusted]
        assert used, "the archive holds no offline targets key of the production root"
        for key in used:
            md.sign(key.prod.signer(), append=True)

    # -- polling and the properties ----------------------------------------------------

    def poll(self, names: frozenset[str]) -> None:
        for name in sorted(names):
            self._check(name, self.devices[name].poll())

    def _check(self, name: str, polled: Polled) -> None:
        if name in CI_DEVICES:
            # Property: CI devices see every published build of their hardware id and tag.
            ours = {b.target for b in self.builds.values() if "main" in b.tags}
            assert polled.targets == ours, name
            return
        # Property: a production device sees only targets of a wave it was rolled out to
        # or of a completed wave of its tag ...
        assert polled.targets <= self.allowed[name], (
            f"{name} sees {sorted(polled.targets - self.allowed[name])}, never released to it"
        )
        # ... and exactly its view: its (maybe cancelled) wave, or its tag's releases.
        wave = next((w for w in self.waves if w.name == self.view[name]), None)
        expected = wave.targets if wave is not None else self.released[PROD_DEVICES[name]]
        assert polled.targets == expected, f"{name} in view {self.view[name]}"

    def converge(self) -> None:
        """Every device polls once more and reaches what the server serves it now."""
        self.poll(frozenset(DEVICES))
        for device in self.devices.values():
            response = http().get(
                f"{device.metadata_url}timestamp.json",
                headers={"Authorization": f"Bearer {device.credential}"},
            )
            assert response.status_code == 200, response.text
            served = Metadata[Timestamp].from_bytes(response.content).signed.version
            assert device.seen[TIMESTAMP] == served, device.name

    # -- steps --------------------------------------------------------------------------

    def run(self, step: Step) -> None:
        match step:
            case Publish():
                self.publish(step.tags)
            case InitWave():
                self.init_wave(step.which, step.pick, step.prune)
            case Rollout():
                self.rollout(step.which, step.chosen)
            case Complete():
                self.complete(step.which)
            case Cancel():
                self.cancel(step.which)
            case RotateTargetsKey():
                self.rotate_targets_key()
            case ServeOtherChannel():
                self.serve_other_channel(step.device, step.role)
        self.poll(step.poll)

    def publish(self, tags: tuple[str, ...]) -> None:
        number = len(self.builds) + 1
        data = f"{self.factory.name} build {number}".encode()
        digest = sha256(data)
        self._ok("PUT", f"/blobs/{digest}", 201, content=data)
        target = {
            "name": f"fw-{number}",
            "version": str(number),
            "hardware_ids": ["rpi4"],
            "tags": list(tags),
            "length": len(data),
            "sha256": digest,
        }
        self._ok("POST", "/targets", 201, json={"targets": [target]})
        self.builds[number] = Build(f"fw-{number}", frozenset(tags))

    def _candidates(self, tag: str) -> list[int]:
        """Builds of `tag` newer than every version attempted for it."""
        attempted = max((w.build for w in self.waves if w.tag == tag), default=0)
        return sorted(n for n, b in self.builds.items() if tag in b.tags and n > attempted)

    def _active(self, which: int) -> Wave | None:
        active = [w for w in self.waves if w.status == "active"]
        return active[which % len(active)] if active else None

    def init_wave(self, which: int, pick: int, prune: bool) -> None:
        """Prepared by the server, signed here with the archive's offline targets key;
        refused while the tag has an active wave."""
        tag = TAGS[which % len(TAGS)]
        if not self._candidates(tag):
            self.publish((tag,))  # CI publishes the build this wave is for
        candidates = self._candidates(tag)
        number = candidates[pick % len(candidates)]
        released = sorted({int(t.removeprefix("fw-")) for t in self.released[tag]})
        pruned = [str(released[0])] if prune and released else []
        body = {"tag": tag, "version": str(number), "prune": pruned, "expires_days": 30}
        prepared = self._ok("POST", "/waves/prepare", json=body)
        md = Metadata[Targets].from_dict({"signed": prepared["signed"], "signatures": []})
        kept = {t for t in self.released[tag] if t.removeprefix("fw-") not in pruned}
        expected = frozenset(kept | {self.builds[number].target})
        assert set(md.signed.targets) == expected
        self._sign_offline(md)
        name = f"w{len(self.waves) + 1}"
        response = self._call(
            "POST", "/waves", json={**body, "name": name, "targets": md.to_dict()}
        )
        active = next((w for w in self.waves if w.tag == tag and w.status == "active"), None)
        if active is not None:
            assert_error(response, 409, "conflict", f"wave {active.name!r} is active")
            return
        assert response.status_code == 201, response.text
        assert response.json()["signed"], response.text
        self.waves.append(Wave(name, tag, number, expected))

    def _refused_when_finished(self, action: str) -> None:
        """With no active wave, the last wave refuses `action`."""
        if self.waves:
            name = self.waves[-1].name
            response = self._call("POST", f"/waves/{name}/{action}", json={})
            assert_error(response, 409, "conflict", f"wave {name!r} is")

    def rollout(self, which: int, chosen: int | frozenset[str] | None) -> None:
        wave = self._active(which)
        if wave is None:
            self._refused_when_finished("rollout")
            return
        body: dict[str, Any] = {}
        names = sorted(
            d for d, t in PROD_DEVICES.items() if t == wave.tag and self.view[d] != wave.name
        )
        if isinstance(chosen, int):
            body["limit"] = str(chosen)
            names = names[:chosen]
        elif chosen is not None:
            body["devices"] = sorted(chosen)
            names = [n for n in names if n in chosen]
            others = sorted(n for n in chosen if PROD_DEVICES[n] != wave.tag)
            if others:  # devices of the other tag: refused, nothing changes
                response = self._call("POST", f"/waves/{wave.name}/rollout", json=body)
                message = f"not production devices of tag {wave.tag!r}: {', '.join(others)}"
                assert_error(response, 404, "not_found", message)
                return
        result = self._ok("POST", f"/waves/{wave.name}/rollout", json=body)
        assert [d["name"] for d in result["devices"]] == names
        for name in names:
            self.view[name] = wave.name
            self.allowed[name] |= wave.targets

    def complete(self, which: int) -> None:
        """The wave becomes its tag's release, for every device of the tag."""
        wave = self._active(which)
        if wave is None:
            self._refused_when_finished("complete")
            return
        assert self._ok("POST", f"/waves/{wave.name}/complete")["status"] == "complete"
        wave.status = "complete"
        self.released[wave.tag] = wave.targets
        for name, tag in PROD_DEVICES.items():
            if tag == wave.tag:
                self.view[name] = None
                self.allowed[name] |= wave.targets

    def cancel(self, which: int) -> None:
        """Devices that got the wave keep it until a newer release of their tag."""
        wave = self._active(which)
        if wave is None:
            self._refused_when_finished("cancel")
            return
        assert self._ok("POST", f"/waves/{wave.name}/cancel")["status"] == "cancelled"
        wave.status = "cancelled"

    def serve_other_channel(self, name: str, role: str) -> None:
        """One poll of `name` through a man in the middle serving the other channel's
        genuine files (every version of them is recorded over the admin token, as an
        attacker sees them served to other devices)."""
        device = self.devices[name]
        if device.bootstrap is not None:
            self.poll(frozenset({name}))  # provisioned: it trusts its root v1 on disk
        credentials = [d.credential for d in self.devices.values()]
        foreign = record(self.factory, other(device.channel), ChannelFiles(), TAGS, credentials)
        label, substitution = next(
            (label, s)
            for label, s in substitutions(foreign, every_version=False).items()
            if label.startswith(role)
        )
        fetcher = DeviceFetcher(device.credential, substitution)
        updater = Updater(
            str(device.metadata_dir), device.metadata_url, fetcher=fetcher, bootstrap=None
        )
        try:
            updater.refresh()
            refused = False
        except (exceptions.RepositoryError, exceptions.DownloadError):
            refused = True
        # Property: whatever was swapped in was refused, and the device trusts no file
        # of the other channel (so its next genuine poll is not frozen either).
        assert refused or not fetcher.swapped, f"{name} accepted the other channel's {label}"
        trusted = {p.name: p.read_bytes() for p in device.metadata_dir.glob("*.json")}
        foreign_bytes = foreign.all_bytes()
        taken = sorted(f for f, data in trusted.items() if data in foreign_bytes)
        assert not taken, f"{name} trusts the other channel's {taken} after {label}"

    def rotate_targets_key(self) -> None:
        """The real CLI replaces the offline targets key; refused while a wave is active."""
        if self.rotations == MAX_ROTATIONS:
            return
        self.rotations += 1
        before = self._offline_targets_keyids()
        done = run_cli("keys", "rotate-targets", str(self.archive), env=self.env)
        if any(w.status == "active" for w in self.waves):
            assert done.returncode != 0, done.stdout
            assert "is active: complete or cancel it" in done.stderr, done.stderr
            assert self._offline_targets_keyids() == before
            return
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        after = self._offline_targets_keyids()
        held = {k.keyid for k in OfflineArchive.load(self.archive).keys_for(TARGETS)}
        assert after.isdisjoint(before), "the offline targets key was not replaced"
        assert after <= held, "the archive lacks the new offline targets key"


@settings(
    max_examples=16,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=6, max_size=16))
# Always run: a device keeps a cancelled wave across a key rotation, then moves on to the
# next release of its tag ...
@example(
    steps=[
        InitWave(0, 0, False, EVERYONE),
        Rollout(0, 1, EVERYONE),
        Cancel(0, EVERYONE),
        RotateTargetsKey(EVERYONE),
        InitWave(0, 0, False, EVERYONE),
        Rollout(0, frozenset({"prod-main-2"}), EVERYONE),
        Complete(0, EVERYONE),
        InitWave(0, 0, True, EVERYONE),
    ]
)
# ... and both tags have waves at once: a rollout naming a device of the other tag and a
# rotation are refused, then one wave completes, the other is cancelled, and a rotation
# re-signs every view.
@example(
    steps=[
        Publish(("beta", "main"), frozenset()),
        InitWave(1, 0, False, EVERYONE),
        InitWave(0, 1, False, frozenset({"prod-main-1"})),
        Rollout(1, None, EVERYONE),
        Rollout(0, frozenset({"prod-beta-1", "prod-main-1"}), EVERYONE),
        RotateTargetsKey(EVERYONE),
        Complete(0, EVERYONE),
        Cancel(0, EVERYONE),
        RotateTargetsKey(EVERYONE),
    ]
)
# ... and every device is served the other channel's files in a wave, after a cancel
# and after a rotation, then updates normally.
@example(
    steps=[
        InitWave(0, 0, False, EVERYONE),
        Rollout(0, 1, frozenset()),
        *(
            ServeOtherChannel(d, role, frozenset())
            for d in DEVICES
            for role in ("everything", "timestamp")
        ),
        Cancel(0, EVERYONE),
        RotateTargetsKey(frozenset()),
        *(
            ServeOtherChannel(d, role, frozenset())
            for d in DEVICES
            for role in ("snapshot", "targets")
        ),
        Publish(("main",), EVERYONE),
    ]
)
def test_no_version_a_device_has_seen_ever_goes_down(
    waves_server: Server, tmp_path: Path, steps: list[Step]
) -> None:
    world = World(waves_server, tmp_path)
    world.publish(("beta", "main"))  # CI has published a build for both tags already
    for step in steps:
        world.run(step)
    world.converge()
