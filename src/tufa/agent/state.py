"""The agent's state directory: configuration, credential, trust store and status.

Layout of STATE_DIR (all of it written atomically, so a power cut leaves the old or
the new version of each file, never a mix):

    config.json    server, factory, channel, hardware id, tag, installer settings
    credential     the device credential (mode 0600)
    metadata/      the TUF trust store that python-tuf's ngclient keeps (root.json ...)
    downloads/     <sha256>.part while downloading, <sha256> once verified
    slots/a, b     the two install slots of the default installer
    current        symlink to the slot that runs
    status.json    installed release, an install in progress, failed versions, last check
    events.json    events not yet delivered to the server
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self, TypedDict, TypeVar

from tufa.core import api_paths
from tufa.core.files import write_private_file
from tufa.core.metadata import Channel

CONFIG_FILE = "config.json"
CREDENTIAL_FILE = "credential"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.json"

_T = TypeVar("_T")

# Two slots and a `current` link, or the user's own command (`tufa-agent register --installer`).
InstallerKind = Literal["slots", "command"]


class AgentError(Exception):
    """A problem the agent reports in one line, naming the cause and the fix."""


def printable(text: str) -> str:
    """`text` with control characters escaped: names and messages from a server or from
    metadata reach the device's terminal and logs, and must not drive them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def write_json(path: Path, data: Any) -> None:
    write_private_file(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise AgentError(f"cannot read the {what} {path}: {e}") from e


def _from_dict(cls: type[_T], data: Any) -> _T:
    """Build a dataclass from JSON, ignoring keys a newer agent may have added."""
    if not isinstance(data, dict):
        raise AgentError(f"{cls.__name__}: expected a JSON object")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class AgentConfig:
    server: str
    factory: str
    channel: Channel
    device_id: str
    name: str
    hardware_id: str
    tag: str
    installer: InstallerKind = "slots"
    install_command: str | None = None
    health_check: str | None = None
    health_timeout: float = 60.0

    def __post_init__(self) -> None:
        # config.json holds the channel as a string.
        try:
            object.__setattr__(self, "channel", Channel(self.channel))
        except ValueError:
            raise AgentError(
                f"the configuration names channel {self.channel!r}, neither 'ci' nor 'prod': "
                "register the device again"
            ) from None

    def _url(self, path: str) -> str:
        return f"{self.server}{path}"

    @property
    def metadata_url(self) -> str:
        return self._url(api_paths.metadata_base(self.factory, self.channel))

    @property
    def targets_url(self) -> str:
        return self._url(api_paths.targets_base(self.factory, self.channel))

    @property
    def reports_url(self) -> str:
        return self._url(api_paths.path(api_paths.DEVICE_REPORTS, self.factory))

    @property
    def credential_url(self) -> str:
        return self._url(api_paths.path(api_paths.DEVICE_CREDENTIAL, self.factory))


class ReportedRelease(TypedDict):
    """A release as device reports name it."""

    version: str
    target: str
    sha256: str


@dataclass(frozen=True)
class Release:
    """A verified target as installed (or being installed) on this device."""

    version: str
    target: str
    sha256: str
    length: int
    slot: str | None = None

    def to_report(self) -> ReportedRelease:
        # Cut to the server's field sizes: a report it refuses would hold up every later one.
        return {"version": self.version[:64], "target": self.target[:255], "sha256": self.sha256}


@dataclass
class AgentStatus:
    installed: Release | None = None
    pending: Release | None = None
    failed: list[str] = field(default_factory=list)  # sha256 of releases that failed
    last_check: str | None = None
    last_error: str | None = None
    reported: bool = False  # has the server heard of `installed`?
    reported_at: float | None = None  # when the last report was delivered (Unix time)
    # Failed downloads reported of the release being downloaded: {sha256: count}.
    download_failures: dict[str, int] = field(default_factory=dict)
    reported_timestamp: int | None = None  # the verified timestamp version it carried

    @classmethod
    def from_json(cls, data: Any) -> Self:
        status = _from_dict(cls, data)
        for name in ("installed", "pending"):
            value = getattr(status, name)
            if value is not None:
                setattr(status, name, _from_dict(Release, value))
        return status


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata = self.path / "metadata"
        self.downloads = self.path / "downloads"
        self.slots = self.path / "slots"
        self.current = self.path / "current"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One agent process at a time changes the state (a running service and an
        `install-bundle` or `check` typed by hand would otherwise undo each other)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / ".lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logging.getLogger("tufa.agent").info(
                    "waiting for another tufa-agent process working on %s", self.path
                )
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def is_registered(self) -> bool:
        return (self.path / CONFIG_FILE).exists()

    def config(self) -> AgentConfig:
        try:
            data = _read_json(self.path / CONFIG_FILE, "agent configuration")
        except FileNotFoundError:
            raise AgentError(
                f"{self.path} holds no registered device: run `tufa-agent register ... "
                f"--dir {self.path}` first, with the root this device was provisioned with"
            ) from None
        config = _from_dict(AgentConfig, data)
        if not (self.metadata / "root.json").exists():
            raise AgentError(
                f"{self.metadata} has no trusted root: re-provision this device with "
                "`tufa-agent register --root ROOT.json` (the agent never trusts on first use)"
            )
        return config

    def save_config(self, config: AgentConfig) -> None:
        write_json(self.path / CONFIG_FILE, asdict(config))

    def credential(self) -> str:
        try:
            return (self.path / CREDENTIAL_FILE).read_text().strip()
        except FileNotFoundError:
            raise AgentError(
                f"{self.path / CREDENTIAL_FILE} is missing: register this device again"
            ) from None

    def save_credential(self, secret: str) -> None:
        write_private_file(self.path / CREDENTIAL_FILE, secret.encode() + b"\n")

    def status(self) -> AgentStatus:
        try:
            return AgentStatus.from_json(_read_json(self.path / STATUS_FILE, "agent status"))
        except FileNotFoundError:
            return AgentStatus()

    def save_status(self, status: AgentStatus) -> None:
        write_json(self.path / STATUS_FILE, asdict(status))
