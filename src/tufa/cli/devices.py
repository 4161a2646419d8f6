"""`tufa devices`: the factory's registered devices, what they report, and the end of
their credentials (revoke, delete)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click
from rich.text import Text

from tufa.cli.client import Api, with_api
from tufa.cli.output import json_option, print_json, print_records, print_table
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup

BASE_FIELDS = ("id", "name", "hardware_id", "tag", "channel", "created_at")


def plain_cell(value: Any) -> Text:
    """A table cell shown as is: devices write these texts, so brackets in them must
    not be read as rich markup, nor control characters (an install command's colours,
    carriage returns) reach the terminal; they show escaped, as `\\x1b`."""
    text = "-" if value is None else str(value)
    return Text(
        "".join(
            c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode() for c in text
        )
    )


def _device_path(api: Api, device: str, template: str = api_paths.DEVICE) -> str:
    return api.path(template, device=quote(device, safe=""))


def _credential(device: dict[str, Any]) -> str:
    if device["revoked_at"] is not None:
        return f"revoked {device['revoked_at']}"
    pending = ", rotation pending" if device["credential_rotation_pending"] else ""
    return f"in use since {device['credential_since']}{pending}"


@click.group(cls=WholeSentenceGroup)
def devices() -> None:
    """List, inspect, revoke and delete registered devices.

    \b
    Examples:
      tufa devices list
      tufa devices show field-unit-1
      tufa devices revoke field-unit-1
      tufa devices delete field-unit-1
    """


@devices.command("list")
@click.option(
    "--stale",
    is_flag=True,
    help="Only devices fed stale metadata: their last report shows a timestamp the server "
    "superseded longer ago than 2 x their poll interval + 60 s, or one that had expired.",
)
@json_option
@with_api
def list_devices(api: Api, stale: bool, as_json: bool) -> None:
    """List devices with their hardware id, tag, channel, installed version, whether
    their metadata is stale and whether their credential is revoked.

    \b
    Examples:
      tufa devices list --json | jq -r '.[] | select(.revoked_at) | .name'
      tufa devices list --stale
    """
    path = api.path(api_paths.DEVICES) + ("?stale=true" if stale else "")
    print_records(
        api.get_json(path),
        as_json,
        ("name", "id", "hardware id", "tag", "channel", "installed", "registered", "metadata",
         "status"),
        _device_row,
    )  # fmt: skip


def _metadata(d: dict[str, Any]) -> str:
    """Stale, fresh, or unknown (the device did not report what it verified)."""
    if d.get("verified_timestamp_version") is None:
        return "unknown"
    return "stale" if d.get("stale") else "fresh"


def _device_row(d: dict[str, Any]) -> tuple[str | Text, ...]:
    return (
        plain_cell(d["name"]),
        d["id"],
        plain_cell(d["hardware_id"]),
        plain_cell(d["tag"]),
        d["channel"],
        plain_cell(d["installed_version"]),
        d["created_at"],
        _metadata(d),
        "revoked" if d["revoked_at"] else "active",
    )


@devices.command()
@click.argument("device")
@json_option
@with_api
def show(api: Api, device: str, as_json: bool) -> None:
    """Show DEVICE (a name or an id): what it runs, its credential, and the events it
    reported last. A device registered under the name of a deleted one says so.

    \b
    Example:
      tufa devices show field-unit-1
    """
    found = api.get_json(_device_path(api, device))
    if as_json:
        print_json(found)
        return
    for key in BASE_FIELDS:
        click.echo(f"{key:>13}: {plain_cell(found[key])}")
    click.echo(f"{'credential':>13}: {_credential(found)}")
    for earlier in found["earlier_devices"]:
        click.echo(
            f"{'replaces':>13}: deleted device {earlier['id']} of the same name "
            f"(deleted {earlier['deleted_at']}); this is a new device with its own history"
        )
    if found["installed_version"] is None:
        installed = "nothing reported"
    else:
        installed = f"version {found['installed_version']} ({found['installed_target']})"
    click.echo(f"{'installed':>13}: {installed}")
    if found["installed_sha256"] is not None:
        click.echo(f"{'sha256':>13}: {found['installed_sha256']}")
    click.echo(f"{'last report':>13}: {found['last_report_at'] or 'never'}")
    click.echo(f"{'metadata':>13}: {_verified(found)}")
    events = found["events"]
    if not events:
        click.echo("No events reported.")
        return
    keys = ("at", "kind", "version", "target", "detail", "received_at", "id")
    print_table(
        ("at", "kind", "version", "target", "detail", "received", "id"),
        ([plain_cell(e[key]) for key in keys] for e in events),
        title=f"Last {len(events)} event(s), newest first",
    )


def _verified(found: dict[str, Any]) -> str:
    served = found.get("served_timestamp_version")
    newest = f"the server serves timestamp v{served}" if served is not None else "none served"
    version = found.get("verified_timestamp_version")
    if version is None:
        return f"unknown: the device did not report what it verified; {newest}"
    verified = f"verified timestamp v{version} (expires {found['verified_timestamp_expires']})"
    interval = found.get("poll_interval")
    polls = "" if interval is None else f", polls every {interval} s"
    return f"{_metadata(found)}: {verified}; {newest}{polls}"


@devices.command()
@click.argument("device")
@json_option
@with_api
def revoke(api: Api, device: str, as_json: bool) -> None:
    """Revoke DEVICE (a name or an id): every server refuses its credential at once.

    The device keeps running what it has installed, gets no more updates or metadata,
    and its agent logs "credential revoked". Its record and history stay, for
    `tufa devices show`; to register the device again, delete it first.

    \b
    Example:
      tufa devices revoke field-unit-1
    """
    revoked = api.request("POST", _device_path(api, device, api_paths.DEVICE_REVOKE)).json()
    if as_json:
        print_json(revoked)
        return
    click.echo(
        f"Revoked the credential of {plain_cell(revoked['name'])} ({revoked['id']}) at "
        f"{revoked['revoked_at']}: every server refuses it from now on."
    )
    click.echo(f"To register the device again: tufa devices delete {revoked['id']}")


@devices.command()
@click.argument("device")
@json_option
@with_api
def delete(api: Api, device: str, as_json: bool) -> None:
    """Delete DEVICE (a name or an id) for good, with its events and group memberships.

    Its credential stops working at once, and waves stop counting it. A device
    registered later under the same name is a new device: a new id, no history. To keep
    the history, save `tufa devices show DEVICE --json` first.

    \b
    Example:
      tufa devices delete field-unit-1
    """
    deleted = api.request("DELETE", _device_path(api, device)).json()
    if as_json:
        print_json(deleted)
        return
    gone = deleted["deleted"]
    groups = ", ".join(deleted["groups_left"]) or "none"
    click.echo(
        f"Deleted {plain_cell(gone['name'])} ({gone['id']}): its credential no longer works; "
        f"{deleted['events_deleted']} event(s) deleted; left groups: {plain_cell(groups)}."
    )
