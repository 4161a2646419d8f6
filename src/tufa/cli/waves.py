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
from tufa.cli.wave_plans import echo_status, percentage, staged_rollout, status_row
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
@click.option(
    "--plan",
    help="Stages the server serves by itself, e.g. 5%,25%,100% or beta-testers,50%,100%.",
)
@click.option("--soak", type=DURATION, help="With --plan: time each stage runs  [default: 30m]")
@click.option(
    "--max-failure-rate",
    type=percentage,
    help="With --plan: halt above this share of failures  [default: 5%]",
)
@click.option(
    "--min-reports",
    type=click.IntRange(min=1),
    help="With --plan: reports needed before the rate halts or advances  [default: 20]",
)
@click.option(
    "--silence",
    type=DURATION,
    help="With --plan: a device unheard of this long counts as failed  [default: 2h]",
)
@click.option("--dry-run", is_flag=True, help="Show the devices it would take, change nothing.")
@json_option
@with_api
def rollout(
    api: Api,
    name: str,
    group: str | None,
    uuids: str | None,
    limit: str | None,
    plan: str | None,
    dry_run: bool,
    as_json: bool,
    **rules: Any,
) -> None:
    """Serve wave NAME to more production devices of its tag: now, or stage by stage.

    With --plan the server serves the first stage at once, then each next one after
    --soak, while the health gate holds: of the devices served so far, failures
    (failed installs, roll-backs, downloads failed three times, and devices silent
    for --silence) over reports stay at most --max-failure-rate, counted once there
    are --min-reports reports. On a breach the wave halts by itself; `tufa waves
    status` says why, `resume` goes on and `cancel` stops. Stages count the devices
    served in all: counts, shares of the tag's devices, or a device group first; the
    last is 100%, after which the server completes the wave.

    \b
    Examples:
      tufa waves rollout release-43 beta-testers
      tufa waves rollout release-43 --uuids @canaries.txt
      tufa waves rollout release-43 --limit 25% --dry-run
      tufa waves rollout release-43 --plan 5%,25%,100% --soak 30m --max-failure-rate 5%
      tufa waves rollout release-43 --plan beta-testers,50%,100% --min-reports 5 --dry-run
    """
    if plan is not None:
        if group or uuids or limit:
            raise click.UsageError(
                "--plan chooses its devices: leave out GROUP, --uuids and --limit "
                "(a group may be the plan's first stage)"
            )
        staged_rollout(api, name, plan, rules, dry_run, as_json)
        _warn_of_server_generated_keys(api)
        return
    given = sorted(k for k, v in rules.items() if v is not None)
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"{flags} go with --plan only")
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


@_on_named_wave
def resume(api: Api, name: str, as_json: bool) -> None:
    """Go on with the halted staged rollout of wave NAME, after a look at why it halted.

    Its current stage soaks again, and the health gate counts the failures reported
    from now on.

    \b
    Examples:
      tufa waves status release-43
      tufa waves resume release-43
    """
    result = api.request("POST", api.path(api_paths.WAVE_RESUME, name=name)).json()
    if as_json:
        print_json(_without_metadata(result))
        return
    plan = result["rollout"]
    click.echo(
        f"Wave {name} goes on: {plan['state']} at stage {plan['stage']} of "
        f"{len(plan['stages'])}, next stage at {plan['next_stage_at']} if the health gate "
        "holds; it counts the failures reported from now on."
    )


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
    run another version). For a staged rollout also its state (soaking, advancing,
    halted, completed or cancelled), its stage, the health gate, per stage the
    devices served, installed, failed and silent, and why it halted. `--json` prints
    a list: of one wave with NAME.

    \b
    Examples:
      tufa waves status release-43
      tufa waves status --json
    """
    found = (
        [api.get_json(api.path(api_paths.WAVE, name=name))]
        if name
        else [w for w in api.get_json(api.path(api_paths.WAVES)) if w["status"] == "active"]
    )
    rows = [status_row(w) for w in found]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No active wave.")
    for row in rows:
        echo_status(row)
