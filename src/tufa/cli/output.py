"""Terminal output shared by the command groups: tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

# Key ids and URLs must print whole even when the output goes to a pipe or a log,
# where rich would otherwise assume 80 columns and cut them.
_PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else _PIPE_WIDTH)


def warn(message: str) -> None:
    console(stderr=True).print(f"[bold red]WARNING:[/bold red] {message}")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def transfer_progress(*, quiet: bool) -> Progress:
    """Progress bars for uploads and downloads, on stderr so --json output stays clean."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console(stderr=True),
        disable=quiet,
    )
