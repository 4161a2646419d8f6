"""What every command that touches an offline keys archive shares: its options, loading
the archive, writing new files, storing the served roots in it.

The command modules of `tufa keys` (and `tufa waves`, which signs with an archive) take
these from here and never from each other. A command loads its archive once, works on
the loaded object and saves it where its steps say (see `rotate` for why that is twice).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tufa.cli.client import Api
from tufa.core.archive import ArchiveError, ArchiveKey, OfflineArchive
from tufa.core.files import write_private_file
from tufa.core.keys import KeyType
from tufa.core.metadata import ROOT, Channel

KEY_TYPE_OPTION = click.option(
    "--key-type",
    type=click.Choice([t.value for t in KeyType]),
    default=KeyType.ED25519.value,
    show_default=True,
    help="Type of the new key.",
)


def archive_option(
    *, required: bool = True, exists: bool = True, help: str = "Offline keys archive."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-k/--keys ARCHIVE, the same flag on every command that uses an archive."""
    return click.option(
        "-k",
        "--keys",
        "archive",
        required=required,
        type=click.Path(exists=exists, dir_okay=False, path_type=Path),
        help=help,
    )


def load_archive(path: Path, factory: str | None) -> OfflineArchive:
    """The archive at `path`, refused unless it belongs to `factory` (None: any)."""
    try:
        archive = OfflineArchive.load(path)
    except ArchiveError as e:
        raise click.ClickException(str(e)) from e
    if factory is not None and archive.factory != factory:
        raise click.ClickException(
            f"{path} is the archive of factory {archive.factory!r}, not {factory!r}: give "
            f"the archive of {factory!r}, or -f {archive.factory} to act on that factory"
        )
    return archive


def store_served_roots(api: Api, archive: OfflineArchive) -> None:
    """Put the roots the server serves now into `archive` (the caller saves it), so the
    archive documents what its keys govern and which of them were retired."""
    archive.replace_roots(
        {channel: api.request("GET", api.root_path(channel)).content for channel in Channel}
    )


def halves_json(key: ArchiveKey) -> dict[Channel, str]:
    """A root key's key ids as --json prints them: one per channel."""
    return {channel: key.half(channel).keyid for channel in Channel}


def new_key_json(key: ArchiveKey, archive: Path) -> dict[str, object]:
    """A key a command generated into `archive`, as --json prints it (a root key's id
    is its CI half's; `keyids` gives both halves)."""
    keyids: object = halves_json(key) if key.role == ROOT else key.keyid
    return {"role": key.role, "keyid": key.keyid, "keyids": keyids, "archive": str(archive)}


def refuse_existing(path: Path) -> None:
    """Refuse early, before any work, a file name that `write_new_file` would refuse."""
    if os.path.lexists(path):
        raise _already_exists(path)


def write_new_file(path: Path, data: bytes) -> None:
    """Write `path` (mode 0600, atomically), which must not exist yet.

    The name is claimed with O_EXCL first, so a file that appears after an early check
    is still never replaced; the claimed empty file is then atomically replaced by the
    complete one, or removed again if writing fails.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise _already_exists(path) from e
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


def _already_exists(path: Path) -> click.ClickException:
    return click.ClickException(
        f"{path} already exists; choose another file name (tufa never overwrites it)"
    )
