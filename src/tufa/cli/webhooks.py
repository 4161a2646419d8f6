"""`tufa webhooks`: HTTP callbacks for a factory's events, and their delivery log."""

from __future__ import annotations

from typing import Any

import click

from tufa.cli.client import Api, with_api
from tufa.cli.output import json_option, print_json, print_records
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup


@click.group(cls=WholeSentenceGroup)
def webhooks() -> None:
    """Add, list, test and remove webhooks; see what was delivered.

    Every command needs an admin token: a hook's URL may hold the receiver's own token,
    and the delivery log what the receiver answered.
    """


@webhooks.command()
@click.argument("url")
@click.option(
    "--events",
    required=True,
    help="Comma-separated events: wave.halted, wave.advanced, wave.completed, "
    "device.first-seen, device.install-failed, keys.expiring.",
)
@click.option(
    "--secret",
    help="The secret that signs deliveries (16-200 characters); by default the server "
    "generates one and prints it once.",
)
@json_option
@with_api
def add(api: Api, url: str, events: str, secret: str | None, as_json: bool) -> None:
    """Add a webhook: the server POSTs each event to URL, signed with its secret.

    \b
    Examples:
      tufa webhooks add https://hooks.example.com/tufa --events device.install-failed,keys.expiring
      tufa webhooks add https://ci.example.com/hook --events wave.completed --secret "$HOOK_SECRET"
    """
    body: dict[str, object] = {"url": url, "events": [e.strip() for e in events.split(",")]}
    if secret is not None:
        body["secret"] = secret
    created = api.request("POST", api.path(api_paths.WEBHOOKS), json_body=body).json()
    if as_json:
        print_json(created)
        return
    click.echo(f"Webhook {created['id']} for {', '.join(created['events'])} -> {created['url']}")
    if created["secret"] is not None:
        click.echo("Its signing secret, shown once:")
        click.echo(created["secret"])


@webhooks.command("list")
@json_option
@with_api
def list_hooks(api: Api, as_json: bool) -> None:
    """List the factory's webhooks (never their secrets)."""
    print_records(
        api.get_json(api.path(api_paths.WEBHOOKS)),
        as_json,
        ("id", "url", "events", "created"),
        lambda h: (h["id"], h["url"], ",".join(h["events"]), h["created_at"]),
    )


@webhooks.command()
@click.argument("hook_id")
@json_option
@with_api
def remove(api: Api, hook_id: str, as_json: bool) -> None:
    """Remove webhook HOOK_ID (wh_..., see `tufa webhooks list`) and its delivery log.

    \b
    Example:
      tufa webhooks remove wh_3f2a9c0d1e4b5a67
    """
    removed = api.request("DELETE", api.path(api_paths.WEBHOOK, hook_id=hook_id)).json()
    if as_json:
        print_json(removed)
        return
    click.echo(f"Removed webhook {removed['id']} ({removed['url']}).")


@webhooks.command()
@click.argument("hook_id")
@json_option
@with_api
def test(api: Api, hook_id: str, as_json: bool) -> None:
    """Queue a `webhook.test` delivery to webhook HOOK_ID; see it in `deliveries`.

    \b
    Example:
      tufa webhooks test wh_3f2a9c0d1e4b5a67 && tufa webhooks deliveries wh_3f2a9c0d1e4b5a67
    """
    queued = api.request("POST", api.path(api_paths.WEBHOOK_TEST, hook_id=hook_id)).json()
    if as_json:
        print_json(queued)
        return
    click.echo(f"Queued delivery {queued['delivery']} ({queued['event']}).")


@webhooks.command()
@click.argument("hook_id")
@json_option
@with_api
def deliveries(api: Api, hook_id: str, as_json: bool) -> None:
    """The delivery log of webhook HOOK_ID: its newest 100 deliveries, newest first.

    \b
    Example:
      tufa webhooks deliveries wh_3f2a9c0d1e4b5a67 --json
    """
    print_records(
        api.get_json(api.path(api_paths.WEBHOOK_DELIVERIES, hook_id=hook_id)),
        as_json,
        ("id", "event", "created", "attempts", "status", "last answer", "delivered / next"),
        _delivery_row,
    )


def _delivery_row(d: dict[str, Any]) -> tuple[str, ...]:
    last = d["last_error"] or (str(d["last_status"]) if d["last_status"] is not None else "")
    when = d["delivered_at"] or d["given_up_at"] or d["next_attempt_at"] or ""
    return (d["id"], d["event"], d["created_at"], str(d["attempts"]), d["status"], last, when)
