"""`tufa login` and `tufa get`: the session defaults, and raw authenticated API reads."""

from __future__ import annotations

import sys

import click
import httpx

from tufa.cli.client import Api, load_config, save_config, with_api
from tufa.cli.output import json_option, print_json
from tufa.core import api_paths
from tufa.core.http import server_url_problem
from tufa.core.responses import refusal_of


@click.command()
@click.option("--server", help="Server URL.")
@click.option("-f", "--factory", help="Factory name.")
@click.option("--token", help="API token.")
@click.option(
    "--no-check",
    is_flag=True,
    help="Save without asking the server (for a server not up yet): nothing is checked.",
)
@json_option
def login(
    server: str | None, factory: str | None, token: str | None, no_check: bool, as_json: bool
) -> None:
    """Check server URL, factory and token against the server, and save them as defaults.

    Values not given are kept from the config file, and the result is checked as a
    whole: the server must answer, accept the token, and let it reach the factory.
    Nothing is saved if a check fails. The config file (mode 0600) is TUFA_CONFIG or
    ~/.config/tufa/config.json. Flags and TUFA_SERVER, TUFA_FACTORY, TUFA_TOKEN still
    override it per command.

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
    checked = "nothing was checked (--no-check)" if no_check else _check(values)
    path = save_config(values)
    if as_json:
        # Never the token: a script's log is no place for a secret.
        print_json(
            {
                "config": str(path),
                "server": values["server"],
                "factory": values.get("factory"),
                "checked": None if no_check else checked,
            }
        )
        return
    click.echo(
        f"Saved to {path}: server {values['server']}, factory {values.get('factory', '-')}; "
        f"{checked}."
    )


def _check(values: dict[str, str]) -> str:
    """What the server confirmed of `values`; refused (nothing saved) if it does not
    answer, refuses the token, or the token cannot reach the factory."""
    api = Api(values["server"].rstrip("/"), values.get("token"), values.get("factory"))
    try:
        _get(api, api_paths.HEALTH, "")
        if api.token is None:
            return "the server answers; no token, so no factory was checked"
        if api.factory_name is None:
            _get(api, api_paths.FACTORIES, "a factory token needs its factory: add --factory")
            return "the server accepts the operator token"
        _get(
            api,
            api.path(api_paths.FACTORY),
            f"give a token of factory {api.factory_name!r} with --token, or the token's own "
            "factory with --factory",
        )
        return f"the server lets the token read factory {api.factory_name}"
    finally:
        api.close()


def _get(api: Api, path: str, fix_if_forbidden: str) -> None:
    """GET `path`, refusing with the server's reason and `fix_if_forbidden` on a 403."""
    unsaved = "nothing was saved (`tufa login --no-check` saves without checking)"
    try:
        response = api.client.get(api.url(path))
    except httpx.HTTPError as e:
        raise click.ClickException(
            f"cannot reach a server at {api.server} ({e}): check the URL and that "
            f"tufa-server runs there; {unsaved}"
        ) from e
    if response.status_code == 200:
        return
    refused = refusal_of(response)
    if refused.status == 401:
        fix = "give a valid token with --token"
    elif refused.status == 403:
        fix = fix_if_forbidden
    else:
        fix = f"check that {api.server} is the URL of a tufa server"
    raise click.ClickException(
        f"the server at {api.server} refused GET {path} ({refused}): {fix}; {unsaved}"
    )


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
