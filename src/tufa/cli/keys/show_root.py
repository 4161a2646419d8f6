"""`tufa keys show-root`: a channel's root as served, and which keys the owner holds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tufa.cli.client import Api, with_api
from tufa.cli.keys.archive_options import archive_option, load_archive
from tufa.cli.output import console, json_option, warn
from tufa.core import api_paths
from tufa.core.clock import iso
from tufa.core.metadata import OFFLINE_EXPIRY_WARNING, Channel
from tufa.core.root_update import shared_keys_warning


@click.command("show-root")
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
    channel = Channel.PROD if prod else Channel.CI
    served = api.request("GET", api.root_path(channel))
    root = served.json()
    factory = api.get_json(api.path(api_paths.FACTORY))
    expires = datetime.fromisoformat(root["signed"]["expires"].replace("Z", "+00:00"))
    for warning in filter(None, [_expiry_warning(channel, expires), _shared_keys_warning(factory)]):
        warn(warning)
    if as_json:
        click.echo(served.text)
        return
    online = {k["keyid"] for k in factory["online_keys"]}
    held = None if archive is None else set(load_archive(archive, None).keyids())
    _print_root(channel, root["signed"], online, held)
    _print_root_key_pairs(factory["root_key_pairs"], held)


def _expiry_warning(channel: Channel, expires: datetime) -> str | None:
    left = expires - datetime.now(UTC)
    if left > OFFLINE_EXPIRY_WARNING:
        return None
    state = "has EXPIRED" if left.total_seconds() <= 0 else f"expires in {left.days} day(s)"
    return (
        f"the {channel} root {state} ({iso(expires)}); devices will stop updating. "
        "Extend it with `tufa keys updates`."
    )


def _shared_keys_warning(factory: dict[str, Any]) -> str | None:
    shared = factory["channels_share_keys"]
    return shared_keys_warning(len(shared)) if shared else None


def _print_root(
    channel: Channel, signed: dict[str, Any], online: set[str], held: set[str] | None
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
