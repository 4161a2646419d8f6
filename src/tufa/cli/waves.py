"""`tufa waves`: release on demand to production devices."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from tuf.api.metadata import Metadata, Targets

from tufa.cli.client import Api, with_api
from tufa.cli.keys.archive_options import archive_option, load_archive
from tufa.cli.output import json_option, print_json, print_record, print_records, warn
from tufa.core import api_paths
from tufa.core.archive import OfflineArchive
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.durations import DURATION
from tufa.core.metadata import TARGETS, Channel
from tufa.core.root_update import server_generated_keys_warning

# As long as the server lets a wave's production targets be valid.
MAX_EXPIRY = timedelta(days=3650)
ARCHIVE_OPTION = archive_option(
    help="Archive with an offline targets key (a targets-only copy is enough)."
)


@click.group(cls=WholeSentenceGroup)
def waves() -> None:
    """Release a CI build to production devices, signed with your offline key."""


def _on_named_wave(command: Callable[..., None]) -> click.Command:
    """A `tufa waves` command on wave NAME, with --json and the server options."""
    return waves.command()(click.argument("name")(json_option(with_api(command))))


def _warn_of_server_generated_keys(api: Api) -> None:
    """Said at each step of a release until the owner rotated the keys the server
    generated (and held until the archive was downloaded); `tufa factory show` says so
    too."""
    roles = api.get_json(api.path(api_paths.FACTORY)).get("server_generated_keys") or []
    if roles:
        warn(server_generated_keys_warning(roles))


def _sign_with(api: Api, archive: OfflineArchive, md: Metadata[Targets]) -> list[str]:
    """Sign `md` with the archive's offline targets keys that production trusts."""
    prod_root = api.get_json(api.root_path(Channel.PROD))["signed"]
    online = {k["keyid"] for k in api.get_json(api.path(api_paths.FACTORY))["online_keys"]}
    trusted = set(prod_root["roles"][TARGETS]["keyids"]) - online
    used = []
    for pair in archive.signers_for(Channel.PROD, TARGETS, trusted - set(md.signatures)):
        md.sign(pair.signer(), append=True)
        used.append(pair.keyid)
    if not used and not trusted & set(md.signatures):
        raise click.ClickException(
            "the archive holds no offline targets key of the production root; use the "
            "archive `tufa keys rotate-targets` wrote (or a copy-targets copy of it)"
        )
    return used


@waves.command()
@click.argument("name")
@click.argument("version")
@click.argument("tag")
@ARCHIVE_OPTION
@click.option(
    "--expires",
    type=DURATION,
    default="365d",
    show_default=True,
    help="Validity of the production targets: whole days or weeks (30d, 52w), up to 3650d.",
)
@click.option("--prune", default="", help="Comma-separated versions to drop from the tag.")
@json_option
@with_api
def init(
    api: Api,
    name: str,
    version: str,
    tag: str,
    archive: Path,
    expires: timedelta,
    prune: str,
    as_json: bool,
) -> None:
    """Create wave NAME: the production targets of TAG plus CI build VERSION.

    The targets are signed here, with the archive's offline targets key (the private key
    never leaves this machine); the server adds its online signature. VERSION must be
    higher than every version released or attempted for TAG. Nothing reaches a device
    until `tufa waves rollout`.

    \b
    Example:
      tufa waves init release-43 43 main -k release-keys.tgz
      tufa waves rollout release-43 --limit 10%
      tufa waves complete release-43
    """
    if expires % timedelta(days=1) or not timedelta(days=1) <= expires <= MAX_EXPIRY:
        raise click.BadParameter(
            f"production targets expire after whole days, 1d to {MAX_EXPIRY.days}d "
            "(e.g. 30d or 52w)",
            param_hint="'--expires'",
        )
    expires_days = expires.days
    keys = load_archive(archive, api.factory)
    pruned = [v.strip() for v in prune.split(",") if v.strip()]
    body = {"tag": tag, "version": version, "prune": pruned, "expires_days": expires_days}
    signed = api.request("POST", api.path(api_paths.PREPARE_WAVE), json_body=body).json()
    md = Metadata[Targets].from_dict({"signed": signed["signed"], "signatures": []})
    _sign_with(api, keys, md)
    created = api.request(
        "POST",
        api.path(api_paths.WAVES),
        json_body={**body, "name": name, "targets": md.to_dict()},
    ).json()
    _warn_of_server_generated_keys(api)
    if as_json:
        print_json(created)
        return
    count = len(created["targets"])
    click.echo(
        f"Wave {name}: tag {tag}, version {version}, production targets version "
        f"{created['targets_version']} ({count} target{'' if count == 1 else 's'})."
    )
    if not created["signed"]:
        click.echo("More offline signatures are needed: `tufa waves sign NAME -k OTHER.tgz`.")


@waves.command()
@click.argument("name")
@ARCHIVE_OPTION
@json_option
@with_api
def sign(api: Api, name: str, archive: Path, as_json: bool) -> None:
    """Add an offline signature to wave NAME (when production needs more than one).

    `--json` prints the wave as the server answered (without its metadata, as `waves
    complete` does), and `signed_with`: the key ids this run added.

    \b
    Example:
      tufa waves sign release-43 -k carol-targets.tgz
    """
    wave = api.get_json(api.path(api_paths.WAVE, name=name))
    md = Metadata[Targets].from_dict(wave["metadata"])
    used = _sign_with(api, load_archive(archive, api.factory), md)
    signatures = [md.signatures[keyid].to_dict() for keyid in used]
    after = api.request(
        "POST", api.path(api_paths.WAVE_SIGNATURES, name=name), json_body={"signatures": signatures}
    ).json()
    if as_json:
        print_json({**_without_metadata(after), "signed_with": used})
        return
    click.echo(f"Signed wave {name} with {', '.join(used) or 'no new key'}.")
    click.echo("Ready to roll out." if after["signed"] else "Still needs more signatures.")


