"""`tufa targets offline-update`: write an offline (USB) update bundle.

The bundle's layout and its reader are `tufa.core.bundle`; the target files come
through `tufa.core.download`, the verified download the agent uses too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from tufa.cli.client import Api, with_api
from tufa.cli.output import json_option, transfer_progress
from tufa.core import api_paths
from tufa.core import download as verified
from tufa.core.bundle import (
    BUNDLE_METADATA_URL,
    BUNDLE_TARGETS_URL,
    MANIFEST_FILE,
    METADATA_DIR,
    TARGETS_DIR,
    BundleFetcher,
    BundleManifest,
)
from tufa.core.files import fsync_dir
from tufa.core.metadata import Channel
from tufa.core.selection import custom_of, target_version

TRANSFER_TIMEOUT = 120  # seconds per read or write, not for the whole file


def _metadata_field(data: bytes, filename: str, *keys: str) -> int:
    """A field of served metadata, read before verification only to know which file to
    fetch next; ngclient checks everything once the bundle's metadata is complete."""
    try:
        value: Any = json.loads(data)
        for key in keys:
            value = value[key]
    except (ValueError, KeyError, TypeError, IndexError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise click.ClickException(
            f"the server served a malformed {filename} (no {'.'.join(keys)}); nothing was "
            "written. Run again; if it persists, tell the server's operator"
        )
    return value


def _served_metadata(
    api: Api, channel: Channel, tag: str, hardware_id: str | None
) -> dict[str, bytes]:
    """What a device of `channel` and `tag` (and in CI, `hardware_id`) is served, by bundle
    file name: the root chain 1..N, the timestamp of its view, and the snapshot and
    targets versions it names."""

    def get(filename: str) -> bytes:
        path = api.path(api_paths.METADATA_FILE, channel=channel, filename=filename)
        return api.request("GET", path).content

    files: dict[str, bytes] = {}
    newest = _metadata_field(get("root.json"), "root.json", "signed", "version")
    for version in range(1, newest + 1):
        files[f"{version}.root.json"] = get(f"{version}.root.json")
    # Production devices are served their tag's view; CI devices their hardware id's and tag's.
    view = {"tag": tag} if hardware_id is None else {"hardware_id": hardware_id, "tag": tag}
    query = f"?{httpx.QueryParams(view)}"
    timestamp = get(f"timestamp.json{query}")
    files["timestamp.json"] = timestamp
    snapshot_version = _metadata_field(
        timestamp, "timestamp.json", "signed", "meta", "snapshot.json", "version"
    )
    snapshot = get(f"{snapshot_version}.snapshot.json")
    files[f"{snapshot_version}.snapshot.json"] = snapshot
    targets_version = _metadata_field(
        snapshot, "snapshot.json", "signed", "meta", "targets.json", "version"
    )
    files[f"{targets_version}.targets.json"] = get(f"{targets_version}.targets.json")
    return files


def _write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: a USB stick is pulled soon after the command ends."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    # Some file systems (FAT on USB sticks among them) refuse fsync on a directory;
    # the files themselves are synced already.
    with contextlib.suppress(OSError):
        fsync_dir(path)


def _verified_updater(bundle: Path, trust_dir: Path, root_v1: bytes) -> Updater:
    """python-tuf's ngclient over the bundle, from root 1, refreshed: the checks a device
    runs on it (root chain, signatures, thresholds, consistent versions, expiry)."""
    updater = Updater(
        str(trust_dir),
        BUNDLE_METADATA_URL,
        target_base_url=BUNDLE_TARGETS_URL,
        fetcher=BundleFetcher(bundle),
        config=UpdaterConfig(prefix_targets_with_hash=False),
        bootstrap=root_v1,
    )
    updater.refresh()
    return updater


def _tags_of(target: TargetFile) -> list[str]:
    tags = custom_of(target).get("tags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _pick(targets_md: Targets, tag: str, version: str, channel: Channel) -> list[str]:
    """The names of every target of `version` and `tag`, for all hardware ids."""
    chosen = sorted(
        name
        for name, target in targets_md.targets.items()
        if target_version(target) == version and tag in _tags_of(target)
    )
    if chosen:
        return chosen
    offered = sorted(
        {str(target_version(t)) for t in targets_md.targets.values() if tag in _tags_of(t)}
    )
    if channel == Channel.PROD:
        have = f"released: {', '.join(offered)}" if offered else "nothing is released to it yet"
        raise click.ClickException(
            f"version {version} of tag {tag} is not released to production devices of tag "
            f"{tag} ({have}): release it first (`tufa waves init NAME {version} {tag} -k "
            "ARCHIVE`, then `tufa waves complete NAME`), or check `tufa targets list --prod "
            f"--tag {tag}`"
        )
    raise _not_in_ci(tag, version, set(offered))


def _not_in_ci(tag: str, version: str, offered: set[str]) -> click.ClickException:
    have = f"it has versions {', '.join(sorted(offered))}" if offered else f"none has tag {tag}"
    return click.ClickException(
        f"the CI channel has no target of tag {tag} and version {version} ({have}): check "
        f"`tufa targets list --tag {tag}`, or publish it with `tufa targets add`"
    )


def _ci_hardware_id(api: Api, tag: str, version: str, given: str | None) -> str:
    """The hardware id a CI bundle is for: each hardware id's CI devices are served a view
    of their own, so a bundle holds one. Given, or the only one build `version` has."""
    if given is not None:
        return given

    def listed(**query: str) -> list[Any]:
        found: list[Any] = api.get_json(f"{api.path(api_paths.TARGETS)}?{httpx.QueryParams(query)}")
        return found

    builds = listed(tag=tag, version=version)
    found = sorted({hw for t in builds if str(t["version"]) == version for hw in t["hardware_ids"]})
    if not found:
        # Only to say which builds there are: the tag's whole list, on this error alone.
        raise _not_in_ci(tag, version, {str(t["version"]) for t in listed(tag=tag)})
    if len(found) > 1:
        raise click.UsageError(
            f"build {version} of tag {tag} is for hardware ids {', '.join(found)}, and the CI "
            "devices of each are served metadata of their own: give --hardware-id, one "
            "bundle per hardware id"
        )
    (only,) = found
    return str(only)


def _download_target(
    api: Api,
    external: httpx.Client,
    channel: Channel,
    info: TargetFile,
    dest: Path,
    label: str,
    quiet: bool,
) -> None:
    """Fetch one target into `dest`, refusing any byte past its signed length and any
    content whose hashes differ from the signed ones."""
    sha256 = info.hashes.get("sha256")
    if sha256 is None:
        raise click.ClickException(f"target {info.path} has no SHA-256 in its metadata")
    external_url = custom_of(info).get("url")
    if isinstance(external_url, str):
        # The token goes to the tufa server only, never to an external target's host;
        # only the signed length and hashes are trusted, so its redirects may be followed.
        url, client = external_url, external
    else:
        filename = f"{sha256}.{info.path}"
        url = api.url(api.path(api_paths.TARGET_FILE, channel=channel, filename=filename))
        client = api.client
    with transfer_progress(quiet=quiet) as progress:
        task = progress.add_task(label, total=info.length)
        try:
            verified.download(
                client,
                url,
                info,
                dest,
                progress=lambda done: progress.update(task, completed=done),
                timeout=TRANSFER_TIMEOUT,
            )
        except verified.DownloadError as e:
            raise click.ClickException(_why_not_written(e, url)) from e


def _why_not_written(error: verified.DownloadError, url: str) -> str:
    name = error.target.path
    if isinstance(error, verified.Mismatch | verified.Short):
        return (
            f"{name} from {url} does not match its signed length and SHA-256: the file "
            "there is not the one published; nothing was written"
        )
    if isinstance(error, verified.TooLong):
        return (
            f"{url} sends more than the {error.target.length} bytes signed for {name}: the "
            "file there is not the one published"
        )
    if isinstance(error, verified.Refused):
        return f"cannot download {name} from {url}: {error.refusal}; nothing was written"
    if isinstance(error, verified.DiskFull):
        return (
            f"the disk holding {error.folder} is full: nothing was written; free some space "
            "or use another disk, and run again"
        )
    cause = error.error if isinstance(error, verified.Interrupted) else error
    return f"download of {name} from {url} failed: {cause}; nothing was written, run again"


def _check_destination(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise click.ClickException(
            f"{directory} exists and is not a directory: give a new or empty directory"
        )
    if directory.is_dir() and any(directory.iterdir()):
        raise click.ClickException(
            f"{directory} exists and is not empty: give a new or empty directory (a bundle "
            "is never written among other files, so a device reads only what it verifies)"
        )


def _expires(metadata: dict[str, bytes]) -> datetime:
    """When devices stop accepting the bundle: the earliest expiry of the newest root,
    timestamp, snapshot and targets (older roots only lead to the newest)."""
    roots = [name for name in metadata if name.endswith(".root.json")]
    newest_root = max(roots, key=lambda name: int(name.split(".")[0]))
    return min(
        Metadata.from_bytes(data).signed.expires
        for name, data in metadata.items()
        if name not in roots or name == newest_root
    )


def _build_bundle(
    api: Api,
    partial: Path,
    tag: str,
    version: str,
    channel: Channel,
    hardware_id: str | None,
    quiet: bool,
) -> tuple[BundleManifest, list[TargetFile], datetime]:
    """Fetch, verify and write the whole bundle into `partial`."""
    hardware_id = _ci_hardware_id(api, tag, version, hardware_id) if channel is Channel.CI else None
    metadata = _served_metadata(api, channel, tag, hardware_id)
    (partial / METADATA_DIR).mkdir(parents=True)
    (partial / TARGETS_DIR).mkdir()
    for filename, data in metadata.items():
        _write_synced(partial / METADATA_DIR / filename, data)
    with (
        tempfile.TemporaryDirectory(prefix="tufa-bundle-trust-") as trust,
        httpx.Client(follow_redirects=True, timeout=TRANSFER_TIMEOUT) as external,
    ):
        try:
            updater = _verified_updater(partial, Path(trust), metadata["1.root.json"])
        except exceptions.ExpiredMetadataError as e:
            raise click.ClickException(
                f"the metadata the server serves has expired ({e}); nothing was written. "
                "The server re-signs it on its own: check that it runs with re-signing on "
                "and that its clock is right, then run again"
            ) from e
        except (exceptions.RepositoryError, exceptions.DownloadError) as e:
            raise click.ClickException(
                f"the metadata the server serves does not verify with python-tuf ({e}); "
                "nothing was written. Run again (a key rotation may have been under way); "
                "if it persists, tell the server's operator"
            ) from e
        # The very bytes ngclient just verified; it keeps its own copy private.
        (targets_bytes,) = (
            data for name, data in metadata.items() if name.endswith(".targets.json")
        )
        names = _pick(Metadata[Targets].from_bytes(targets_bytes).signed, tag, version, channel)
        infos = []
        for number, name in enumerate(names, start=1):
            info = updater.get_targetinfo(name)  # from what ngclient verified
            if info is None:  # pragma: no cover - listed in the very targets it verified
                raise click.ClickException(f"target {name} vanished from the verified targets")
            label = f"[{number}/{len(names)}] {name}"
            dest = partial / TARGETS_DIR / name
            _download_target(api, external, channel, info, dest, label, quiet)
            infos.append(info)
    manifest = BundleManifest(
        factory=api.factory,
        channel=channel,
        tag=tag,
        version=version,
        created_at=datetime.now(UTC).replace(microsecond=0),
        targets=tuple(names),
    )
    _write_synced(partial / MANIFEST_FILE, manifest.to_json().encode())
    for folder in (partial / METADATA_DIR, partial / TARGETS_DIR, partial):
        _sync_dir(folder)
    return manifest, infos, _expires(metadata)


@click.command("offline-update")
@click.argument("tag")
@click.argument("version")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--prod", is_flag=True, help="What production devices of TAG are served.")
@click.option(
    "--hardware-id",
    help="CI: the hardware id whose devices the bundle is for (needed if VERSION has several).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@json_option
@with_api
def offline_update(
    api: Api,
    tag: str,
    version: str,
    directory: Path,
    prod: bool,
    hardware_id: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write an offline (USB) update bundle of build VERSION of tag TAG into DIR.

    The bundle holds the TUF metadata a device of the channel and tag is served (the
    whole root chain, timestamp, snapshot, targets) and every target of VERSION with
    TAG: for all hardware ids in production, for one hardware id in CI (each hardware
    id's CI devices are served metadata of their own; --hardware-id chooses it, needed
    when VERSION has several). It is verified with python-tuf first, and written into
    DIR.partial then renamed, so DIR is either a complete bundle or absent. DIR must
    be new or empty. A device installs it with `tufa-agent install-bundle DIR`, with
    the same checks as an online update: it must do so before the bundle expires.

    Without --prod: the CI channel. With --prod: production, where VERSION must have
    been released to TAG (a completed wave).

    \b
    Examples:
      tufa targets offline-update main 42 /media/usb/update-42
      tufa targets offline-update main 42 /media/usb/update-42 --hardware-id rpi4
      tufa targets offline-update main 42 /media/usb/update-42 --prod
    """
    channel = Channel.PROD if prod else Channel.CI
    directory = Path(os.path.abspath(directory))
    _check_destination(directory)
    partial = directory.with_name(f"{directory.name}.partial")
    # Left by a cut run of this command: never a bundle, so it goes.
    shutil.rmtree(partial, ignore_errors=True)
    try:
        manifest, infos, expires = _build_bundle(
            api, partial, tag, version, channel, hardware_id, quiet or as_json
        )
        _check_destination(directory)  # again: something may have written there meanwhile
        if directory.is_dir():
            directory.rmdir()
        partial.rename(directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _sync_dir(directory.parent)
    if as_json:
        click.echo(manifest.to_json(), nl=False)
        return
    click.echo(
        f"Wrote {directory}: version {version} of tag {tag}, {channel} channel of "
        f"{manifest.factory}, {len(infos)} target(s):"
    )
    for info in infos:
        click.echo(f"  {info.path}  {info.length} bytes  sha256 {info.hashes['sha256'][:16]}…")
    click.echo(
        f"Devices accept it until {expires:%Y-%m-%d %H:%M:%S} UTC, when its metadata "
        f"expires. On a device: tufa-agent install-bundle {directory}"
    )
