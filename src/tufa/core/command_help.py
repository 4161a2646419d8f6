"""Help pages shared by the three programs' click groups."""

from __future__ import annotations

import sys

import click


class WholeSentenceGroup(click.Group):
    """A click group whose command list shows each command's first sentence whole.

    click cuts a description to fit beside the command name on one line ("Replace the
    offline targets key (production releases)..."); here the sentence is wrapped under
    itself instead, so every description reads as written.
    """

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=sys.maxsize)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class EnvvarNamingGroup(WholeSentenceGroup):
    """A group whose commands' --help name the environment variable of each option that
    reads one, so that a variable such as TUFA_PORT is found where the flag is."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.envvar:
                param.show_envvar = True
        super().add_command(cmd, name)
