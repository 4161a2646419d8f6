"""`tufa targets`: publish CI builds, inspect what each channel offers, and write
offline (USB) update bundles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.table import Table
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from tufa.cli.client import Api, with_api
from tufa.cli.output import console, json_option, print_json, transfer_progress
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
from tufa.core.responses import refusal_message
from tufa.core.selection import custom_of, target_version

CHUNK = 1024 * 1024


@click.group()
def targets() -> None:
    """Publish CI targets and list what each channel offers."""


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _upload(api: Api, path: Path, sha256: str, quiet: bool) -> None:
    """Stream `path` to the blob store with a progress bar. The whole file is sent every
    time: the server gives a factory a file only once it received the bytes from it."""
    size = path.stat().st_size
    with transfer_progress(quiet=quiet) as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    progress.advance(task, len(chunk))
                    yield chunk

        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if api.token:
            headers["Authorization"] = f"Bearer {api.token}"
        try:
            response = httpx.put(
                f"{api.server}{api.factory_path(f'/blobs/{sha256}')}",
                content=chunks(),
                headers=headers,
                timeout=120,  # per read or write, not for the whole upload
            )
        except httpx.HTTPError as e:
            raise click.ClickException(f"upload of {path} failed: {e}; run again") from e
    if response.status_code not in (200, 201):
        raise click.ClickException(
            f"the server refused the upload of {path}: {refusal_message(response)}"
        )


def _spec(
    name: str,
    version: str,
    hardware_ids: list[str],
    tags: list[str],
    file: Path | None,
    url: str | None,
    sha256: str | None,
    length: int | None,
    custom: dict[str, Any],
) -> tuple[dict[str, Any], Path | None]:
    """The JSON the server takes for one target, and the file to upload for it."""
    if (file is None) == (url is None):
        raise click.UsageError(f"{name}: give either --file, or --url with --sha256 and --length")
    if file is not None:
        if not file.is_file():
            raise click.UsageError(f"{name}: {file} is not a file")
        sha256, length = _sha256_of(file), file.stat().st_size
    elif sha256 is None or length is None:
        raise click.UsageError(f"{name}: an external target (--url) needs --sha256 and --length")
    spec = {
        "name": name,
        "version": version,
        "hardware_ids": hardware_ids,
        "tags": tags,
        "sha256": sha256.lower(),
        "length": length,
        "custom": custom,
    }
    if url is not None:
        spec["url"] = url
    return spec, file


def _batch(path: Path) -> list[tuple[dict[str, Any], Path | None]]:
    try:
        items = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise click.UsageError(f"cannot read batch file {path}: {e}") from e
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise click.UsageError(f"{path} must hold a JSON list of target objects")
    specs = []
    for item in items:
        file = item.get("file")
        specs.append(
            _spec(
                str(item.get("name")),
                str(item.get("version")),
                list(item.get("hardware_ids", [])),
                list(item.get("tags", [])),
                (path.parent / file) if file else None,
                item.get("url"),
                item.get("sha256"),
                item.get("length"),
                dict(item.get("custom", {})),
            )
        )
    return specs


@targets.command()
@click.argument("name", required=False)
@click.option("--version", "version", help="The build's version (e.g. the CI build number).")
@click.option("--hardware-id", "hardware_ids", multiple=True, help="Hardware id (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag such as main or beta (repeatable).")
@click.option("--file", type=click.Path(path_type=Path), help="File to upload.")
@click.option("--url", help="External target: where devices download it.")
@click.option("--sha256", help="External target: its SHA-256.")
@click.option("--length", type=int, help="External target: its length in bytes.")
@click.option("--custom", default="{}", help="Extra custom metadata, a JSON object.")
@click.option(
    "--batch",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON list of targets (name, version, hardware_ids, tags, file or url/sha256/length).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@with_api
def add(
    api: Api,
    name: str | None,
    version: str | None,
    hardware_ids: tuple[str, ...],
    tags: tuple[str, ...],
    file: Path | None,
    url: str | None,
    sha256: str | None,
    length: int | None,
    custom: str,
    batch: Path | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Publish target NAME to the CI channel (a CI-scoped token is enough).

    Each --file is uploaded in full, then the CI targets, snapshot and timestamp are
    re-signed in one step. Re-adding an identical target changes nothing; a different
    target under an existing name is refused.

    \b
    Examples:
      tufa targets add rpi4-image-42 --version 42 --hardware-id rpi4 --tag main \\
          --file build/image.img
      tufa targets add app-7 --version 7 --hardware-id rpi4 --tag main \\
          --url https://cdn.example/app-7.tar --sha256 9f86d0... --length 1048576
      tufa targets add --batch build/targets.json
    """
    if batch is not None:
        if name is not None:
            raise click.UsageError("give either NAME with its options, or --batch")
        specs = _batch(batch)
    else:
        if name is None or version is None or not hardware_ids or not tags:
            raise click.UsageError("NAME, --version, --hardware-id and --tag are required")
        try:
            extra = json.loads(custom)
        except ValueError as e:
            raise click.UsageError(f"--custom is not valid JSON: {e}") from e
        if not isinstance(extra, dict):
            raise click.UsageError("--custom must be a JSON object")
        specs = [
            _spec(name, version, list(hardware_ids), list(tags), file, url, sha256, length, extra)
        ]
    for spec, upload in specs:
        if upload is not None:
            _upload(api, upload, spec["sha256"], quiet or as_json)
    result = api.request(
        "POST", api.factory_path("/targets"), json_body={"targets": [s for s, _ in specs]}
    ).json()
    if as_json:
        print_json(result)
        return
    for added in result["added"]:
        click.echo(f"Published {added}.")
    for same in result["unchanged"]:
        click.echo(f"{same} was already published, identical: nothing to do.")
    click.echo(f"CI targets version {result['targets_version']}.")


