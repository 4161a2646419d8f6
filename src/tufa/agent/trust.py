"""The device's TUF trust store, kept and refreshed by python-tuf's ngclient.

Every decision the agent takes starts from metadata that ngclient verified against the
root the device was provisioned with: thresholds, expiry, rollback, lengths and hashes
as in the TUF specification. This module only provisions that root, opens the client
with size limits that fit tufa's metadata, and reads back what it now trusts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from tufa.agent.state import AgentError
from tufa.core.clock import iso
from tufa.core.files import write_private_file
from tufa.core.metadata import MIN_PROD_TARGETS_THRESHOLD, Channel

# tufa's metadata carries no delegations and only the top-level targets in snapshot,
# so the limits are far below python-tuf's defaults: a server (or a man in the middle)
# cannot make a device swallow megabytes of "metadata".
UPDATER_CONFIG = UpdaterConfig(
    max_root_rotations=64,
    root_max_length=256 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=64 * 1024,
    targets_max_length=8 * 1024 * 1024,
    max_delegations=1,
)

# Anything that means "this repository's metadata or files cannot be trusted".
VERIFICATION_ERRORS = (exceptions.RepositoryError, exceptions.DownloadLengthMismatchError)


def load_root(data: bytes, source: str) -> Metadata[Root]:
    """A root the device can be provisioned with: well-formed and signed by enough of
    its own root keys (the check ngclient repeats before trusting it)."""
    try:
        root = Metadata[Root].from_bytes(data)
        if root.signed.type != Root.type:
            raise AgentError(f"{source} is {root.signed.type} metadata, not a root")
        root.verify_delegate(Root.type, root)
    except AgentError:
        raise
    except exceptions.UnsignedMetadataError as e:
        raise AgentError(
            f"{source} is not signed by enough of its own root keys ({e}): provision the "
            "root.json that `tufa keys show-root` or the factory owner gave you"
        ) from e
    except Exception as e:  # any parse error of untrusted input
        raise AgentError(f"{source} is not valid TUF root metadata: {e}") from e
    return root


def provision_root(metadata_dir: Path, data: bytes, source: str) -> Metadata[Root]:
    """Check `data` and make it the trust anchor of `metadata_dir`."""
    root = load_root(data, source)
    metadata_dir.mkdir(parents=True, exist_ok=True)
    write_private_file(metadata_dir / "root.json", data)
    return root


def channel_of(root: Metadata[Root]) -> Channel:
    """A production root asks for the online and an offline targets signature; a CI
    root for one. The root a device is provisioned with is what fixes its channel."""
    return _channel_of_threshold(root.signed.roles[Targets.type].threshold)


def _channel_of_threshold(threshold: int) -> Channel:
    return Channel.PROD if threshold >= MIN_PROD_TARGETS_THRESHOLD else Channel.CI


class ChannelMismatchError(exceptions.RepositoryError):
    """A new root that belongs to the other channel than the device's."""


_ROOT_FILE = re.compile(r"/([0-9]+)\.root\.json$")


class ChannelGuard(FetcherInterface):
    """Refuses any new root of the other channel before ngclient even verifies it.

    The two channels' roots share no signing key, so ngclient already refuses the other
    channel's roots (ADR 0009); this is a second wall, for a factory whose channels
    were not yet separated: a production device never follows a root that lets the
    online key alone sign targets, and a CI device never one that needs an offline key.
    Only refuses, never accepts: what passes is verified by ngclient as usual.
    """

    def __init__(self, inner: FetcherInterface, channel: Channel) -> None:
        self._inner = inner
        self._channel = channel

    def _fetch(self, url: str) -> Iterator[bytes]:
        chunks = self._inner.fetch(url)
        if _ROOT_FILE.search(url) is None:
            return chunks
        return self._checked_root(url, chunks)

    def _checked_root(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        data = b""
        for chunk in chunks:
            data += chunk
            if len(data) > UPDATER_CONFIG.root_max_length:
                break  # ngclient refuses it for its length
        try:
            threshold = json.loads(data)["signed"]["roles"][Targets.type]["threshold"]
        except (ValueError, KeyError, TypeError):
            threshold = None  # not a root at all: ngclient says why
        if isinstance(threshold, int) and _channel_of_threshold(threshold) != self._channel:
            raise ChannelMismatchError(
                f"refused {url.rsplit('/', 1)[-1]}: it is a root of the "
                f"{_channel_of_threshold(threshold)} channel (targets threshold {threshold}) and "
                f"this device follows the {self._channel} channel; someone is serving the other "
                "channel's files"
            )
        yield data


def open_updater(
    metadata_dir: Path,
    metadata_url: str,
    fetcher: FetcherInterface,
    target_dir: Path | None = None,
    target_url: str | None = None,
    config: UpdaterConfig = UPDATER_CONFIG,
) -> Updater:
    if not (metadata_dir / "root.json").exists():
        raise AgentError(
            f"{metadata_dir} has no trusted root.json: provision one first (the agent never "
            "trusts on first use)"
        )
    return Updater(
        str(metadata_dir),
        metadata_url,
        target_dir=str(target_dir) if target_dir else None,
        target_base_url=target_url,
        fetcher=fetcher,
        config=config,
        bootstrap=None,
    )


def trusted_targets(metadata_dir: Path) -> dict[str, TargetFile]:
    """The top-level targets ngclient verified and stored during the last refresh."""
    targets = Metadata[Targets].from_file(str(metadata_dir / "targets.json"))
    return targets.signed.targets


class VerifiedTimestamp(TypedDict):
    """The timestamp the device verified last, as its reports carry it."""

    version: int
    expires: str  # ISO 8601, UTC


def verified_timestamp(metadata_dir: Path) -> VerifiedTimestamp | None:
    """The timestamp ngclient verified and stored during its last successful refresh of
    that role (a later refresh that failed leaves it in place); None before the first."""
    try:
        signed = Metadata[Timestamp].from_file(str(metadata_dir / "timestamp.json")).signed
    except Exception:  # missing or damaged: the next refresh replaces it
        return None
    return {"version": signed.version, "expires": iso(signed.expires)}


def trusted_versions(metadata_dir: Path) -> dict[str, int]:
    """Versions of the roles in the trust store, for status output."""
    found: dict[str, int] = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        try:
            found[role] = Metadata.from_file(str(metadata_dir / f"{role}.json")).signed.version
        except Exception:  # noqa: S112 (missing or damaged: the next refresh replaces it)
            continue
    return found
