"""`tufa keys updates ...`: root updates as signed transactions, step by step.

One update may be open per factory. Edits stage changes to both channels' roots; each
key holder signs (online with -k, or air-gapped through an exported file that
`tufa keys sign-file`, in `offline`, signs); `apply` makes the server check every rule
and switch atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Literal

import click

from tufa.cli.client import Api, with_api
from tufa.cli.keys.archive_options import (
    KEY_TYPE_OPTION,
    archive_option,
    load_archive,
    new_key_json,
    store_served_roots,
)
from tufa.cli.keys.root_update import (
    RootUpdate,
    add_offline_key_to,
    apply_update,
    cancel_update,
    print_status,
    remove_offline_key_from,
    replace_offline_keys,
    signature_count,
    stage_new_online_keys,
    staged_changes,
    update_json,
)
from tufa.cli.output import json_option, print_json
from tufa.core.archive import ArchiveKey, OfflineArchive, generate_root_key
from tufa.core.clock import iso, utc_now
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.keys import KeyPair, KeyType
from tufa.core.metadata import MIN_PROD_TARGETS_THRESHOLD, ONLINE_ROLES, ROOT, TARGETS, Channel
from tufa.core.root_update import StagedRoots

OFFLINE_ROLES = (ROOT, TARGETS)
ARCHIVE_OPTION = archive_option()
ROLE_OPTION = click.option(
    "-r", "--role", required=True, type=click.Choice(OFFLINE_ROLES), help="Offline key role."
)


@click.group(cls=WholeSentenceGroup)
def updates() -> None:
    """Change the factory's roots as a signed transaction.

    \b
    Example, adding a second root key holder and requiring both:
      tufa keys updates init -m "second root key"
      tufa keys updates add-offline-key -r root -k bob.tgz
      tufa keys updates set-threshold -r root 2
      tufa keys updates sign -k alice.tgz
      tufa keys updates sign -k bob.tgz
      tufa keys updates review
      tufa keys updates apply
    """


@updates.command()
@click.option("-m", "--message", required=True, help="What the update is for.")
@json_option
@with_api
def init(api: Api, message: str, as_json: bool) -> None:
    """Open a root update (one per factory).

    \b
    Example:
      tufa keys updates init -m "rotate release manager keys"
    """
    update = RootUpdate.open(api, message)
    if as_json:
        print_json(update.data)
        return
    click.echo(
        f"Opened root update {message!r}: staged roots v{update.staged(Channel.CI).signed.version}."
    )


@updates.command()
@click.option("--prod", is_flag=True, help="Only the production root.")
@click.option("--diff", is_flag=True, help="Show what changes against the current roots.")
@json_option
@with_api
def review(api: Api, prod: bool, diff: bool, as_json: bool) -> None:
    """Show the staged roots: changes, and who has signed or still must.

    Signatures are counted here, with python-tuf's verification rules, not taken from
    the server's word.
    """
    update = RootUpdate.fetch(api)
    channels = [Channel.PROD] if prod else list(Channel)
    if as_json:
        print_json(update_json(update, channels))
        return
    click.echo(f"Root update {update.data['message']!r} opened {update.data['created_at']}")
    if diff:
        for channel in channels:
            click.echo(f"{channel} root changes:")
            for line in staged_changes(update, channel):
                click.echo(f"  {line}")
    print_status(update, prod_only=prod)


def _edit(
    api: Api,
    change: Callable[[StagedRoots], None],
    as_json: bool,
    *,
    resign: bool = False,
    what: str,
    **more: object,
) -> None:
    """Stage `change`; with --json print the update as `review --json` shows it, with
    `staged` (the change in words) and `more` (what the command made) added."""
    update = RootUpdate.fetch(api).edit(api, change, resign_prod_targets=resign)
    if as_json:
        print_json({"staged": what, **more, **update_json(update)})
        return
    click.echo(f"Staged: {what}.")
    print_status(update)


def _generate_into(
    archive: OfflineArchive, archive_path: Path, role: str, key_type: str, as_json: bool
) -> ArchiveKey:
    """A new key (for a root key, a pair: one half per channel), saved into the archive
    before anything uses it."""
    if role == ROOT:
        key = archive.add(generate_root_key(KeyType(key_type)))
    else:
        key = archive.add_key(role, KeyPair.generate(KeyType(key_type)))
    archive.save(archive_path)
    click.echo(f"New {role} key {key.label()} saved in {archive_path}.", err=as_json)
    return key


@updates.command("add-offline-key")
@ROLE_OPTION
@archive_option(exists=False, help="Archive to hold the new key (created if it does not exist).")
@KEY_TYPE_OPTION
@json_option
@with_api
def add_offline_key(api: Api, role: str, archive: Path, key_type: str, as_json: bool) -> None:
    """Generate a new offline key into ARCHIVE and add it to the staged roots.

    ARCHIVE is created if it does not exist: a new key holder's own archive. A root key
    is a pair of keys, one for each channel's root; both go into ARCHIVE.

    \b
    Example (a release manager's own targets key):
      tufa keys updates add-offline-key -r targets -k carol-targets.tgz
    """
    RootUpdate.fetch(api)  # fail before generating a key if no update is open
    if archive.exists():
        held = load_archive(archive, api.factory)
    else:
        held = OfflineArchive(factory=api.factory)
        click.echo(f"Creating {archive}, a new archive for factory {api.factory!r}.", err=as_json)
    key = _generate_into(held, archive, role, key_type, as_json)
    _edit(
        api,
        lambda staged: add_offline_key_to(staged, key),
        as_json,
        resign=role == TARGETS,
        what=f"add {role} key {key.keyid}",
        new_key=new_key_json(key, archive),
    )


@updates.command("delete-offline-key")
@ROLE_OPTION
@click.option("--key-id", required=True, help="Key id to remove (for a root key, either half).")
@json_option
@with_api
def delete_offline_key(api: Api, role: str, key_id: str, as_json: bool) -> None:
    """Remove an offline key from the staged roots (a root key: both of its halves).

    \b
    Example:
      tufa keys updates delete-offline-key -r targets --key-id 5d9aec2c...
    """
    update = RootUpdate.fetch(api)
    if key_id in {k for keys in update.online_keyids_after().values() for k in keys.values()}:
        raise click.ClickException(f"{key_id} is an online key; use rotate-online-key")
    listed = {k for c in Channel for k in update.staged(c).signed.roles[role].keyids}
    if key_id not in listed:
        raise click.ClickException(f"{key_id} is not a {role} key of the staged roots")
    _edit(
        api,
        lambda staged: remove_offline_key_from(staged, role, key_id),
        as_json,
        resign=role == TARGETS,
        what=f"remove {role} key {key_id}",
    )


@updates.command("rotate-offline-key")
@ROLE_OPTION
@ARCHIVE_OPTION
@click.option("--key-id", help="Key to replace, when the archive holds several of the role.")
@KEY_TYPE_OPTION
@json_option
@with_api
def rotate_offline_key(
    api: Api, role: str, archive: Path, key_id: str | None, key_type: str, as_json: bool
) -> None:
    """Replace ARCHIVE's offline key of a role with a new one, in archive and roots.

    \b
    Example:
      tufa keys updates rotate-offline-key -r root -k owner.tgz
    """
    update = RootUpdate.fetch(api)
    trusted = {k for c in Channel for k in update.staged(c).signed.roles[role].keyids}
    held = load_archive(archive, api.factory)
    candidates = [
        k.keyid
        for k in held.keys_for(role)
        if set(k.keyids) & trusted and (key_id is None or key_id in k.keyids)
    ]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise click.ClickException(
            f"{archive} must hold exactly one {role} key of the staged roots to rotate "
            f"(found: {found}); name it with --key-id"
        )
    key = _generate_into(held, archive, role, key_type, as_json)
    _edit(
        api,
        lambda staged: replace_offline_keys(staged, role, candidates, key),
        as_json,
        resign=role == TARGETS,
        what=f"replace {role} key {candidates[0]} with {key.keyid}",
        replaced_keyid=candidates[0],
        new_key=new_key_json(key, archive),
    )


@updates.command("set-threshold")
@click.option("-r", "--role", required=True, type=click.Choice(OFFLINE_ROLES))
@click.argument("threshold", type=click.IntRange(min=1))
@json_option
@with_api
def set_threshold(api: Api, role: str, threshold: int, as_json: bool) -> None:
    """Set how many signatures a role needs (targets: the production threshold).

    The CI targets threshold stays 1; the production one counts the online key, so it
    is at least 2.

    \b
    Examples:
      tufa keys updates set-threshold -r root 2
      tufa keys updates set-threshold -r targets 3
    """
    if role == TARGETS and threshold < MIN_PROD_TARGETS_THRESHOLD:
        raise click.ClickException(
            f"the production targets threshold must be at least {MIN_PROD_TARGETS_THRESHOLD}"
        )
    _edit(
        api,
        lambda staged: staged.set_threshold(role, threshold),
        as_json,
        resign=role == TARGETS,
        what=f"{role} threshold {threshold}",
    )


@updates.command("rotate-online-key")
@click.option(
    "-r",
    "--role",
    "roles",
    required=True,
    help="Comma-separated online roles: targets,snapshot,timestamp.",
)
@click.option(
    "--channel",
    type=click.Choice(["ci", "prod", "both"]),
    default="both",
    show_default=True,
    help="Whose online keys to replace; each channel gets keys of its own.",
)
@json_option
@with_api
def rotate_online_key(
    api: Api, roles: str, channel: Literal["ci", "prod", "both"], as_json: bool
) -> None:
    """Have the server generate new online keys and stage them.

    Rotating the production online targets key re-signs production targets, which then
    need an offline targets signature too.

    \b
    Example:
      tufa keys updates rotate-online-key -r targets,snapshot,timestamp
      tufa keys updates rotate-online-key -r timestamp --channel ci
    """
    chosen = [r.strip() for r in roles.split(",") if r.strip()]
    if not chosen or set(chosen) - set(ONLINE_ROLES):
        raise click.UsageError(f"roles must be among {','.join(ONLINE_ROLES)}")
    channels = list(Channel) if channel == "both" else [Channel(channel)]
    stage_new_online_keys(api, chosen, channels)
    update = RootUpdate.fetch(api)
    if TARGETS in chosen and Channel.PROD in channels:
        update = update.edit(api, lambda _staged: None, resign_prod_targets=True)
    pending = update.data["pending_online_keys"]
    if as_json:
        print_json(
            {"staged": "new online keys", "pending_online_keys": pending, **update_json(update)}
        )
        return
    click.echo(f"Staged new online keys: {pending}")
    print_status(update)


@updates.command("extend-expiry")
@click.option("--days", required=True, type=click.IntRange(1, 3650), help="Days from now.")
@json_option
@with_api
def extend_expiry(api: Api, days: int, as_json: bool) -> None:
    """Set both staged roots to expire DAYS from now.

    \b
    Example:
      tufa keys updates extend-expiry --days 365
    """
    expires = utc_now() + timedelta(days=days)
    _edit(
        api,
        lambda staged: staged.set_expiry(expires),
        as_json,
        what=f"expiry {iso(expires)}",
        expires=iso(expires),
    )


@updates.command()
@ARCHIVE_OPTION
@json_option
@with_api
def sign(api: Api, archive: Path, as_json: bool) -> None:
    """Sign the staged roots (and re-signed production targets) with ARCHIVE's keys.

    \b
    Example:
      tufa keys updates sign -k alice.tgz
    """
    update = RootUpdate.fetch(api)
    payload = update.sign_with(load_archive(archive, api.factory))
    count = signature_count(payload)
    if not count:
        raise click.ClickException(f"{archive} holds no key that may sign this update")
    after = RootUpdate.upload_signatures(api, payload)
    if as_json:
        print_json({"archive": str(archive), "signatures_added": count, **update_json(after)})
        return
    click.echo(f"Added {count} signature(s) from {archive}.")
    print_status(after)


@updates.command()
@archive_option(required=False, help="Archive whose copies of the roots to refresh afterwards.")
@json_option
@with_api
def apply(api: Api, archive: Path | None, as_json: bool) -> None:
    """Apply the update: the server checks every rule and switches atomically.

    \b
    Example:
      tufa keys updates apply -k owner.tgz
    """
    result = apply_update(api)
    if archive is not None:
        held = load_archive(archive, api.factory)
        store_served_roots(api, held)
        held.save(archive)
    if as_json:
        print_json(result)
        return
    click.echo(f"Applied: both channels now serve root version {result['root_version']}.")


@updates.command()
@json_option
@with_api
def cancel(api: Api, as_json: bool) -> None:
    """Drop the open update (pending online keys are discarded)."""
    result = cancel_update(api)
    if as_json:
        print_json(result)
        return
    click.echo("Cancelled the open root update.")


@updates.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@with_api
def export_update(api: Api, file: Path, as_json: bool) -> None:
    """Write what must be signed to FILE, for an air-gapped machine.

    \b
    Example:
      tufa keys updates export update.json
      (on the offline machine)  tufa keys sign-file update.json -k owner.tgz
      tufa keys updates import update.json
    """
    update = RootUpdate.fetch(api)
    update.save(file, api.factory)
    if as_json:
        print_json({"file": str(file), "factory": api.factory, **update_json(update)})
        return
    click.echo(f"Wrote {file}; sign it with `tufa keys sign-file {file} -k ARCHIVE`.")


@updates.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@with_api
def import_update(api: Api, file: Path, as_json: bool) -> None:
    """Upload the signatures that `tufa keys sign-file` added to FILE."""
    signed = RootUpdate.from_file(file)
    if signed.factory != api.factory:
        raise click.ClickException(f"{file} belongs to factory {signed.factory!r}")
    payload = signed.all_signatures()
    after = RootUpdate.upload_signatures(api, payload)
    if as_json:
        print_json(
            {
                "file": str(file),
                "signatures_in_file": signature_count(payload),
                **update_json(after),
            }
        )
        return
    click.echo(f"Imported the signatures in {file}.")
    print_status(after)