@targets.command("list")
@click.option("--prod", is_flag=True, help="The production channel instead of CI.")
@click.option("--tag", help="Only targets with this tag.")
@click.option("--hardware-id", help="Only targets for this hardware id.")
@json_option
@with_api
def list_targets(
    api: Api, prod: bool, tag: str | None, hardware_id: str | None, as_json: bool
) -> None:
    """List the targets a channel offers, oldest version first."""
    params = {"channel": "prod" if prod else "ci"}
    if tag:
        params["tag"] = tag
    if hardware_id:
        params["hardware_id"] = hardware_id
    found = api.get_json(api.factory_path(f"/targets?{httpx.QueryParams(params)}"))
    if as_json:
        print_json(found)
        return
    table = Table()
    for column in ("name", "version", "hardware ids", "tags", "length", "sha256"):
        table.add_column(column)
    for t in found:
        table.add_row(
            t["name"],
            str(t["version"]),
            ",".join(t["hardware_ids"]),
            ",".join(t["tags"]),
            str(t["length"]),
            t["sha256"][:16] + "…",
        )
    console().print(table)


@targets.command()
@click.argument("name")
@json_option
@with_api
def show(api: Api, name: str, as_json: bool) -> None:
    """Show target NAME: hashes, custom metadata, and which channels list it."""
    found = api.get_json(api.factory_path(f"/targets/{name}"))
    if as_json:
        print_json(found)
        return
    for key in ("name", "version", "length", "sha256", "url", "created_at", "pruned_at"):
        click.echo(f"{key:>10}: {found[key] if found[key] is not None else '-'}")
    click.echo(f"{'channels':>10}: {', '.join(found['channels']) or 'none'}")
    click.echo(f"{'custom':>10}: {json.dumps(found['custom'], sort_keys=True)}")


