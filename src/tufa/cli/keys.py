"""`tufa keys`: the offline keys archive and the roots it governs."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tufa.cli.client import Api, with_api
from tufa.cli.output import console, json_option, print_json, warn
from tufa.cli.root_update import archive_option
from tufa.core.archive import ArchiveError, OfflineArchive
from tufa.core.files import write_private_file
from tufa.core.metadata import OFFLINE_EXPIRY_WARNING, ROOT, Channel
from tufa.core.root_update import shared_keys_warning


@click.group()
def keys() -> None:
    """Offline keys archive and TUF roots."""


def write_new_file(path: Path, data: bytes) -> None:
    """Write `path` (mode 0600, atomically), which must not exist yet.

    The name is claimed with O_EXCL first, so a file that appears after an early check
    is still never replaced; the claimed empty file is then atomically replaced by the
    complete one, or removed again if writing fails.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise click.ClickException(
            f"{path} already exists; choose another file name (tufa never overwrites it)"
        ) from e
    except OSError as e:
        raise click.ClickException(f"cannot create {path}: {e.strerror}") from e
    os.close(fd)
    try:
        write_private_file(path, data)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@keys.command()
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@with_api
def download(api: Api, archive: Path, as_json: bool) -> None:
    """Download the offline keys archive to ARCHIVE, once.

    The archive holds the factory's first root private key. The server deletes its
    copy as soon as the file is safely written (mode 0600): back it up right away,
    then rotate the root key (`tufa keys rotate-root ARCHIVE`).

    \b
    Example:
      tufa keys download acme-keys.tgz
    """
    if archive.exists():
        raise click.ClickException(
            f"{archive} already exists; choose another file name (tufa never overwrites it)"
        )
    response = api.request("GET", api.factory_path("/keys/archive"))
    data = response.content
    digest = hashlib.sha256(data).hexdigest()
    if digest != response.headers.get("x-tufa-archive-sha256"):
        raise click.ClickException("the archive arrived damaged (checksum mismatch); run again")
    try:
        parsed = OfflineArchive.from_bytes(data, source="downloaded archive")
    except ArchiveError as e:
        raise click.ClickException(f"{e}; run again") from e
    if parsed.factory != api.factory:
        raise click.ClickException(
            f"the server sent the archive of factory {parsed.factory!r}, not {api.factory!r}"
        )
    write_new_file(archive, data)
    if hashlib.sha256(archive.read_bytes()).hexdigest() != digest:
        raise click.ClickException(f"{archive} did not read back intact; check the disk, run again")
    api.request("POST", api.factory_path("/keys/archive/confirm"), json_body={"sha256": digest})
    root_keys = parsed.keys_for(ROOT)
    if as_json:
        print_json(
            {
                "archive": str(archive),
                "sha256": digest,
                "root_keys": [
                    {channel.value: key.half(channel).keyid for channel in Channel}
                    for key in root_keys
                ],
            }
        )
        return
    click.echo(f"Saved the offline keys archive of {api.factory!r} to {archive} (mode 0600).")
    for key in root_keys:
        click.echo(f"Root key: {key.ci.keyid} (ci) / {key.prod.keyid} (prod)")
    click.echo(
        "The server has deleted its copy: this file is now the only one. Back it up now "
        "(see the README, 'Backing up offline keys')."
    )


@keys.command("show-root")
@click.option("--prod", is_flag=True, help="Show the production root instead of the CI root.")
@archive_option(required=False, help="Offline keys archive: mark which keys it holds.")
@json_option
@with_api
def show_root(api: Api, prod: bool, archive: Path | None, as_json: bool) -> None:
    """Show the CI (or production) root: keys, thresholds, expiry.

    Each root key of the owner is a pair, one key per channel: the table lists the
    channel's half, and under it every pair with both halves. With --json the signed
    root.json is printed as served, for jq or to bootstrap a TUF client.

    \b
    Examples:
      tufa keys show-root --prod
      tufa keys show-root -k acme-keys.tgz
      tufa keys show-root --json | jq '.signed.roles.root.keyids[0]'
    """
    channel = "prod" if prod else "ci"
    served = api.request("GET", api.factory_path(f"/repo/{channel}/metadata/root.json"))
    root = served.json()
    factory = api.get_json(api.factory_path())
    expires = datetime.fromisoformat(root["signed"]["expires"].replace("Z", "+00:00"))
    for warning in filter(None, [_expiry_warning(channel, expires), _shared_keys_warning(factory)]):
        warn(warning)
    if as_json:
        click.echo(served.text)
        return
    online = {k["keyid"] for k in factory["online_keys"]}
    held: set[str] | None = None
    if archive is not None:
        try:
            held = set(OfflineArchive.load(archive).keyids())
        except ArchiveError as e:
            raise click.ClickException(str(e)) from e
    _print_root(channel, root["signed"], online, held)
    _print_root_key_pairs(factory["root_key_pairs"], held)


def _expiry_warning(channel: str, expires: datetime) -> str | None:
    left = expires - datetime.now(UTC)
    if left > OFFLINE_EXPIRY_WARNING:
        return None
    state = "has EXPIRED" if left.total_seconds() <= 0 else f"expires in {left.days} day(s)"
    return (
        f"the {channel} root {state} ({expires.isoformat()}); devices will stop updating. "
        "Extend it with `tufa keys updates`."
    )


def _shared_keys_warning(factory: dict[str, Any]) -> str | None:
    shared = factory["channels_share_keys"]
    return shared_keys_warning(len(shared)) if shared else None


def _print_root(
    channel: str, signed: dict[str, Any], online: set[str], held: set[str] | None
) -> None:
    out = console()
    out.print(
        f"[bold]{channel} root[/bold] version {signed['version']}, expires {signed['expires']}"
    )
    table = Table()
    for column in ("role", "threshold", "key id", "type", "held by"):
        table.add_column(column)
    if held is not None:
        table.add_column("in archive")
    for role, spec in signed["roles"].items():
        for keyid in spec["keyids"]:
            key = signed["keys"][keyid]
            row = [role, str(spec["threshold"]), keyid, key["keytype"]]
            row.append("server (online)" if keyid in online else "owner (offline)")
            if held is not None:
                row.append("yes" if keyid in held else "no")
            table.add_row(*row)
    out.print(table)


def _print_root_key_pairs(pairs: list[dict[str, str]], held: set[str] | None) -> None:
    out = console()
    out.print("Root keys of the owner (each a pair: its ci half signs the CI root, its prod")
    out.print("half the production root):")
    for pair in pairs:
        halves = (
            pair["ci"]
            if pair["ci"] == pair["prod"]
            else f"{pair['ci']} (ci) / {pair['prod']} (prod)"
        )
        line = f"  {halves}"
        if pair["ci"] == pair["prod"]:
            line += "  [yellow](one key for both channels: rotate it)[/yellow]"
        if held is not None:
            line += f"  in archive: {'yes' if {pair['ci'], pair['prod']} <= held else 'no'}"
        out.print(line)
