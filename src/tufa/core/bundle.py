"""Offline (USB) update bundles: what a device needs to update with no network.

`tufa targets offline-update` writes a bundle; `tufa-agent install-bundle` reads it.
A bundle directory holds:

    bundle.json                 the manifest (`BundleManifest`)
    metadata/N.root.json        the whole root chain 1..N, so a device steps through
                                every rotation since it was provisioned
    metadata/timestamp.json     what a device of the bundle's channel and tag is served,
    metadata/V.snapshot.json    byte for byte (consistent-snapshot names)
    metadata/V.targets.json
    targets/NAME                the target files, under their plain names

The device verifies a bundle exactly like an online update: python-tuf's ngclient reads
it through `BundleFetcher` from the `bundle:///` URLs below, so every TUF rule (root
chain, signatures, thresholds, versions never going down, expiry, lengths and hashes)
applies. The manifest only says what the bundle is for; nothing in it is trusted.

This module is used by the device agent: it imports only tuf, securesystemslib, httpx
and the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypedDict

from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from tufa.core.files import is_plain_name
from tufa.core.metadata import Channel

BUNDLE_FORMAT = 1
MANIFEST_FILE = "bundle.json"
METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
BUNDLE_METADATA_URL = f"bundle:///{METADATA_DIR}/"
BUNDLE_TARGETS_URL = f"bundle:///{TARGETS_DIR}/"

_CHUNK_SIZE = 256 * 1024
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_WRITE_IT_AGAIN = "write the bundle again with `tufa targets offline-update TAG VERSION DIR`"


class ManifestJson(TypedDict):
    format: int
    factory: str
    channel: str
    tag: str
    version: str
    created_at: str
    targets: list[str]


class BundleError(ValueError):
    """The directory is not a usable bundle; the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class BundleManifest:
    """`bundle.json`: which factory, channel, tag and version a bundle carries.

    Informational: a device checks it against its own channel and tag to refuse the
    wrong stick early, but what it installs is decided by the verified TUF metadata.
    """

    format: int = BUNDLE_FORMAT
    factory: str
    channel: Channel
    tag: str
    version: str
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    targets: tuple[str, ...]

    def to_dict(self) -> ManifestJson:
        return {
            "format": self.format,
            "factory": self.factory,
            "channel": self.channel,
            "tag": self.tag,
            "version": self.version,
            "created_at": self.created_at.astimezone(UTC).strftime(_TIME_FORMAT),
            "targets": list(self.targets),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes) -> BundleManifest:
        """Parse and check a manifest; BundleError names the first field that is wrong."""
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise BundleError(f"{MANIFEST_FILE} is not JSON ({e}): {_WRITE_IT_AGAIN}") from e
        if not isinstance(raw, dict):
            raise BundleError(f"{MANIFEST_FILE} must be a JSON object: {_WRITE_IT_AGAIN}")
        fmt = raw.get("format")
        if fmt != BUNDLE_FORMAT:
            raise BundleError(
                f"{MANIFEST_FILE} has format {fmt!r}; this tufa reads format {BUNDLE_FORMAT}: "
                "update tufa on this side, or write the bundle with a matching tufa"
            )
        strings = {}
        for key in ("factory", "channel", "tag", "version", "created_at"):
            value = raw.get(key)
            if not isinstance(value, str) or not value:
                raise BundleError(
                    f"{MANIFEST_FILE}: {key!r} must be a non-empty string: {_WRITE_IT_AGAIN}"
                )
            strings[key] = value
        if strings["channel"] not in tuple(Channel):
            raise BundleError(
                f"{MANIFEST_FILE}: channel {strings['channel']!r} is neither 'ci' nor 'prod': "
                f"{_WRITE_IT_AGAIN}"
            )
        try:
            created_at = datetime.strptime(strings["created_at"], _TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError as e:
            raise BundleError(
                f"{MANIFEST_FILE}: created_at {strings['created_at']!r} is not a UTC time "
                f"such as 2025-01-31T12:00:00Z: {_WRITE_IT_AGAIN}"
            ) from e
        names = raw.get("targets")
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and is_plain_name(n) for n in names)
        ):
            raise BundleError(
                f"{MANIFEST_FILE}: 'targets' must be a non-empty list of target file names: "
                f"{_WRITE_IT_AGAIN}"
            )
        return cls(
            format=fmt,
            factory=strings["factory"],
            channel=Channel(strings["channel"]),
            tag=strings["tag"],
            version=strings["version"],
            created_at=created_at,
            targets=tuple(names),
        )


def read_manifest(dir: Path) -> BundleManifest:
    """The manifest of the bundle in `dir`, once its layout is complete.

    Checks only that the files are there (the root chain's first root, the timestamp,
    every target the manifest lists); whether they are genuine is for ngclient to say.
    """
    dir = Path(dir)
    if not dir.is_dir():
        raise BundleError(
            f"{dir} is not a directory: give the directory that "
            "`tufa targets offline-update` wrote (the one holding bundle.json)"
        )
    path = dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"{dir} holds no {MANIFEST_FILE}, so it is not an offline update bundle: give the "
            "directory that `tufa targets offline-update` wrote, or write one with it"
        ) from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    manifest = BundleManifest.from_json(data)
    required = [
        dir / METADATA_DIR / "1.root.json",
        dir / METADATA_DIR / "timestamp.json",
        *(dir / TARGETS_DIR / name for name in manifest.targets),
    ]
    missing = [str(p.relative_to(dir)) for p in required if not p.is_file()]
    if missing:
        raise BundleError(
            f"the bundle in {dir} is incomplete (missing {', '.join(missing)}); a copy may "
            f"have been cut: copy it again, or {_WRITE_IT_AGAIN}"
        )
    return manifest


class BundleFetcher(FetcherInterface):
    """ngclient's fetcher for a bundle directory: `bundle:///metadata/X` is
    `DIR/metadata/X` and `bundle:///targets/X` is `DIR/targets/X`.

    A missing file raises DownloadHTTPError 404, as a server would answer: ngclient
    walks the root chain until the next version is missing, then stops cleanly.
    """

    def __init__(self, bundle_dir: Path) -> None:
        self._dirs = {
            BUNDLE_METADATA_URL: Path(bundle_dir) / METADATA_DIR,
            BUNDLE_TARGETS_URL: Path(bundle_dir) / TARGETS_DIR,
        }

    def _path_for(self, url: str) -> Path:
        for prefix, folder in self._dirs.items():
            if url.startswith(prefix):
                name = url[len(prefix) :]
                if not is_plain_name(name):
                    raise exceptions.DownloadError(f"{url}: not a file name a bundle may hold")
                return folder / name
        raise exceptions.DownloadError(
            f"{url} is not in a bundle: use {BUNDLE_METADATA_URL} and {BUNDLE_TARGETS_URL}"
        )

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self._path_for(url)
        if path.exists() and not path.is_file():
            # A FIFO or a device node on a stick would block or never end.
            raise exceptions.DownloadError(f"{path} is not a regular file")
        try:
            # Opened here, not in the generator, so a missing file fails the fetch itself.
            file = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise exceptions.DownloadHTTPError(f"{url}: no such file in the bundle", 404) from None
        except OSError as e:
            raise exceptions.DownloadError(f"cannot read {path}: {e}") from e
        return self._chunks(file)

    @staticmethod
    def _chunks(file: IO[bytes]) -> Iterator[bytes]:
        with file:
            while chunk := file.read(_CHUNK_SIZE):
                yield chunk
