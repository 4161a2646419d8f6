"""`tufa keys copy-targets|backup|restore|sign-file`: work on the offline machine.

These work on files only and never talk to the server: they are meant to run on the
offline machine that holds the archive. Every file they write is new (an existing file
is never replaced, so a typo in a file name cannot destroy the only copy of a key),
written atomically and readable by the owner only, then read back and checked; but
`sign-file`, which adds signatures to the root update file it is given.
"""

from __future__ import annotations

from pathlib import Path

import click

from tufa.cli.keys.archive_options import (
    archive_option,
    halves_json,
    load_archive,
    refuse_existing,
    write_new_file,
)
from tufa.cli.keys.root_update import RootUpdate, print_status, signature_count, update_json
from tufa.cli.output import json_option, print_json
from tufa.core.archive import ArchiveError, OfflineArchive
from tufa.core.backup import MAX_BACKUP_CHARS, BackupError, parse_backup, render_backup
from tufa.core.metadata import ROOT, TARGETS

_FILE = click.Path(dir_okay=False, path_type=Path)
_INCLUDE_RETIRED = click.option(
    "--include-retired",
    is_flag=True,
    help="Also keys the roots no longer list (left out by default).",
)
# Unknown entries are carried over to a targets-only copy, except anything that looks
# like a private key: such a copy must not hold a root key under any name.
_PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"


def _write_archive(path: Path, archive: OfflineArchive, origin: Path) -> OfflineArchive:
    """Write `archive` as the new file `path`, only if it reads back with the same keys.

    The bytes are parsed before anything touches the disk (an archive tufa could not
    load again must never replace nothing with something useless), then once more from
    the disk after writing.
    """
    data = archive.to_bytes()
    keyids = archive.keyids()
    try:
        parsed = OfflineArchive.from_bytes(data, source=f"the archive made from {origin}")
    except ArchiveError as e:
        raise click.ClickException(f"{e}; nothing was written") from e
    if parsed.keyids() != keyids:
        raise click.ClickException(f"the archive made from {origin} loses keys; nothing written")
    write_new_file(path, data)
    return _read_back(path, keyids)


def _read_back(path: Path, expected: list[str]) -> OfflineArchive:
    """The archive as written, checked to hold exactly the expected keys."""
    try:
        written = OfflineArchive.load(path)
    except ArchiveError as e:
        path.unlink(missing_ok=True)
        raise click.ClickException(f"{path} did not read back ({e}); check the disk") from e
    if written.keyids() != sorted(expected):
        path.unlink(missing_ok=True)
        raise click.ClickException(f"{path} did not read back intact; check the disk")
    return written


@click.command("copy-targets")
@click.argument("src", type=_FILE)
@click.argument("dst", type=_FILE)
@_INCLUDE_RETIRED
@json_option
def copy_targets(src: Path, dst: Path, include_retired: bool, as_json: bool) -> None:
    """Copy archive SRC to DST, without its root keys.

    DST holds SRC's offline targets keys, its roots and the entries tufa does not know
    (except under keys/, and anything holding a private key); retired targets keys (the
    roots no longer list them) only with --include-retired. It can sign production
    releases but cannot change the root: give it to the release managers and keep SRC,
    with the root keys, in the safe. DST must not exist.

    \b
    Example:
      tufa keys copy-targets acme-keys.tgz acme-targets-only.tgz
    """
    refuse_existing(dst)
    source = load_archive(src, None)
    targets_keys = source.keys_for(TARGETS, include_retired=include_retired)
    retired = [] if include_retired else source.retired_keys(TARGETS)
    if not targets_keys:
        raise click.ClickException(
            f"{src} holds no targets keys; there is nothing to copy"
            if not retired
            else f"every targets key of {src} is retired; pass --include-retired to copy them"
        )
    kept = {
        name: data
        for name, data in source.extra.items()
        if not name.startswith("keys/") and _PRIVATE_KEY_MARKER not in data
    }
    left_out = sorted(set(source.extra) - set(kept))
    copy = OfflineArchive(
        factory=source.factory,
        keys=list(targets_keys),
        roots=dict(source.roots),
        extra=kept,
        retired=set(source.retired),
    )
    keyids = [k.keyid for k in targets_keys]
    written = _write_archive(dst, copy, src)
    roots = sorted(written.roots)
    root_keyids = [keyid for k in source.keys_for(ROOT) for keyid in k.keyids]
    if as_json:
        print_json(
            {
                "archive": str(dst),
                "source": str(src),
                "factory": source.factory,
                "targets_keyids": keyids,
                "roots": roots,
                "extra": sorted(kept),
                "left_out": {
                    "root_keyids": root_keyids,
                    "retired_targets_keyids": [k.keyid for k in retired],
                    "entries": left_out,
                },
            }
        )
        return
    click.echo(f"Wrote {dst} (mode 0600): the targets keys of {src}, without its root keys.")
    click.echo(f"Factory:      {source.factory}")
    for keyid in keyids:
        click.echo(f"Targets key:  {keyid}")
    click.echo(f"Roots:        {', '.join(roots) or 'none'}")
    if kept:
        click.echo(f"Also kept:    {', '.join(sorted(kept))}")
    for keyid in root_keyids:
        click.echo(f"Left out:     root key {keyid}")
    for key in retired:
        click.echo(f"Left out:     retired targets key {key.keyid} (--include-retired keeps it)")
    for name in left_out:
        click.echo(f"Left out:     {name}")
    click.echo("It can sign production releases but cannot change the root.")