@waves.command()
@click.argument("name")
@click.argument("group", required=False)
@click.option("--uuids", help="Device ids or names, comma-separated, or @FILE (one a line).")
@click.option("--limit", help="At most this many devices (10) or this share (25%).")
@click.option("--dry-run", is_flag=True, help="Show the devices it would take, change nothing.")
@json_option
@with_api
def rollout(
    api: Api,
    name: str,
    group: str | None,
    uuids: str | None,
    limit: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Serve wave NAME to more production devices of its tag.

    \b
    Examples:
      tufa waves rollout release-43 beta-testers
      tufa waves rollout release-43 --uuids @canaries.txt
      tufa waves rollout release-43 --limit 25% --dry-run
    """
    body: dict[str, Any] = {"dry_run": dry_run}
    if group:
        body["group"] = group
    if limit:
        body["limit"] = limit
    if uuids:
        if uuids.startswith("@"):
            try:
                lines = Path(uuids[1:]).read_text().splitlines()
            except OSError as e:
                raise click.UsageError(f"cannot read {uuids[1:]}: {e.strerror}") from e
            body["devices"] = [line.strip() for line in lines if line.strip()]
        else:
            body["devices"] = [u.strip() for u in uuids.split(",") if u.strip()]
    result = api.request("POST", api.path(api_paths.WAVE_ROLLOUT, name=name), json_body=body).json()
    _warn_of_server_generated_keys(api)
    if as_json:
        print_json(result)
        return
    verb = "Would roll out" if dry_run else "Rolled out"
    click.echo(f"{verb} wave {name} to {len(result['devices'])} device(s).")
    for device in result["devices"]:
        click.echo(f"  {device['name']}  {device['id']}")


def _without_metadata(wave: dict[str, Any]) -> dict[str, Any]:
    """A wave as the server sent it, but its signed targets (`tufa waves show --json`)."""
    return {k: v for k, v in wave.items() if k != "metadata"}


def _finish(api: Api, name: str, action_path: str, as_json: bool) -> None:
    result = api.request("POST", api.path(action_path, name=name)).json()
    if as_json:
        print_json(_without_metadata(result))
        return
    click.echo(f"Wave {name} is now {result['status']}.")


@_on_named_wave
def complete(api: Api, name: str, as_json: bool) -> None:
    """Make wave NAME the production targets of every device of its tag."""
    _finish(api, name, api_paths.WAVE_COMPLETE, as_json)
    _warn_of_server_generated_keys(api)


@_on_named_wave
def cancel(api: Api, name: str, as_json: bool) -> None:
    """Stop wave NAME; devices that got it keep it until a newer release of their tag."""
    _finish(api, name, api_paths.WAVE_CANCEL, as_json)


@waves.command("list")
@json_option
@with_api
def list_waves(api: Api, as_json: bool) -> None:
    """List waves, oldest first: the version of their production targets metadata, and
    the devices served of those of their tag. `--json` also lists the target names
    (`targets`), as `tufa waves show` does.
    """
    print_records(
        api.get_json(api.path(api_paths.WAVES)),
        as_json,
        ("name", "tag", "version", "status", "targets version", "devices served"),
        _wave_row,
    )


def _wave_row(w: dict[str, Any]) -> tuple[str, ...]:
    return (
        w["name"],
        w["tag"],
        w["version"],
        w["status"],
        str(w["targets_version"]),
        f"{w['devices_served']}/{w['devices_of_tag']}",
    )


@_on_named_wave
def show(api: Api, name: str, as_json: bool) -> None:
    """Show wave NAME: its targets, signatures and devices."""
    wave = api.get_json(api.path(api_paths.WAVE, name=name))
    print_record(
        wave,
        as_json,
        keys=("name", "tag", "version", "status", "targets_version", "expires", "created_at"),
        more=[
            ("signed", "yes" if wave["signed"] else "needs more signatures"),
            ("signed by", ", ".join(wave["signed_by"])),
            ("targets", ", ".join(wave["targets"])),
            ("devices", f"{wave['devices_served']} of {wave['devices_of_tag']} of the tag"),
        ],
    )


@waves.command()
@click.argument("name", required=False)
@json_option
@with_api
def status(api: Api, name: str | None, as_json: bool) -> None:
    """How far wave NAME (or every active wave) has gone.

    Counts the devices served the wave, and of those the ones that report its version
    installed, and the ones that report it failed to install or rolled it back (and
    run another version).
    """
    found = (
        [api.get_json(api.path(api_paths.WAVE, name=name))]
        if name
        else [w for w in api.get_json(api.path(api_paths.WAVES)) if w["status"] == "active"]
    )
    rows = [
        {
            "name": w["name"],
            "status": w["status"],
            "devices_served": w["devices_served"],
            "devices_of_tag": w["devices_of_tag"],
            "devices_installed": w["devices_installed"],
            "devices_failed": w["devices_failed"],
        }
        for w in found
    ]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No active wave.")
    for row in rows:
        click.echo(
            f"{row['name']} ({row['status']}): served to {row['devices_served']} of "
            f"{row['devices_of_tag']} device(s) of its tag; installed on "
            f"{row['devices_installed']}, failed on {row['devices_failed']}"
        )
