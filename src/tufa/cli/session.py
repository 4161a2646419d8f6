"""`tufa login` and `tufa get`: the session defaults, and raw authenticated API reads."""

from __future__ import annotations

import sys

import click

from tufa.cli.client import Api, load_config, save_config, with_api
from tufa.core.http import server_url_problem


@click.command()
@click.option("--server", help="Server URL.")
@click.option("-f", "--factory", help="Factory name.")
@click.option("--token", help="API token.")
def login(server: str | None, factory: str | None, token: str | None) -> None:
    """Save server URL, factory and token as defaults.

    The config file (mode 0600) is TUFA_CONFIG or ~/.config/tufa/config.json. Flags and
    TUFA_SERVER, TUFA_FACTORY, TUFA_TOKEN still override it per command.

    \b
    Example:
      tufa login --server https://tufa.example --factory acme --token tufa_...
    """
    values = load_config()
    for key, value in (("server", server), ("factory", factory), ("token", token)):
        if value:
            values[key] = value
    if not values.get("server"):
        raise click.UsageError("give at least --server")
    problem = server_url_problem(values["server"])
    if problem is not None:
        raise click.UsageError(f"--server: {problem}")
    path = save_config(values)
    click.echo(f"Saved to {path}: server {values['server']}, factory {values.get('factory', '-')}")


@click.command()
@click.argument("path")
@with_api
def get(api: Api, path: str) -> None:
    """Print an authenticated API GET of PATH (like fioctl get).

    \b
    Examples:
      tufa get /api/v1/factories/acme
      tufa get /api/v1/factories/acme/repo/prod/metadata/root.json | jq .signed.roles
    """
    if not path.startswith(("/", "http://", "https://")):
        path = f"/{path}"
    body = api.request("GET", path).content
    sys.stdout.buffer.write(body)
    if sys.stdout.isatty() and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