@click.command()
@click.argument("archive", type=_FILE)
@click.option("--out", "out", type=_FILE, required=True, help="The text file to write (new).")
@_INCLUDE_RETIRED
@json_option
def backup(archive: Path, out: Path, include_retired: bool, as_json: bool) -> None:
    """Printable text backup of ARCHIVE's root keys.

    Each line carries its number and a short check, so the keys can be typed back in
    from paper and `tufa keys restore` points at any mistyped line. Only root keys are
    written: they are the ones nothing can replace. Retired root keys (the roots no
    longer list them) are left out unless --include-retired. The file is unencrypted
    (mode 0600) and must not exist yet.

    \b
    Example:
      tufa keys backup acme-keys.tgz --out acme-root-backup.txt
      lp acme-root-backup.txt
    """
    refuse_existing(out)
    source = load_archive(archive, None)
    try:
        text = render_backup(source, include_retired=include_retired)
    except ValueError as e:
        raise click.ClickException(f"{archive}: {e}") from e
    # render_backup has parsed the text back already: reading the same bytes back from
    # the disk is what is left to check.
    root_keys = source.keys_for(ROOT, include_retired=include_retired)
    retired = [] if include_retired else source.retired_keys(ROOT)
    write_new_file(out, text.encode())
    try:
        intact = out.read_bytes() == text.encode()
    except OSError:
        intact = False
    if not intact:
        out.unlink(missing_ok=True)
        raise click.ClickException(f"{out} did not read back intact; check the disk")
    lines = text.splitlines()
    if as_json:
        print_json(
            {
                "backup": str(out),
                "factory": source.factory,
                "root_keys": [halves_json(k) for k in root_keys],
                "retired_left_out": [halves_json(k) for k in retired],
                "lines": len(lines),
            }
        )
        return
    click.echo(
        f"Wrote the text backup of {len(root_keys)} root key(s) of {source.factory!r}, "
        f"both halves of each, to {out} (mode 0600, unencrypted)."
    )
    for key in root_keys:
        click.echo(f"Root key: {key.label()}")
    for key in retired:
        click.echo(f"Left out: retired root key {key.label()} (--include-retired keeps it)")
    click.echo("Next:")
    click.echo(
        f"  1. Print it in a fixed-width font; lines are up to {max(map(len, lines))} "
        "characters: check that none is cut off."
    )
    click.echo("  2. Keep the printouts in safes at different places (two or three).")
    click.echo(f"  3. If your policy says so, delete {out} from this disk (shred -u {out}).")
    click.echo("Redo this after every root key rotation. To type it back in from paper:")
    click.echo(f"  tufa keys restore {out} --out ARCHIVE")


@click.command()
@click.argument("file", type=_FILE)
@click.option("--out", "out", type=_FILE, required=True, help="The archive to write (new).")
@json_option
def restore(file: Path, out: Path, as_json: bool) -> None:
    """Rebuild a root keys archive from a text backup.

    Type the printout back into FILE, line by line. Every mistyped, missing or swapped
    line is reported by its number, and nothing is written until each key rebuilds to
    the key id that was printed. The new archive holds the root keys and the factory
    name; the roots are fetched from the server when needed. OUT must not exist.

    \b
    Example:
      tufa keys restore typed-backup.txt --out acme-keys-restored.tgz
      tufa keys show-root -k acme-keys-restored.tgz
    """
    refuse_existing(out)
    try:
        if file.stat().st_size > MAX_BACKUP_CHARS * 4:
            raise click.ClickException(f"{file} is far too large to be a backup")
        text = file.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except OSError as e:
        raise click.ClickException(f"cannot read {file}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{file} is not a text backup (not UTF-8 text)") from e
    try:
        restored = parse_backup(text)
    except BackupError as e:
        raise click.ClickException(f"{file}: {e}\nNothing was written.") from e
    _write_archive(out, restored, file)
    if as_json:
        print_json(
            {
                "archive": str(out),
                "factory": restored.factory,
                "root_keys": [{**halves_json(k), "name": k.name} for k in restored.keys],
            }
        )
        return
    click.echo(
        f"Restored {len(restored.keys)} root key(s) of {restored.factory!r} to {out} (mode 0600)."
    )
    for key in restored.keys:
        files = ", ".join(f"keys/{stem}.sec" for stem, _ in key.files())
        click.echo(f"Root key: {key.label()} ({files})")
    click.echo(
        "The archive holds no roots and no targets keys. Check that the server's root "
        f"lists these keys: tufa keys show-root -k {out}"
    )


@click.command("sign-file")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@archive_option()
@json_option
def sign_file(file: Path, archive: Path, as_json: bool) -> None:
    """Sign an exported root update FILE with ARCHIVE's keys, without a server.

    \b
    Example:
      tufa keys sign-file update.json -k owner.tgz
    """
    update = RootUpdate.from_file(file)
    payload = update.sign_with(load_archive(archive, update.factory))
    update.add_signatures(payload)
    assert update.factory is not None
    update.save(file, update.factory)
    if as_json:
        print_json(
            {
                "file": str(file),
                "archive": str(archive),
                "factory": update.factory,
                "signatures_added": signature_count(payload),
                **update_json(update),
            }
        )
        return
    click.echo(f"Signed {file} with {archive}.")
    print_status(update)