def _print_removed(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for removed in result["removed"]:
        click.echo(f"Removed {removed} from CI targets.")
    click.echo(f"CI targets version {result['targets_version']}.")


@targets.command()
@click.option("--keep", required=True, type=click.IntRange(min=1), help="Versions to keep.")
@json_option
@with_api
def prune(api: Api, keep: int, as_json: bool) -> None:
    """Drop all but the KEEP newest versions per hardware id and tag from CI targets.

    Production targets are not touched; files stay stored.

    \b
    Example:
      tufa targets prune --keep 5
    """
    result = api.request(
        "POST", api.factory_path("/targets/prune"), json_body={"keep": keep}
    ).json()
    _print_removed(result, as_json)


@targets.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@json_option
@with_api
def delete(api: Api, names: tuple[str, ...], as_json: bool) -> None:
    """Remove the targets NAME... from the CI channel, in one publish.

    All of them go, in one new CI targets version, or none does: a name that is not in
    the CI targets refuses the whole command. Production is not touched: a target that
    a release lists stays served to its devices, and its file stays stored. A deleted
    target can be published again, identical, with `tufa targets add`.

    \b
    Example:
      tufa targets delete rpi4-image-40 rpi4-image-41
    """
    result = api.request(
        "POST", api.factory_path("/targets/delete"), json_body={"names": list(names)}
    ).json()
    _print_removed(result, as_json)


# -- offline (USB) update bundles ------------------------------------------------------


def _metadata_field(data: bytes, filename: str, *keys: str) -> Any:
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


def _served_metadata(api: Api, channel: str, tag: str) -> dict[str, bytes]:
    """What a device of `channel` and `tag` is served, by bundle file name: the root chain
    1..N, the timestamp of its view, and the snapshot and targets versions it names."""
    base = api.factory_path(f"/repo/{channel}/metadata/")

    def get(filename: str) -> bytes:
        return api.request("GET", f"{base}{filename}").content

    files: dict[str, bytes] = {}
    newest = _metadata_field(get("root.json"), "root.json", "signed", "version")
    for version in range(1, newest + 1):
        files[f"{version}.root.json"] = get(f"{version}.root.json")
    # CI devices of every tag are served the default view; production devices their tag's.
    query = f"?{httpx.QueryParams({'tag': tag})}" if channel == "prod" else ""
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


def _write_synced(path: Path, chunks: Iterator[bytes]) -> None:
    """Write and fsync: a USB stick is pulled soon after the command ends."""
    with path.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
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


def _pick(targets_md: Targets, tag: str, version: str, channel: str) -> list[str]:
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
    if channel == "prod":
        have = f"released: {', '.join(offered)}" if offered else "nothing is released to it yet"
        raise click.ClickException(
            f"version {version} of tag {tag} is not released to production devices of tag "
            f"{tag} ({have}): release it first (`tufa waves init NAME {version} {tag} -k "
            "ARCHIVE`, then `tufa waves complete NAME`), or check `tufa targets list --prod "
            f"--tag {tag}`"
        )
    have = f"it has versions {', '.join(offered)}" if offered else f"none has tag {tag}"
    raise click.ClickException(
        f"the CI channel has no target of tag {tag} and version {version} ({have}): check "
        f"`tufa targets list --tag {tag}`, or publish it with `tufa targets add`"
    )


def _download_target(
    api: Api, channel: str, info: TargetFile, dest: Path, label: str, quiet: bool
) -> None:
    """Fetch one target into `dest`, refusing any byte past its signed length and any
    content whose SHA-256 differs from the signed one."""
    sha256 = info.hashes.get("sha256")
    if sha256 is None:
        raise click.ClickException(f"target {info.path} has no SHA-256 in its metadata")
    external = custom_of(info).get("url")
    headers: dict[str, str] = {}
    if isinstance(external, str):
        # The token goes to the tufa server only, never to an external target's host;
        # only the signed length and hash are trusted, so its redirects may be followed.
        url = external
    else:
        url = f"{api.server}{api.factory_path(f'/repo/{channel}/targets/{sha256}.{info.path}')}"
        if api.token:
            headers["Authorization"] = f"Bearer {api.token}"
    digest = hashlib.sha256()
    received = 0
    with transfer_progress(quiet=quiet) as progress:
        task = progress.add_task(label, total=info.length)

        def chunks(response: httpx.Response) -> Iterator[bytes]:
            nonlocal received
            for chunk in response.iter_bytes(CHUNK):
                received += len(chunk)
                if received > info.length:
                    raise click.ClickException(
                        f"{url} sends more than the {info.length} bytes signed for "
                        f"{info.path}: the file there is not the one published"
                    )
                digest.update(chunk)
                progress.advance(task, len(chunk))
                yield chunk

        try:
            with httpx.stream(
                "GET", url, headers=headers, timeout=120, follow_redirects=isinstance(external, str)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise click.ClickException(
                        f"cannot download {info.path} from {url}: "
                        f"{_refusal(response)}; nothing was written"
                    )
                _write_synced(dest, chunks(response))
        except httpx.HTTPError as e:
            raise click.ClickException(
                f"download of {info.path} from {url} failed: {e}; nothing was written, run again"
            ) from e
    if received != info.length or digest.hexdigest() != sha256:
        raise click.ClickException(
            f"{info.path} from {url} does not match its signed length and SHA-256: the file "
            "there is not the one published; nothing was written"
        )


def _refusal(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {refusal_message(response)}".strip()


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
    api: Api, partial: Path, tag: str, version: str, channel: str, quiet: bool
) -> tuple[BundleManifest, list[TargetFile], datetime]:
    """Fetch, verify and write the whole bundle into `partial`."""
    metadata = _served_metadata(api, channel, tag)
    (partial / METADATA_DIR).mkdir(parents=True)
    (partial / TARGETS_DIR).mkdir()
    for filename, data in metadata.items():
        _write_synced(partial / METADATA_DIR / filename, iter([data]))
    with tempfile.TemporaryDirectory(prefix="tufa-bundle-trust-") as trust:
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
            _download_target(api, channel, info, partial / TARGETS_DIR / name, label, quiet)
            infos.append(info)
    manifest = BundleManifest(
        factory=api.factory,
        channel=channel,
        tag=tag,
        version=version,
        created_at=datetime.now(UTC).replace(microsecond=0),
        targets=tuple(names),
    )
    _write_synced(partial / MANIFEST_FILE, iter([manifest.to_json().encode()]))
    for folder in (partial / METADATA_DIR, partial / TARGETS_DIR, partial):
        _sync_dir(folder)
    return manifest, infos, _expires(metadata)


@targets.command("offline-update")
@click.argument("tag")
@click.argument("version")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--prod", is_flag=True, help="What production devices of TAG are served.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@json_option
@with_api
def offline_update(
    api: Api, tag: str, version: str, directory: Path, prod: bool, quiet: bool, as_json: bool
) -> None:
    """Write an offline (USB) update bundle of build VERSION of tag TAG into DIR.

    The bundle holds the TUF metadata a device of the channel and tag is served (the
    whole root chain, timestamp, snapshot, targets) and every target of VERSION with
    TAG, for all hardware ids. It is verified with python-tuf first, and written into
    DIR.partial then renamed, so DIR is either a complete bundle or absent. DIR must
    be new or empty. A device installs it with `tufa-agent install-bundle DIR`, with
    the same checks as an online update: it must do so before the bundle expires.

    Without --prod: the CI channel. With --prod: production, where VERSION must have
    been released to TAG (a completed wave).

    \b
    Examples:
      tufa targets offline-update main 42 /media/usb/update-42
      tufa targets offline-update main 42 /media/usb/update-42 --prod
    """
    channel = "prod" if prod else "ci"
    directory = Path(os.path.abspath(directory))
    _check_destination(directory)
    partial = directory.with_name(f"{directory.name}.partial")
    # Left by a cut run of this command: never a bundle, so it goes.
    shutil.rmtree(partial, ignore_errors=True)
    try:
        manifest, infos, expires = _build_bundle(
            api, partial, tag, version, channel, quiet or as_json
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
