"""`tufa keys rotate-root` and `rotate-targets`: one-command key rotations.

Each is a root update (see `updates`) run start to finish. The order of steps is what
makes a crash harmless: the new private key is written into the archive before the
server ever hears of it, so the archive always holds every key the served root trusts;
an update left open by an interrupted run is cancelled by the next run.

The archive is loaded once and saved twice, and both saves are steps of that order:
the new key before the update is staged, the new roots after it is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tufa.cli.client import Api, with_api
from tufa.cli.keys.archive_options import (
    KEY_TYPE_OPTION,
    load_archive,
    new_key_json,
    store_served_roots,
)
from tufa.cli.keys.root_update import (
    RootUpdate,
    apply_update,
    cancel_update,
    print_status,
    replace_offline_keys,
)
from tufa.cli.output import json_option, print_json, warn
from tufa.core import api_paths
from tufa.core.archive import ArchiveKey, OfflineArchive, generate_root_key
from tufa.core.crashpoints import crashpoint
from tufa.core.keys import KeyPair, KeyType
from tufa.core.metadata import ROOT, TARGETS, Channel
from tufa.core.root_update import SEPARATE_CHANNELS_FIX

ARCHIVE_ARGUMENT = click.argument(
    "archive", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)


def _start(api: Api, message: str) -> None:
    """Open the update, first dropping one that an interrupted run of this command left."""
    left = RootUpdate.fetch_open(api)
    if left is not None:
        if left.data["message"] != message:
            raise click.ClickException(
                f"another root update is open ({left.data['message']!r}); apply it "
                "(`tufa keys updates apply`) or cancel it (`tufa keys updates cancel`) first"
            )
        click.echo("Cancelling the update an interrupted run left open.", err=True)
        cancel_update(api)
    RootUpdate.open(api, message)


def _finish(
    api: Api, archive_path: Path, held: OfflineArchive, update: RootUpdate, step: str
) -> int:
    """Sign with the archive, apply if that is enough, save the new roots into it; the
    root version both channels serve now."""
    signed = RootUpdate.upload_signatures(api, update.sign_with(held))
    crashpoint(f"{step}:signed")
    if not signed.ready():
        print_status(signed, stderr=True)
        raise click.ClickException(
            "the update is staged and signed with this archive, but needs more signatures: "
            "other key holders run `tufa keys updates sign -k THEIR.tgz`, then "
            "`tufa keys updates apply`"
        )
    root_version: int = apply_update(api)["root_version"]
    crashpoint(f"{step}:applied")
    store_served_roots(api, held)
    held.save(archive_path)
    return root_version


def _print_rotated(root_version: int, old: list[str], new: ArchiveKey, archive: Path) -> None:
    """What `rotate-root` and `rotate-targets` print with --json."""
    print_json(
        {"root_version": root_version, "old_keyids": old, "new_key": new_key_json(new, archive)}
    )


def _current_root(api: Api, archive: Path, held: OfflineArchive) -> dict[str, Any]:
    """The served CI root, if `held` holds one of its root keys (both commands need one)."""
    current: dict[str, Any] = api.get_json(api.root_path(Channel.CI))
    trusted = current["signed"]["roles"][ROOT]["keyids"]
    if not any(k.ci.keyid in trusted for k in held.keys_for(ROOT)):
        raise click.ClickException(
            f"changing the root or the targets keys needs a root key of factory {api.factory}'s "
            f"current root (version {current['signed']['version']}), and "
            + _why_no_current_root_key(api, archive, held, current["signed"]["version"])
        )
    return dict(current["signed"])


def _why_no_current_root_key(
    api: Api, archive: Path, held: OfflineArchive, current_version: int
) -> str:
    """Which archive `archive` is, told by the newest of the factory's earlier CI roots
    that lists one of its root keys (none: the keys were never this factory's)."""
    if not held.keys_for(ROOT):
        return (
            f"{archive} holds no root key: it is a targets-only copy (made with `tufa keys "
            "copy-targets`); use the archive with the root keys, or rebuild it from the paper "
            "backup with `tufa keys restore`"
        )
    held_ids = {k.ci.keyid for k in held.keys_for(ROOT)}
    for version in range(current_version - 1, 0, -1):
        name = f"{version}.root.json"
        root = api.get_json(api.path(api_paths.METADATA_FILE, channel=Channel.CI, filename=name))
        if held_ids & set(root["signed"]["roles"][ROOT]["keyids"]):
            return (
                f"{archive} is an older copy: its root keys are those of root version "
                f"{version}, rotated out since; use the archive the newest rotation wrote its "
                "new key into, or a backup made after that rotation"
            )
    return (
        f"{archive} holds root keys that no root of factory {api.factory} on {api.server} "
        "ever listed: it is the archive of another factory of that name (on another "
        "server, a test one for example); use the archive that `tufa keys download` gave "
        "for this factory"
    )


def _rotate(
    api: Api,
    archive: Path,
    held: OfflineArchive,
    new: ArchiveKey,
    replaced: list[str],
) -> int:
    """Put the new key in place of `replaced`, the key saved into the archive first; the
    new root version."""
    step = f"rotate-{new.role}"
    _start(api, step)
    crashpoint(f"{step}:opened")
    held.add(new)
    held.save(archive)
    crashpoint(f"{step}:key-saved")
    update = RootUpdate.fetch(api).edit(
        api,
        lambda staged: replace_offline_keys(staged, new.role, replaced, new),
        resign_prod_targets=new.role == TARGETS,
    )
    crashpoint(f"{step}:staged")
    return _finish(api, archive, held, update, step)


@click.command("rotate-root")
@ARCHIVE_ARGUMENT
@KEY_TYPE_OPTION
@json_option
@with_api
def rotate_root(api: Api, archive: Path, key_type: str, as_json: bool) -> None:
    """Replace ARCHIVE's root key with a new one (both channels, root version + 1).

    The new key is generated here and saved into ARCHIVE first: a pair of keys, one for
    each channel's root, so that the two channels share no root key. The new roots are
    signed by the old and the new key. Run it right after `tufa keys download`, so
    that from then on only you can change your factory's root. For a factory created
    before tufa separated its channels, this is the update that separates them.

    \b
    Example:
      tufa keys rotate-root acme-keys.tgz
      tufa keys show-root --json | jq '.signed.roles.root.keyids'
    """
    held = load_archive(archive, api.factory)
    trusted = _current_root(api, archive, held)["roles"][ROOT]["keyids"]
    old = [k.keyid for k in held.keys_for(ROOT) if k.ci.keyid in trusted]
    new = generate_root_key(KeyType(key_type))
    root_version = _rotate(api, archive, held, new, old)
    if as_json:
        _print_rotated(root_version, old, new, archive)
        warn(f"back {archive} up now: it is the only copy of the new root key")
        return
    click.echo(f"Rotated the root key: {', '.join(old)} -> {new.label()}")
    click.echo(
        f"The new root private key is keys/{new.name}.ci.sec with keys/{new.name}.prod.sec "
        f"in {archive}."
    )
    click.echo("Back the archive up now: it is the only copy of that key.")


@click.command("rotate-targets")
@ARCHIVE_ARGUMENT
@KEY_TYPE_OPTION
@json_option
@with_api
def rotate_targets(api: Api, archive: Path, key_type: str, as_json: bool) -> None:
    """Replace the offline targets key (production releases) with a new one.

    The new key goes into ARCHIVE first; the CI root lists it with the online key
    (threshold 1), the production root too (threshold 2), and the current production
    targets are re-signed in the same atomic change, so devices see no gap. ARCHIVE
    must hold a root key. If it holds none of the current offline targets keys, all of
    them are replaced (the way back from a lost targets key). Refused while a wave is
    active.

    \b
    Example:
      tufa keys rotate-targets acme-keys.tgz
      tufa keys copy-targets acme-keys.tgz release-keys.tgz
    """
    held = load_archive(archive, api.factory)
    current = _current_root(api, archive, held)
    factory = api.get_json(api.path(api_paths.FACTORY))
    if factory["channels_share_keys"]:
        raise click.ClickException(
            "this factory was created before tufa separated its channels, and its next "
            f"root update must separate them: {SEPARATE_CHANNELS_FIX}; then rotate the "
            "targets key"
        )
    active = [w["name"] for w in api.get_json(api.path(api_paths.WAVES)) if w["status"] == "active"]
    if active:
        raise click.ClickException(
            f"wave {active[0]!r} is active: complete or cancel it before rotating the targets "
            "key (its offline signatures would no longer count)"
        )
    online = {k["keyid"] for k in factory["online_keys"]}
    offline = [k for k in current["roles"][TARGETS]["keyids"] if k not in online]
    mine = [k.keyid for k in held.keys_for(TARGETS) if k.keyid in offline]
    replaced = mine or offline
    pair = KeyPair.generate(KeyType(key_type))
    new = ArchiveKey.shared(TARGETS, f"{TARGETS}-{pair.keyid}", pair)
    root_version = _rotate(api, archive, held, new, replaced)
    if as_json:
        _print_rotated(root_version, replaced, new, archive)
        return
    click.echo(f"Rotated the offline targets key: {', '.join(replaced)} -> {new.keyid}")
    click.echo("Production targets were re-signed with it in the same change.")
