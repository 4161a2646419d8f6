"""`tufa keys download`: the factory's offline keys archive, fetched once.

The server deletes its copy once told that the file is safely written, so nothing is
confirmed before the file has been written new and read back intact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from tufa.cli.client import Api, with_api
from tufa.cli.keys.archive_options import halves_json, refuse_existing, write_new_file
from tufa.cli.output import json_option, print_json
from tufa.core import api_paths
from tufa.core.archive import ArchiveError, OfflineArchive
from tufa.core.metadata import ROOT


@click.command()
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
    refuse_existing(archive)
    response = api.request("GET", api.path(api_paths.KEYS_ARCHIVE))
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
    api.request("POST", api.path(api_paths.KEYS_ARCHIVE_CONFIRM), json_body={"sha256": digest})
    root_keys = parsed.keys_for(ROOT)
    if as_json:
        print_json(
            {
                "archive": str(archive),
                "sha256": digest,
                "root_keys": [halves_json(key) for key in root_keys],
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
