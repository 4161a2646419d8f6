"""Where the CLI's server, factory and token come from, and the HTTP client that uses them.

Precedence: command-line flags, then TUFA_SERVER / TUFA_FACTORY / TUFA_TOKEN, then the
config file written by `tufa login` (TUFA_CONFIG, or ~/.config/tufa/config.json).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx

import tufa
from tufa.core import api_paths
from tufa.core.files import write_private_file
from tufa.core.http import api_client, server_url_problem
from tufa.core.metadata import Channel
from tufa.core.responses import Refusal, refusal_of


def config_path() -> Path:
    if "TUFA_CONFIG" in os.environ:
        return Path(os.environ["TUFA_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "tufa" / "config.json"


def load_config() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read config file {path}: {e}") from e
    return {k: v for k, v in data.items() if isinstance(v, str)}


def save_config(values: dict[str, str]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(path, (json.dumps(values, indent=2) + "\n").encode())
    return path


@dataclass
class Api:
    """A logged-in view of one server, and optionally one factory on it.

    It owns one HTTP client, so a command's requests share connections; `with_api`
    closes it when the command ends.
    """

    server: str
    token: str | None
    factory_name: str | None
    client: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.client, _ = api_client(self.token, f"tufa-cli/{tufa.__version__}", timeout=60)

    def close(self) -> None:
        self.client.close()

    @property
    def factory(self) -> str:
        if not self.factory_name:
            raise click.UsageError(
                "no factory given: use -f/--factory, TUFA_FACTORY or `tufa login --factory`"
            )
        return self.factory_name

    def path(self, template: str, **fields: str) -> str:
        """An `api_paths` template filled in for this factory."""
        return api_paths.path(template, self.factory, **fields)

    def root_path(self, channel: Channel) -> str:
        """Where the channel's newest root is served."""
        return self.path(api_paths.METADATA_FILE, channel=channel, filename="root.json")

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.server}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> httpx.Response:
        try:
            response = self.client.request(method, self.url(path), json=json_body)
        except httpx.HTTPError as e:
            raise click.ClickException(
                f"cannot reach the server at {self.server}: {e}. Is it running? "
                "Check --server, TUFA_SERVER or `tufa login`."
            ) from e
        if response.status_code not in ok:
            raise click.ClickException(describe_refusal(refusal_of(response)))
        return response

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()


def describe_refusal(refusal: Refusal) -> str:
    """A refusal as the CLI reports it, with where to look for a refused token."""
    if refusal.code is None:
        return f"the server refused: {refusal}"
    described = f"the server refused: {refusal.message} (HTTP {refusal.status} {refusal.code})"
    if refusal.code == "unauthorized":
        described += "; check --token, TUFA_TOKEN or `tufa login`"
    return described


def with_api(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --server, -f/--factory and --token (as on every fioctl command) and pass the
    command an `api` built from them, the environment and the config file."""

    @functools.wraps(func)
    def wrapper(server: str | None, factory: str | None, token: str | None, **kwargs: Any) -> Any:
        api = make_api(server, factory, token)
        try:
            return func(api=api, **kwargs)
        finally:
            api.close()

    wrapper = click.option("--token", envvar="TUFA_TOKEN", help="API token [env TUFA_TOKEN].")(
        wrapper
    )
    wrapper = click.option(
        "-f", "--factory", envvar="TUFA_FACTORY", help="Factory name [env TUFA_FACTORY]."
    )(wrapper)
    return click.option("--server", envvar="TUFA_SERVER", help="Server URL [env TUFA_SERVER].")(
        wrapper
    )


def make_api(server: str | None, factory: str | None, token: str | None) -> Api:
    config = load_config()
    chosen = server or config.get("server")
    if not chosen:
        raise click.UsageError(
            "no server given: use --server, TUFA_SERVER or `tufa login --server URL`"
        )
    problem = server_url_problem(chosen)
    if problem is not None:
        where = "--server or TUFA_SERVER" if server else "the server `tufa login` saved"
        raise click.UsageError(f"{where}: {problem}")
    return Api(
        server=chosen.rstrip("/"),
        token=token or config.get("token"),
        factory_name=factory or config.get("factory"),
    )
