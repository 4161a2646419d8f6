"""`--json` on every command that changes or shows something: one JSON document on
stdout (what the server answered, or what the command changed), anything else on stderr.

The first test walks both command trees, so a new command without `--json` fails here
unless it joins the exceptions below with its reason. The others run the real `tufa`
against a real server (SQLite: the commands are HTTP clients of the same server code on
both backends) and read the documents the newer `--json` options print.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from tests.agent_helpers import AgentDevice, publish_build
from tests.helpers import Factory, Server, run_cli
from tests.test_rotations import Owner
from tests.test_waves import offline_targets_keyid, publish, start_owner
from tufa.agent.main import cli as agent_cli
from tufa.cli.main import cli as tufa_cli
from tufa.demo.local_server import console_script

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

# Commands that deliberately take no --json, and why.
WITHOUT_JSON = {
    # Prints the body the server sent, byte for byte: a JSON route's answer already is
    # one JSON document, and a metadata file must stay exactly as signed.
    "tufa get",
    # A guided walk-through for a person, with its own server; nothing to script.
    "tufa demo",
    # The device's service: runs until stopped and logs to stderr as it goes.
    "tufa-agent run",
}


def _commands(group: click.Group, prefix: str) -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found.update(_commands(command, path))
        else:
            found[path] = command
    return found


def _takes_json(command: click.Command) -> bool:
    return any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params)


def test_every_command_takes_json_but_the_listed_exceptions() -> None:
    commands = {**_commands(tufa_cli, "tufa"), **_commands(agent_cli, "tufa-agent")}
    missing = sorted(path for path, command in commands.items() if not _takes_json(command))
    assert missing == sorted(WITHOUT_JSON), (
        "commands without --json that are not listed in WITHOUT_JSON: "
        f"{sorted(set(missing) - WITHOUT_JSON)}; listed but taking --json (or gone): "
        f"{sorted(WITHOUT_JSON - set(missing))}"
    )


def document(done: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document a successful `--json` run printed on stdout."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)  # refuses anything before or after one document


def run_json(owner: Owner, *args: str) -> Any:
    return document(run_cli(*args, "--json", env=owner.env))


def served_root(owner: Owner, channel: str = "ci") -> dict[str, Any]:
    shown = owner.json("keys", "show-root", *(["--prod"] if channel == "prod" else []))
    signed: dict[str, Any] = shown["signed"]
    return signed


@sqlite_only
def test_rotations_say_the_new_root_version_and_keys(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    before = served_root(owner)["version"]

    done = run_cli("keys", "rotate-root", str(owner.archive), "--json", env=owner.env)
    rotated = document(done)
    assert f"WARNING: back {owner.archive} up now" in done.stderr  # on stderr only
    ci, prod = served_root(owner), served_root(owner, "prod")
    assert rotated["root_version"] == ci["version"] == prod["version"] == before + 1
    new = rotated["new_key"]
    assert new["role"] == "root"
    assert new["archive"] == str(owner.archive)
    assert new["keyid"] == new["keyids"]["ci"]
    assert ci["roles"]["root"]["keyids"] == [new["keyids"]["ci"]]
    assert prod["roles"]["root"]["keyids"] == [new["keyids"]["prod"]]
    assert rotated["old_keyids"]
    assert not set(rotated["old_keyids"]) & set(ci["roles"]["root"]["keyids"])

    rotated = run_json(owner, "keys", "rotate-targets", str(owner.archive))
    assert rotated["root_version"] == before + 2
    assert rotated["new_key"]["keyid"] == offline_targets_keyid(owner)
    assert rotated["old_keyids"]
    prod_targets_keyids = served_root(owner, "prod")["roles"]["targets"]["keyids"]
    assert not set(rotated["old_keyids"]) & set(prod_targets_keyids)


@sqlite_only
def test_a_root_update_step_by_step_and_a_second_wave_signature(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    """Each step of a root update prints the update as `review --json` does, with what
    the step changed; `waves sign` the wave the server answered and the keys it added."""
    owner = start_owner(factory, tmp_path / "owner")
    second = owner.home / "second.tgz"
    run_json(owner, "keys", "updates", "init", "-m", "a second release manager")

    added = run_json(
        owner, "keys", "updates", "add-offline-key", "-r", "targets", "-k", str(second)
    )
    second_key = added["new_key"]["keyid"]
    assert added["new_key"] == {
        "role": "targets",
        "keyid": second_key,
        "keyids": second_key,
        "archive": str(second),
    }
    assert added["staged"] == f"add targets key {second_key}"
    assert added["message"] == "a second release manager"
    assert any(second_key in line for line in added["channels"]["prod"]["changes"])
    assert added["ready"] is False

    threshold = run_json(owner, "keys", "updates", "set-threshold", "-r", "targets", "3")
    assert "targets: threshold 2 -> 3" in threshold["channels"]["prod"]["changes"]

    exported = owner.home / "update.json"
    written = run_json(owner, "keys", "updates", "export", str(exported))
    assert written["file"] == str(exported)
    assert written["factory"] == factory.name
    signed = run_json(owner, "keys", "sign-file", str(exported), "-k", str(owner.archive))
    assert signed["signatures_added"] > 0
    assert signed["file"] == str(exported)
    imported = run_json(owner, "keys", "updates", "import", str(exported))
    assert imported["signatures_in_file"] == signed["signatures_added"]
    assert imported["ready"] is False  # the new key has signed nothing yet

    by_second = run_json(owner, "keys", "updates", "sign", "-k", str(second))
    assert by_second["archive"] == str(second)
    assert by_second["signatures_added"] > 0
    assert by_second["ready"] is True
    assert (
        run_json(owner, "keys", "updates", "apply")["root_version"]
        == (served_root(owner, "prod")["version"])
    )

    publish(factory, "2")
    owner.tufa("waves", "init", "w-2", "2", "main", "-k", str(owner.archive))
    wave = run_json(owner, "waves", "sign", "w-2", "-k", str(second))
    assert wave["name"] == "w-2"
    assert wave["signed"] is True
    assert wave["signed_with"] == [second_key]
    assert second_key in wave["signed_by"]
    assert "metadata" not in wave


@sqlite_only
def test_cancelling_a_root_update_and_rotating_online_keys(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    owner.tufa("keys", "updates", "init", "-m", "new timestamp key")
    staged = run_json(
        owner, "keys", "updates", "rotate-online-key", "-r", "timestamp", "--channel", "ci"
    )
    new_key = staged["pending_online_keys"]["ci"]["timestamp"]
    assert any(new_key in line for line in staged["channels"]["ci"]["changes"])
    expiry = run_json(owner, "keys", "updates", "extend-expiry", "--days", "100")
    assert expiry["expires"].endswith("Z")
    assert expiry["staged"] == f"expiry {expiry['expires']}"
    assert run_json(owner, "keys", "updates", "cancel") == {"cancelled": True}


@sqlite_only
def test_device_groups_print_the_group_the_server_answered(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    first, other = (factory.register_device("prod", name) for name in ("unit-1", "unit-2"))

    assert run_json(owner, "device-groups", "create", "beta") == {"name": "beta", "devices": []}
    grown = run_json(owner, "device-groups", "add", "beta", "unit-1", "unit-2")
    assert grown["name"] == "beta"
    assert sorted(grown["devices"]) == sorted([first["id"], other["id"]])
    shrunk = run_json(owner, "device-groups", "remove", "beta", "unit-2")
    assert shrunk["devices"] == [first["id"]]


@sqlite_only
def test_factory_list_is_a_table_with_a_header_and_json_the_list(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    operator = {
        "TUFA_CONFIG": str(tmp_path / "config.json"),
        "TUFA_SERVER": server.url,
        "TUFA_TOKEN": server.operator_token,
        "COLUMNS": "200",
    }
    done = run_cli("factory", "list", env=operator)
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[1]
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["name", "created"]
    assert any(factory.name in line for line in done.stdout.splitlines())

    listed = document(run_cli("factory", "list", "--json", env=operator))
    (mine,) = [f for f in listed if f["name"] == factory.name]
    assert mine["created_at"]


@sqlite_only
def test_login_json_names_what_was_saved_and_checked_but_never_the_token(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    login = ("login", "--server", server.url, "-f", factory.name, "--token", factory.admin_token)
    saved = document(run_cli(*login, "--json", env={"TUFA_CONFIG": str(config)}))
    assert saved == {
        "config": str(config),
        "server": server.url,
        "factory": factory.name,
        "checked": f"the server lets the token read factory {factory.name}",
    }


@sqlite_only
def test_agent_register_rotate_and_tuf_commands_print_json(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    """The agent's commands that change its state print what they did, and never the
    credential they saved."""
    device = AgentDevice(factory, tmp_path / "unit", "unit-1", "ci")
    root = tmp_path / "ci-root.json"
    root.write_bytes(factory.root_v1("ci"))
    register = (
        "register", "--server", server.url, "--factory", factory.name,
        "--token", factory.token("register"), "--hardware-id", "rpi4", "--tag", "main",
        "--root", str(root), "--name", device.name, "--json",
    )  # fmt: skip
    registered = document(device.agent(*register))
    device_id = registered["device_id"]
    assert registered == {
        "device": "unit-1",
        "device_id": device_id,
        "channel": "ci",
        "factory": factory.name,
    }
    credential = (device.dir / "credential").read_text().strip()
    rotated = document(device.agent("rotate-credential", "--json"))
    assert rotated == {"device_id": device_id, "credential_file": str(device.dir / "credential")}
    assert credential not in json.dumps(registered)

    trust = ("--metadata-dir", str(tmp_path / "trust"))
    started = document(agent("tuf", "init", *trust, str(root), "--json"))
    assert started == {"metadata_dir": str(tmp_path / "trust"), "root_version": 1}
    publish_build(factory, "5")
    source = (
        "--metadata-url", factory.metadata_url("ci"), "--token", factory.admin_token,
        "--view", "rpi4/main", *trust,
    )  # fmt: skip
    refreshed = document(agent("tuf", "refresh", *source, "--json"))
    assert refreshed["trusted_metadata"]["targets"] >= 1
    files = tmp_path / "files"
    base = factory.metadata_url("ci").replace("/metadata/", "/targets/")
    download = (
        "tuf", "download", *source, "--target-base-url", base, "--target-dir", str(files),
    )  # fmt: skip
    fetched = document(agent(*download, "rpi4-image-5", "--json"))
    assert list(fetched["targets"]) == ["rpi4-image-5"]
    assert Path(fetched["targets"]["rpi4-image-5"]).parent == files


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    """`tufa-agent ARGS`, for the commands that take no --dir."""
    return subprocess.run(
        [console_script("tufa-agent"), *args], capture_output=True, text=True, timeout=120
    )
