"""`tufa device-groups`: named sets of production devices, to roll waves out to."""

from __future__ import annotations

import click

from tufa.cli.client import Api, with_api
from tufa.cli.devices import plain_cell
from tufa.cli.output import json_option, print_json, print_records, print_table
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup


@click.group("device-groups", cls=WholeSentenceGroup)
def device_groups() -> None:
    """Name sets of production devices, to roll waves out to.

    \b
    Examples:
      tufa device-groups create beta-testers
      tufa device-groups add beta-testers field-unit-1 field-unit-2
      tufa device-groups show beta-testers
      tufa device-groups remove beta-testers field-unit-2
      tufa device-groups delete beta-testers
    """


@device_groups.command()
@click.argument("name")
@json_option
@with_api
def create(api: Api, name: str, as_json: bool) -> None:
    """Create device group NAME.

    \b
    Example:
      tufa device-groups create beta-testers
      tufa device-groups add beta-testers field-unit-1 field-unit-2
    """
    created = api.request("POST", api.path(api_paths.DEVICE_GROUPS), json_body={"name": name})
    if as_json:
        print_json(created.json())
        return
    click.echo(f"Created device group {name}.")


def _change_members(
    api: Api, method: str, name: str, devices: tuple[str, ...], as_json: bool
) -> None:
    """Add (POST) or remove (DELETE) DEVICES, all of them or none; say how many are left
    (--json: the group as the server answered, its members' ids)."""
    result = api.request(
        method,
        api.path(api_paths.DEVICE_GROUP_DEVICES, group=name),
        json_body={"devices": list(devices)},
    ).json()
    if as_json:
        print_json(result)
        return
    click.echo(f"Group {name} has {len(result['devices'])} device(s).")


@device_groups.command()
@click.argument("name")
@click.argument("devices", nargs=-1, required=True)
@json_option
@with_api
def add(api: Api, name: str, devices: tuple[str, ...], as_json: bool) -> None:
    """Add DEVICES (names or ids) to group NAME: all of them, or none if one is unknown
    or a CI device (waves roll out to production devices only)."""
    _change_members(api, "POST", name, devices, as_json)


@device_groups.command()
@click.argument("name")
@click.argument("devices", nargs=-1, required=True)
@json_option
@with_api
def remove(api: Api, name: str, devices: tuple[str, ...], as_json: bool) -> None:
    """Remove DEVICES (names or ids) from group NAME: all of them, or none if one is not
    a member. The devices keep what waves served them. To remove the group itself:
    `tufa device-groups delete NAME`.

    \b
    Example:
      tufa device-groups remove beta-testers field-unit-2
    """
    _change_members(api, "DELETE", name, devices, as_json)


@device_groups.command("delete")
@click.argument("name")
@json_option
@with_api
def delete_group(api: Api, name: str, as_json: bool) -> None:
    """Delete group NAME. Its devices stay registered, and keep what waves served them.

    \b
    Example:
      tufa device-groups delete beta-testers
    """
    deleted = api.request("DELETE", api.path(api_paths.DEVICE_GROUP, group=name)).json()
    if as_json:
        print_json(deleted)
        return
    click.echo(f"Deleted device group {name} ({len(deleted['devices_left'])} device(s) in it).")


@device_groups.command("list")
@json_option
@with_api
def list_groups(api: Api, as_json: bool) -> None:
    """List device groups with how many devices each has (`--json`: their ids). The
    members themselves, by name: `tufa device-groups show NAME`."""
    print_records(
        api.get_json(api.path(api_paths.DEVICE_GROUPS)),
        as_json,
        ("name", "devices", "created"),
        lambda g: (g["name"], str(len(g["devices"])), g["created_at"]),
    )


@device_groups.command("show")
@click.argument("name")
@json_option
@with_api
def show_group(api: Api, name: str, as_json: bool) -> None:
    """Show group NAME and its members: name, id, hardware id, tag, installed version.

    \b
    Example:
      tufa device-groups show beta-testers
    """
    group = api.get_json(api.path(api_paths.DEVICE_GROUP, group=name))
    if as_json:
        print_json(group)
        return
    click.echo(f"Device group {group['name']}, created {group['created_at']}.")
    if not group["members"]:
        click.echo("No devices: add some with `tufa device-groups add NAME DEVICE...`.")
        return
    print_table(
        ("name", "id", "hardware id", "tag", "installed", "status"),
        (
            (
                plain_cell(m["name"]),
                m["id"],
                plain_cell(m["hardware_id"]),
                plain_cell(m["tag"]),
                plain_cell(m["installed_version"]),
                "revoked" if m["revoked_at"] else "active",
            )
            for m in group["members"]
        ),
        title=f"{len(group['members'])} device(s)",
    )
