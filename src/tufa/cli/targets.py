"""`tufa targets`: publish CI builds, inspect what each channel offers, and (with
`offline-update`, in `tufa.cli.bundles`) write offline (USB) update bundles."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import click
import httpx
from rich.progress import TaskID
from rich.table import Table

from tufa.cli.bundles import offline_update
from tufa.cli.client import Api, describe_refusal, with_api
from tufa.cli.output import console, json_option, print_json, print_record, transfer_progress
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.metadata import Channel
from tufa.core.responses import refusal_of

CHUNK = 1024 * 1024


class TargetSpec(TypedDict):
    """One target as `POST .../targets` takes it."""

    name: str
    version: str
    hardware_ids: list[str]
    tags: list[str]
    sha256: str
    length: int
    custom: dict[str, Any]
    url: NotRequired[str]


@click.group(cls=WholeSentenceGroup)
def targets() -> None:
    """Publish CI targets and list what each channel offers."""


targets.add_command(offline_update)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _upload_all(api: Api, files: dict[str, Path], quiet: bool) -> None:
    """Stream each file (by SHA-256) to the blob store, with a bar each and, for several,
    one for the total."""
    sizes = {sha256: path.stat().st_size for sha256, path in files.items()}
    with transfer_progress(quiet=quiet) as progress:
        total = None
        if len(files) > 1:
            total = progress.add_task(f"total, {len(files)} files", total=sum(sizes.values()))
        for sha256, path in files.items():
            task = progress.add_task(f"uploading {path.name}", total=sizes[sha256])

            def advance(sent: int, task: TaskID = task) -> None:
                progress.advance(task, sent)
                if total is not None:
                    progress.advance(total, sent)

            _upload(api, path, sha256, sizes[sha256], advance)


def _upload(api: Api, path: Path, sha256: str, size: int, advance: Callable[[int], None]) -> None:
    """Stream `path` to the blob store. The whole file is sent: the server gives a
    factory a file only once it received the bytes from it."""

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                advance(len(chunk))
                yield chunk

    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    try:
        response = api.client.put(
            api.url(api.path(api_paths.BLOB, sha256=sha256)),
            content=chunks(),
            headers=headers,
            timeout=120,  # per read or write, not for the whole upload
        )
    except httpx.HTTPError as e:
        raise click.ClickException(f"upload of {path} failed: {e}; run again") from e
    if response.status_code not in (200, 201):
        raise click.ClickException(f"upload of {path}: {describe_refusal(refusal_of(response))}")


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
) -> tuple[TargetSpec, Path | None]:
    """The JSON the server takes for one target, and the file to upload for it."""
    if (file is None) == (url is None):
        raise click.UsageError(f"{name}: give either --file, or --url with --sha256 and --length")
    if file is not None:
        if not file.is_file():
            raise click.UsageError(f"{name}: {file} is not a file")
        sha256, length = _sha256_of(file), file.stat().st_size
    elif sha256 is None or length is None:
        raise click.UsageError(f"{name}: an external target (--url) needs --sha256 and --length")
    spec: TargetSpec = {
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


def _batch(path: Path) -> list[tuple[TargetSpec, Path | None]]:
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

    The server is asked first what the publish would do: a refusal (the token, the
    factory, a different target under a published name) comes before any upload, and
    a --file is uploaded (in full) only if the factory does not have it yet. Then the
    CI targets, snapshot and timestamp are re-signed in one step. Re-adding an
    identical target changes nothing.

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
    body = {"targets": [spec for spec, _ in specs]}
    # Asked first: a refusal (the token, the factory, a conflict) comes before any
    # upload, and only files the factory has not uploaded are sent.
    check = api.request("POST", api.path(api_paths.CHECK_TARGETS), json_body=body).json()
    missing = set(check["missing_uploads"])
    files = {spec["sha256"]: file for spec, file in specs if file and spec["sha256"] in missing}
    _upload_all(api, files, quiet or as_json)
    result = api.request("POST", api.path(api_paths.TARGETS), json_body=body).json()
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
@click.option("--version", "build", help="Only targets of this build version.")
@json_option
@with_api
def list_targets(
    api: Api,
    prod: bool,
    tag: str | None,
    hardware_id: str | None,
    build: str | None,
    as_json: bool,
) -> None:
    """List the targets a channel offers, oldest version first.

    \b
    Examples:
      tufa targets list --tag main --hardware-id rpi4
      tufa targets list --tag main --version 42 --json
      tufa targets list --prod
    """
    params: dict[str, str] = {"channel": Channel.PROD if prod else Channel.CI}
    if tag:
        params["tag"] = tag
    if hardware_id:
        params["hardware_id"] = hardware_id
    if build:
        params["version"] = build
    found = api.get_json(f"{api.path(api_paths.TARGETS)}?{httpx.QueryParams(params)}")
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
    found = api.get_json(api.path(api_paths.TARGET, name=name))
    print_record(
        found,
        as_json,
        keys=("name", "version", "length", "sha256", "url", "created_at", "pruned_at"),
        more=[
            ("channels", ", ".join(found["channels"]) or "none"),
            ("custom", json.dumps(found["custom"], sort_keys=True)),
        ],
    )


def _print_removed(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for removed in result["removed"]:
        click.echo(f"Removed {removed} from CI targets.")
    if not result["removed"]:
        click.echo("Nothing to remove: the CI targets are unchanged.")
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
    result = api.request("POST", api.path(api_paths.PRUNE_TARGETS), json_body={"keep": keep}).json()
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
        "POST", api.path(api_paths.DELETE_TARGETS), json_body={"names": list(names)}
    ).json()
    _print_removed(result, as_json)
