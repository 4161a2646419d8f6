"""`--json`, the same flag and the same output for `tufa` and `tufa-agent`: one JSON
document on stdout, so that progress and warnings go to stderr only."""

from __future__ import annotations

import json
from typing import Any

import click


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)
