"""Every key type works end to end: online keys, root keys and offline targets keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Server, cli_env, create_factory, run_cli


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_key_type_end_to_end(
    make_server: Callable[..., Server], tmp_path: Path, key_type: str
) -> None:
    server = make_server("sqlite", extra_args=("--online-key-type", key_type))
    factory = create_factory(server)
    env = cli_env(factory, tmp_path / "config.json")
    devices = {c: factory.updater(c, tmp_path / f"trust-{c}") for c in ("ci", "prod")}
    for updater in devices.values():
        updater.refresh()

    archive = str(tmp_path / "keys.tgz")
    for command in (
        ("keys", "download", archive),
        ("keys", "rotate-root", archive, "--key-type", key_type),
        ("keys", "rotate-targets", archive, "--key-type", key_type),
    ):
        done = run_cli(*command, env=env)
        assert done.returncode == 0, done.stderr

    expected = {"ed25519": "ed25519", "ecdsa": "ecdsa", "rsa": "rsa"}[key_type]
    for channel in ("ci", "prod"):
        root = factory.request("GET", f"/repo/{channel}/metadata/root.json").json()["signed"]
        assert {key["keytype"] for key in root["keys"].values()} == {expected}
        # A device that trusted version 1 follows to version 3 and verifies everything.
        follower = factory.updater(channel, tmp_path / f"trust-{channel}")
        follower.refresh()
        assert follower._trusted_set.root.version == 3
