"""The fleet commands as an operator reads them: `tufa devices show`, `tufa waves`,
`tufa device-groups`, durations on the command line, what a device without a release
says, and the server's answer to a URL it has no route for.

Real `tufa`, `tufa-agent` and `tufa-server` processes against a real server on loopback;
all on SQLite (the commands are HTTP clients of the same server code on both backends).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import Factory, Server
from tests.test_waves import start_owner

pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def refused(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """The command failed, printing nothing on stdout, and said each phrase on stderr."""
    assert done.returncode != 0, done.stdout
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


# -- a URL with no route --------------------------------------------------------------------


def test_an_unknown_route_is_named_with_the_fix(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    path = f"/api/v1/factories/{factory.name}/nope"
    refused(
        owner.fails("get", path),
        f"no API route matches '{path}': check the URL against the API paths in the README",
        "HTTP 404 not_found",
    )
