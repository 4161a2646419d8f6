"""`tufa devices`: the factory's registered devices, and what they report."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from tufa.cli.client import Api, with_api
from tufa.cli.output import console, json_option, print_json

BASE_FIELDS = ("id", "name", "hardware_id", "tag", "channel", "created_at")


def _plain(value: Any) -> Text:
    """A table cell shown as is: devices write these texts, so brackets in them must
    not be read as rich markup, nor control characters (an install command's colours,
    carriage returns) reach the terminal; they show escaped, as `\\x1b`."""
    text = "-" if value is None else str(value)
    return Text(
        "".join(
            c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode() for c in text
        )
    )


@click.group()
def devices() -> None:
    """List and inspect registered devices."""


@devices.command("list")
@json_option
@with_api
def list_devices(api: Api, as_json: bool) -> None:
    """List devices with their hardware id, tag, channel and installed version."""
    found = api.get_json(api.factory_path("/devices"))
    if as_json:
        print_json(found)
        return
    table = Table()
    for column in ("name", "id", "hardware id", "tag", "channel", "installed", "registered"):
        table.add_column(column)
    for d in found:
        table.add_row(
            d["name"],
            d["id"],
            d["hardware_id"],
            d["tag"],
            d["channel"],
            _plain(d["installed_version"]),
            d["created_at"],
        )
    console().print(table)


@devices.command()
@click.argument("device")
@json_option
@with_api
def show(api: Api, device: str, as_json: bool) -> None:
    """Show DEVICE (a name or an id): what it runs, and the events it reported last."""
    found = api.get_json(api.factory_path(f"/devices/{device}"))
    if as_json:
        print_json(found)
        return
    for key in BASE_FIELDS:
        click.echo(f"{key:>13}: {found[key]}")
    if found["installed_version"] is None:
        installed = "nothing reported"
    else:
        installed = f"version {found['installed_version']} ({found['installed_target']})"
    click.echo(f"{'installed':>13}: {installed}")
    if found["installed_sha256"] is not None:
        click.echo(f"{'sha256':>13}: {found['installed_sha256']}")
    click.echo(f"{'last report':>13}: {found['last_report_at'] or 'never'}")
    events = found["events"]
    if not events:
        click.echo("No events reported.")
        return
    table = Table(title=f"Last {len(events)} event(s), newest first")
    for column in ("at", "kind", "version", "target", "detail", "received", "id"):
        table.add_column(column)
    for e in events:
        table.add_row(
            *(
                _plain(e[key])
                for key in ("at", "kind", "version", "target", "detail", "received_at", "id")
            )
        )
    console().print(table)
