"""The `tufa` command."""

from __future__ import annotations

import click

from tufa.cli.device_groups import device_groups
from tufa.cli.devices import devices
from tufa.cli.factory import factory
from tufa.cli.keys import keys
from tufa.cli.session import get, login
from tufa.cli.targets import targets
from tufa.cli.tokens import tokens
from tufa.cli.waves import waves
from tufa.cli.webhooks import webhooks
from tufa.core.command_help import WholeSentenceGroup
from tufa.demo.story import demo


@click.group(cls=WholeSentenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tufa")
def cli() -> None:
    """Administer a tufa server: factories, offline keys, tokens, devices.

    Server, factory and token come from --server/-f/--token, then TUFA_SERVER,
    TUFA_FACTORY and TUFA_TOKEN, then the file `tufa login` writes.
    """


for command in (
    factory,
    keys,
    targets,
    waves,
    device_groups,
    tokens,
    devices,
    webhooks,
    login,
    get,
    demo,
):
    cli.add_command(command)
