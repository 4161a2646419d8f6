"""Terminal output shared by the command groups: tables for people, JSON for scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import click
from rich import filesize
from rich.console import Console, RenderableType
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task
from rich.table import Table
from rich.text import Text

# The agent prints its --json the same way: both come from core, shared by the programs.
from tufa.core.json_output import json_option as json_option
from tufa.core.json_output import print_json as print_json

Record = TypeVar("Record")

# Key ids and URLs must print whole even when the output goes to a pipe or a log,
# where rich would otherwise assume 80 columns and cut them.
_PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else _PIPE_WIDTH)


def warn(message: str) -> None:
    console(stderr=True).print(f"[bold red]WARNING:[/bold red] {message}")


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[RenderableType]], *, title: str | None = None
) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console().print(table)


def print_record(
    record: Mapping[str, object],
    as_json: bool,
    keys: Sequence[str],
    more: Sequence[tuple[str, object]] = (),
) -> None:
    """What a `show` command prints: with --json the record as the server sent it, else
    one `label: value` line for each of `keys`, then the `more` fields made for reading;
    labels right-aligned, a missing value as `-`."""
    if as_json:
        print_json(record)
        return
    fields = [*((key, record[key]) for key in keys), *more]
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        click.echo(f"{label:>{width}}: {'-' if value is None else value}")


def print_records(
    records: list[Record],
    as_json: bool,
    columns: Sequence[str],
    row: Callable[[Record], Sequence[RenderableType]],
) -> None:
    """What a list command prints: with --json the records as the server sent them, else
    a table of one row a record."""
    if as_json:
        print_json(records)
        return
    print_table(columns, map(row, records))


class _AverageSpeed(ProgressColumn):
    """Bytes a second over the transfer so far. rich's own speed column needs two
    samples within its window and shows "?" for a transfer done in one (every small
    file, every fast link)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("")
        speed = filesize.decimal(int(task.completed / elapsed))
        return Text(f"{speed}/s", style="progress.data.speed")


def transfer_progress(*, quiet: bool) -> Progress:
    """Progress bars for uploads and downloads, on stderr so --json output stays clean."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        _AverageSpeed(),
        console=console(stderr=True),
        disable=quiet,
    )
