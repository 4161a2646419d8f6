"""`tufa factory`: create (operator), show, list, set."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from tufa.cli.client import Api, save_config, with_api
from tufa.cli.output import console, json_option, print_json, print_records, warn
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup


@click.group(cls=WholeSentenceGroup)
def factory() -> None:
    """Create and inspect factories (one per product)."""


@factory.command()
@click.argument("name")
@click.option("--login", is_flag=True, help="Save server, factory and admin token as the defaults.")
@json_option
@with_api
def create(api: Api, name: str, login: bool, as_json: bool) -> None:
    """Create factory NAME (needs the server's operator token).

    Prints the factory admin token, once. Download the offline keys archive next.

    \b
    Example:
      tufa factory create acme --server http://127.0.0.1:8080 --token $OPERATOR_TOKEN --login
      tufa keys download acme-keys.tgz
    """
    created = api.request("POST", api_paths.FACTORIES, json_body={"name": name}).json()
    if login:
        save_config({"server": api.server, "factory": name, "token": created["admin_token"]})
    if as_json:
        print_json(created)
        return
    click.echo(f"Created factory {name!r}.")
    click.echo(f"Admin token (shown once, keep it safe): {created['admin_token']}")
    root_key = created["root_key"]
    click.echo(f"First root key: {root_key['ci']} (ci) / {root_key['prod']} (prod)")
    click.echo("Next: download the offline keys archive, once: tufa keys download KEYS.tgz")


@factory.command("list")
@json_option
@with_api
def list_factories(api: Api, as_json: bool) -> None:
    """List every factory on the server (operator token)."""
    print_records(
        api.get_json(api_paths.FACTORIES),
        as_json,
        ("name", "created"),
        lambda f: (f["name"], f["created_at"]),
    )


@factory.command()
@json_option
@with_api
def show(api: Api, as_json: bool) -> None:
    """Show channel URLs, metadata versions and expiry dates.

    Point any TUF client at a channel's metadata URL, bootstrapped with that channel's
    root (`tufa keys show-root [--prod] --json`).
    """
    data = api.get_json(api.path(api_paths.FACTORY))
    if as_json:
        print_json(data)
        return
    _print_factory(data)


@factory.command("set")
@click.option(
    "--anonymous-read/--no-anonymous-read",
    default=None,
    help="Let anyone read the factory's TUF metadata without a token.",
)
@json_option
@with_api
def set_options(api: Api, anonymous_read: bool | None, as_json: bool) -> None:
    """Change factory settings.

    \b
    Example:
      tufa factory set --anonymous-read
    """
    if anonymous_read is None:
        raise click.UsageError("nothing to change: give --anonymous-read or --no-anonymous-read")
    data = api.request(
        "PATCH", api.path(api_paths.FACTORY), json_body={"anonymous_read": anonymous_read}
    ).json()
    if as_json:
        print_json(data)
        return
    _print_factory(data)


def _print_factory(data: dict[str, Any]) -> None:
    out = console()
    out.print(f"[bold]Factory {data['name']}[/bold]  created {data['created_at']}")
    out.print(f"anonymous metadata reads: {'on' if data['anonymous_read'] else 'off'}")
    downloaded = data["archive_downloaded_at"]
    out.print(
        f"offline keys archive: downloaded {downloaded}"
        if downloaded
        else "offline keys archive: [yellow]waiting for download (tufa keys download)[/yellow]"
    )
    for channel, info in data["channels"].items():
        table = Table(title=f"{channel} channel", title_justify="left")
        table.add_column("role")
        table.add_column("version", justify="right")
        table.add_column("expires")
        for role in ("root", "targets", "snapshot", "timestamp"):
            table.add_row(role, str(info[role]["version"]), info[role]["expires"])
        out.print(table)
        out.print(f"  metadata URL: {info['metadata_url']}")
        out.print(f"  targets URL:  {info['targets_url']}")
    first = data["first_separated_root_version"]
    if first is not None:
        out.print(
            f"provision devices with root version {first} of their channel or newer "
            f"(tufa get .../repo/CHANNEL/metadata/{first}.root.json)"
        )
    for warning in data["warnings"]:
        warn(warning)
