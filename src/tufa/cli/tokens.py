"""`tufa tokens`: API tokens for people, CI jobs and device provisioning."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from tufa.cli.client import Api, with_api
from tufa.cli.output import json_option, print_json, print_records
from tufa.core import api_paths
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.durations import DURATION

SCOPES = ("admin", "ci", "read", "register")


@click.group(cls=WholeSentenceGroup)
def tokens() -> None:
    """Create, list and revoke API tokens (admin token needed)."""


@tokens.command()
@click.option(
    "-s",
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(SCOPES),
    help="What the token may do (repeatable): admin, ci (publish), read, register (devices).",
)
@click.option("-d", "--description", default="", help="Who or what uses the token.")
@click.option("--expires", type=DURATION, help="Lifetime, e.g. 30d or 12h (default: never).")
@json_option
@with_api
def create(
    api: Api, scopes: tuple[str, ...], description: str, expires: timedelta | None, as_json: bool
) -> None:
    """Create a token; its secret is printed once.

    \b
    Examples:
      tufa tokens create --scope ci -d "jenkins" --expires 90d
      tufa tokens create --scope register -d "assembly line" --json
    """
    body: dict[str, object] = {"scopes": list(scopes), "description": description}
    if expires is not None:
        body["expires_in_seconds"] = int(expires.total_seconds())
    created = api.request("POST", api.path(api_paths.TOKENS), json_body=body).json()
    if as_json:
        print_json(created)
        return
    click.echo(f"Token {created['id']} ({', '.join(created['scopes'])}), shown once:")
    click.echo(created["token"])


@tokens.command("list")
@json_option
@with_api
def list_tokens(api: Api, as_json: bool) -> None:
    """List the factory's tokens (never their secrets)."""
    print_records(
        api.get_json(api.path(api_paths.TOKENS)),
        as_json,
        ("id", "scopes", "description", "created", "expires", "revoked"),
        _token_row,
    )


def _token_row(t: dict[str, Any]) -> tuple[str, ...]:
    return (
        t["id"],
        ",".join(t["scopes"]),
        t["description"],
        t["created_at"],
        t["expires_at"] or "never",
        t["revoked_at"] or "",
    )


@tokens.command()
@click.argument("token_id")
@json_option
@with_api
def revoke(api: Api, token_id: str, as_json: bool) -> None:
    """Revoke token TOKEN_ID (tok_..., see `tufa tokens list`) at once.

    \b
    Example:
      tufa tokens revoke tok_3f2a9c0d1e4b5a67
    """
    if not token_id.startswith(api_paths.TOKEN_ID_PREFIX):
        # Refused here, so that a secret never travels in a URL (and into access logs).
        raise click.BadParameter(api_paths.REVOKE_BY_ID_HINT, param_hint="TOKEN_ID")
    revoked = api.request("DELETE", api.path(api_paths.TOKEN, token_id=token_id)).json()
    if as_json:
        print_json(revoked)
        return
    click.echo(f"Revoked {revoked['id']} at {revoked['revoked_at']}.")
