"""`tufa keys`: the offline keys archive and the roots it governs.

One module per part of the group, each registered here by name:

    download       `keys download`, the archive from the server, once
    show_root      `keys show-root`
    offline        `keys copy-targets`, `backup`, `restore`, `sign-file`: files only,
                   for the offline machine
    rotate         `keys rotate-root`, `rotate-targets`: a root update start to finish
    updates        the `keys updates` group: a root update step by step
    root_update    the root update these commands drive (no commands)
    archive_options  the options and archive helpers they all share (no commands)
"""

from __future__ import annotations

import click

from tufa.cli.keys import download, offline, rotate, show_root, updates
from tufa.core.command_help import WholeSentenceGroup


@click.group(cls=WholeSentenceGroup)
def keys() -> None:
    """Offline keys archive and TUF roots."""


for command in (
    download.download,
    show_root.show_root,
    offline.copy_targets,
    offline.backup,
    offline.restore,
    offline.sign_file,
    rotate.rotate_root,
    rotate.rotate_targets,
    updates.updates,
):
    keys.add_command(command)
