"""`tufa devices`: the factory's registered devices."""

from __future__ import annotations

import click
from rich.table import Table

from tufa.cli.client import Api, with_api
from tufa.cli.output import console, json_option, print_json


@click.group()
def devices() -> None:
    """List and inspect registered devices."""


@devices.command("list")
@json_option
@with_api
def list_devices(api: Api, as_json: bool) -> None:
    """List devices with their hardware id, tag and channel."""
    found = api.get_json(api.factory_path("/devices"))
    if as_json:
        print_json(found)
        return
    table = Table()
    for column in ("name", "id", "hardware id", "tag", "channel", "registered"):
        table.add_column(column)
    for d in found:
        table.add_row(d["name"], d["id"], d["hardware_id"], d["tag"], d["channel"], d["created_at"])
    console().print(table)


@devices.command()
@click.argument("device")
@json_option
@with_api
def show(api: Api, device: str, as_json: bool) -> None:
    """Show DEVICE (a name or an id)."""
    found = api.get_json(api.factory_path(f"/devices/{device}"))
    if as_json:
        print_json(found)
        return
    for key, value in found.items():
        click.echo(f"{key:>13}: {value if value is not None else '-'}")
