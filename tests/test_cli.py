"""The `tufa` admin CLI, run as a real process against a real server."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from tuf.ngclient import Updater

from tests.helpers import Factory, Server, cli_env, create_factory, run_cli
from tufa.agent.main import cli as agent_cli
from tufa.cli.main import cli
from tufa.core.archive import FIRST_ROOT_KEY_NAME, OfflineArchive
from tufa.core.fetcher import BearerFetcher
from tufa.core.metadata import Channel
from tufa.demo.local_server import console_script, free_port
from tufa.server.main import cli as server_cli

# The CLI is an HTTP client: the server's database makes no difference to it, so these
# tests use the shared SQLite server only (the API on both backends is tested elsewhere).
sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def _json(*args: str, env: dict[str, str]) -> Any:
    done = run_cli(*args, "--json", env=env)
    assert done.returncode == 0, f"tufa {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- login and where settings come from --------------------------------------------------


@sqlite_only
def test_login_writes_private_config_that_later_commands_use(
    factory: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "conf" / "config.json"
    env = {"TUFA_CONFIG": str(config)}
    # The environment is for one command at a time: login saves only what it is given.
    login_env = {**env, "TUFA_TOKEN": "tufa_from_env", "TUFA_FACTORY": "from-env"}
    done = run_cli(
        "login",
        "--server",
        factory.server.url,
        "--factory",
        factory.name,
        "--token",
        factory.admin_token,
        env=login_env,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {
        "server": factory.server.url,
        "factory": factory.name,
        "token": factory.admin_token,
    }
    # No flags, no TUFA_* variables: everything comes from the file.
    assert _json("factory", "show", env=env)["name"] == factory.name

    other = tmp_path / "other.json"
    done = run_cli(
        "login",
        "--server",
        factory.server.url,
        env={"TUFA_CONFIG": str(other), "TUFA_TOKEN": "tufa_from_env"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(other.read_text()) == {"server": factory.server.url}


@sqlite_only
def test_login_checks_with_the_server_and_saves_nothing_it_refuses(
    factory: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    env = {"TUFA_CONFIG": str(config)}
    url = factory.server.url
    done = run_cli(
        "login", "--server", url, "-f", factory.name, "--token", factory.admin_token, env=env
    )
    assert done.returncode == 0, done.stderr
    assert f"the server lets the token read factory {factory.name}" in done.stdout
    saved = config.read_bytes()
    beta = create_factory(factory.server)
    unreachable = f"http://127.0.0.1:{free_port()}"
    refusals = [
        # The saved token is the first factory's: it cannot reach another one.
        (("--factory", beta.name), (f"give a token of factory {beta.name!r} with --token",)),
        (("--token", "tufa_not_a_token"), ("HTTP 401", "give a valid token with --token")),
        (("--server", unreachable), (f"cannot reach a server at {unreachable}",)),
    ]
    for args, phrases in refusals:
        done = run_cli("login", *args, env=env)
        assert done.returncode == 1, (args, done.stdout)
        for phrase in (*phrases, "nothing was saved", "--no-check"):
            assert phrase in done.stderr, (phrase, done.stderr)
        assert "Saved" not in done.stdout
        assert config.read_bytes() == saved, args

    # No flags: what is saved is checked again.
    done = run_cli("login", env=env)
    assert done.returncode == 0, done.stderr
    assert f"lets the token read factory {factory.name}" in done.stdout
    done = run_cli("login", "--server", unreachable, "--no-check", env=env)
    assert done.returncode == 0, done.stderr
    assert "nothing was checked (--no-check)" in done.stdout
    assert json.loads(config.read_text())["server"] == unreachable

    # Without a factory: the operator token is checked as such, a factory token refused.
    alone = {"TUFA_CONFIG": str(tmp_path / "alone.json")}
    operator = ("login", "--server", url, "--token", factory.server.operator_token)
    done = run_cli(*operator, env=alone)
    assert done.returncode == 0, done.stderr
    assert "the server accepts the operator token" in done.stdout
    done = run_cli("login", "--token", factory.admin_token, env=alone)
    assert done.returncode == 1
    assert "a factory token needs its factory: add --factory" in done.stderr


@sqlite_only
def test_flags_override_env_which_overrides_the_config_file(
    factory: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"server": factory.server.url, "factory": factory.name, "token": "tufa_wrong_file"}
        )
    )
    config.chmod(0o600)
    good = factory.admin_token
    file_only = {"TUFA_CONFIG": str(config)}

    done = run_cli("factory", "show", "--json", env=file_only)
    assert done.returncode != 0
    assert "401" in done.stderr

    env_over_file = {**file_only, "TUFA_TOKEN": good}
    assert _json("factory", "show", env=env_over_file)["name"] == factory.name

    env_wrong = {**file_only, "TUFA_TOKEN": "tufa_wrong_env"}
    done = run_cli("factory", "show", "--json", env=env_wrong)
    assert done.returncode != 0
    assert "401" in done.stderr
    assert _json("factory", "show", "--token", good, env=env_wrong)["name"] == factory.name

    # Server and factory follow the same order: a wrong file is fixed by the
    # environment, a wrong environment by flags.
    config.write_text(
        json.dumps({"server": f"http://127.0.0.1:{free_port()}", "factory": "nope", "token": good})
    )
    env_fixes = {**file_only, "TUFA_SERVER": factory.server.url, "TUFA_FACTORY": factory.name}
    assert _json("factory", "show", env=env_fixes)["name"] == factory.name
    env_breaks = {**file_only, "TUFA_SERVER": "http://127.0.0.1:1", "TUFA_FACTORY": "nope"}
    shown = _json(
        "factory",
        "show",
        "--server",
        factory.server.url,
        "-f",
        factory.name,
        env=env_breaks,
    )
    assert shown["name"] == factory.name


# -- factory, keys, get --------------------------------------------------------------


@sqlite_only
def test_factory_create_and_show_give_urls_ngclient_can_use(server: Server, tmp_path: Path) -> None:
    name = f"cli-{secrets.token_hex(5)}"
    operator_env = {"TUFA_CONFIG": str(tmp_path / "config.json"), "TUFA_SERVER": server.url}
    created = _json("factory", "create", name, "--token", server.operator_token, env=operator_env)
    assert created["name"] == name
    assert created["admin_token"]
    factory = Factory(server, name, created["admin_token"])
    env = cli_env(factory, tmp_path / "config.json")

    shown = _json("factory", "show", env=env)
    assert shown["name"] == name
    # Nothing but the nudge to take ownership of the keys the server generated.
    assert shown["server_generated_keys"] == ["root", "targets"]
    assert [w for w in shown["warnings"] if "the server generated" not in w] == []
    assert set(shown["channels"]) == {"ci", "prod"}
    for channel, info in shown["channels"].items():
        base = f"{server.url}/api/v1/factories/{name}/repo/{channel}"
        assert info["metadata_url"] == f"{base}/metadata/"
        assert info["targets_url"] == f"{base}/targets/"
        assert info["root"]["version"] == 1

        # Bootstrapped with what `tufa keys show-root --json` prints, a stock TUF client
        # refreshes the channel from the URLs `factory show` gave.
        args = ("keys", "show-root", *(["--prod"] if channel == "prod" else []), "--json")
        root = run_cli(*args, env=env)
        assert root.returncode == 0, root.stderr
        updater = Updater(
            str(tmp_path / channel),
            info["metadata_url"],
            target_base_url=info["targets_url"],
            fetcher=BearerFetcher(factory.admin_token),
            bootstrap=root.stdout.encode(),
        )
        updater.refresh()
        trusted = updater._trusted_set  # read-only look at what the client now trusts
        assert trusted.root.version == 1
        assert trusted.timestamp.version >= 1


@sqlite_only
def test_show_root_json_matches_the_archive_and_thresholds(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    done = run_cli("keys", "download", str(tmp_path / "keys.tgz"), env=env)
    assert done.returncode == 0, done.stderr
    (first_root,) = [
        k for k in OfflineArchive.load(tmp_path / "keys.tgz").keys if k.name == FIRST_ROOT_KEY_NAME
    ]

    ci = run_cli("keys", "show-root", "--json", env=env)
    assert ci.returncode == 0, ci.stderr
    assert "WARNING" not in ci.stderr
    ci_root = json.loads(ci.stdout)
    prod_root = _json("keys", "show-root", "--prod", env=env)
    for channel, root in ((Channel.CI, ci_root), (Channel.PROD, prod_root)):
        assert root["signed"]["roles"]["root"]["keyids"] == [first_root.half(channel).keyid]
        assert root["signed"]["version"] == 1
    assert ci_root["signed"]["roles"]["targets"]["threshold"] == 1
    assert prod_root["signed"]["roles"]["targets"]["threshold"] == 2
    # --json prints the root exactly as served.
    served = factory.request("GET", "/repo/ci/metadata/root.json")
    assert ci.stdout.rstrip("\n").encode() == served.content

    table = run_cli("keys", "show-root", "--prod", "-k", str(tmp_path / "keys.tgz"), env=env)
    assert table.returncode == 0, table.stderr
    assert first_root.prod.keyid in table.stdout
    assert first_root.ci.keyid in table.stdout  # the root key pairs, under the table
    assert "owner (offline)" in table.stdout
    assert "server (online)" in table.stdout


@sqlite_only
def test_extend_expiry_and_review_print_times_with_z_like_every_command(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    assert run_cli("keys", "updates", "init", "-m", "expiry", env=env).returncode == 0
    staged = run_cli("keys", "updates", "extend-expiry", "--days", "30", env=env)
    reviewed = run_cli("keys", "updates", "review", "--diff", env=env)
    for done in (staged, reviewed):
        assert done.returncode == 0, done.stderr
        assert "+00:00" not in done.stdout, done.stdout
    expires = re.search(r"Staged: expiry (\S+Z)\.", staged.stdout)
    assert expires is not None, staged.stdout
    assert f"-> {expires[1]}" in reviewed.stdout, reviewed.stdout
    assert _parse_time(expires[1]) - datetime.now(UTC) > timedelta(days=29)


@sqlite_only
def test_get_prints_the_api_bytes(factory: Factory, tmp_path: Path) -> None:
    path = factory.path("/repo/prod/metadata/1.root.json")
    done = run_cli("get", path, env=cli_env(factory, tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr
    # Byte for byte, so the output can be hashed or fed to a TUF client as is.
    assert done.stdout.encode() == factory.root_v1("prod")


# -- tokens and devices -----------------------------------------------------------------


@sqlite_only
def test_tokens_create_list_revoke(factory: Factory, tmp_path: Path) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    before = datetime.now(UTC).replace(microsecond=0)
    created = _json(
        "tokens", "create", "--scope", "read", "-d", "dashboard", "--expires", "1h", env=env
    )
    after = datetime.now(UTC)
    assert created["scopes"] == ["read"]
    assert created["description"] == "dashboard"
    expires = _parse_time(created["expires_at"])
    assert before + timedelta(hours=1) <= expires <= after + timedelta(hours=1)
    secret = created["token"]
    assert factory.request("GET", token=secret).status_code == 200

    never = _json("tokens", "create", "--scope", "ci", "--scope", "register", env=env)
    assert never["expires_at"] is None
    assert sorted(never["scopes"]) == ["ci", "register"]

    listed = _json("tokens", "list", env=env)
    by_id = {t["id"]: t for t in listed}
    assert {created["id"], never["id"]} <= set(by_id)
    assert all("token" not in t for t in listed), "secrets must never be listed"
    assert by_id[created["id"]]["revoked_at"] is None

    revoked = _json("tokens", "revoke", created["id"], env=env)
    assert revoked["id"] == created["id"]
    assert revoked["revoked_at"] is not None
    assert factory.request("GET", token=secret).status_code == 401
    listed = {t["id"]: t for t in _json("tokens", "list", env=env)}
    assert listed[created["id"]]["revoked_at"] == revoked["revoked_at"]
    assert listed[never["id"]]["revoked_at"] is None


@sqlite_only
def test_revoking_by_secret_asks_for_the_id_and_never_prints_the_secret(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    secret = _json("tokens", "create", "--scope", "read", env=env)["token"]
    for json_flag in ((), ("--json",)):
        done = run_cli("tokens", "revoke", secret, *json_flag, env=env)
        assert done.returncode == 2, done.stderr
        assert "pass the token id (tok_..." in done.stderr
        assert secret not in done.stdout + done.stderr
    # The API, asked directly, does not echo it either.
    response = factory.request("DELETE", f"/tokens/{secret}")
    assert response.status_code == 404
    assert "pass the token id (tok_..." in response.text
    assert secret not in response.text
    assert factory.request("GET", token=secret).status_code == 200, "nothing was revoked"


@sqlite_only
def test_devices_list_and_show(factory: Factory, tmp_path: Path) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    assert _json("devices", "list", env=env) == []
    ci = factory.register_device("ci", name="bench-1")
    prod = factory.register_device("prod", name="field-1")

    listed = _json("devices", "list", env=env)
    assert [d["name"] for d in listed] == ["bench-1", "field-1"]
    assert {d["id"]: d["channel"] for d in listed} == {ci["id"]: "ci", prod["id"]: "prod"}
    assert all("credential" not in d for d in listed)

    by_name = _json("devices", "show", "field-1", env=env)
    by_id = _json("devices", "show", prod["id"], env=env)
    assert by_name == by_id
    assert by_name["id"] == prod["id"]
    assert by_name["hardware_id"] == "rpi4"
    assert by_name["channel"] == "prod"


# -- errors ------------------------------------------------------------------------------


def _assert_fails(done: Any, *phrases: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


@sqlite_only
def test_errors_name_the_problem_on_stderr(factory: Factory, tmp_path: Path) -> None:
    missing = {"TUFA_CONFIG": str(tmp_path / "absent.json")}
    good = cli_env(factory, tmp_path / "config.json")
    cases: list[tuple[tuple[str, ...], dict[str, str], tuple[str, ...]]] = [
        (("factory", "show"), missing, ("no server given", "--server")),
        (
            ("factory", "show"),
            {**good, "TUFA_SERVER": f"http://127.0.0.1:{free_port()}"},
            ("cannot reach the server",),
        ),
        (("devices", "list"), {**good, "TUFA_TOKEN": "tufa_not_a_token"}, ("401", "unknown token")),
        (("devices", "show", "no-such-device"), good, ("404", "no-such-device")),
        (("tokens", "revoke", "tok_nonexistent"), good, ("404", "tok_nonexistent")),
    ]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(lambda case: run_cli(*case[0], env=case[1]), cases))
    for (args, _, phrases), done in zip(cases, results, strict=True):
        assert done.returncode != 0, args
        _assert_fails(done, *phrases)


# -- help --------------------------------------------------------------------------------

GROUPS = ("factory", "keys", "targets", "waves", "device-groups", "tokens", "devices")
WITH_EXAMPLES = (
    ("login",),
    ("get",),
    ("factory", "create"),
    ("factory", "set"),
    ("keys", "backup"),
    ("keys", "copy-targets"),
    ("keys", "download"),
    ("keys", "restore"),
    ("keys", "rotate-root"),
    ("keys", "rotate-targets"),
    ("keys", "show-root"),
    ("keys", "sign-file"),
    ("keys", "updates"),
    ("keys", "updates", "add-offline-key"),
    ("keys", "updates", "apply"),
    ("keys", "updates", "delete-offline-key"),
    ("keys", "updates", "export"),
    ("keys", "updates", "extend-expiry"),
    ("keys", "updates", "init"),
    ("keys", "updates", "rotate-offline-key"),
    ("keys", "updates", "rotate-online-key"),
    ("keys", "updates", "set-threshold"),
    ("keys", "updates", "sign"),
    ("targets", "add"),
    ("targets", "list"),
    ("targets", "delete"),
    ("targets", "offline-update"),
    ("targets", "prune"),
    ("tokens", "create"),
    ("tokens", "revoke"),
    ("devices",),
    ("devices", "list"),
    ("devices", "show"),
    ("devices", "revoke"),
    ("devices", "delete"),
    ("device-groups",),
    ("device-groups", "create"),
    ("device-groups", "delete"),
    ("device-groups", "remove"),
    ("device-groups", "show"),
    ("waves", "init"),
    ("waves", "rollout"),
    ("waves", "sign"),
    ("waves", "status"),
    ("waves", "resume"),
    ("webhooks", "add"),
    ("webhooks", "remove"),
    ("webhooks", "test"),
    ("webhooks", "deliveries"),
)


AGENT_WITH_EXAMPLES = (
    ("register",),
    ("run",),
    ("check",),
    ("status",),
    ("install-bundle",),
    ("rotate-credential",),
    ("tuf", "init"),
    ("tuf", "refresh"),
    ("tuf", "download"),
)


SERVER_WITH_EXAMPLES = (("run",), ("rotate-operator-token",))


def _commands_with_examples(group: click.Group) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(path: tuple[str, ...], command: click.Command) -> None:
        if path and "Example" in (command.help or ""):
            found.add(path)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk((*path, name), sub)

    walk((), group)
    return found


def test_every_command_with_examples_is_checked() -> None:
    assert _commands_with_examples(cli) == set(WITH_EXAMPLES)
    assert _commands_with_examples(agent_cli) == set(AGENT_WITH_EXAMPLES)
    assert _commands_with_examples(server_cli) == set(SERVER_WITH_EXAMPLES)


def test_help_exits_zero_and_shows_examples() -> None:
    commands: list[tuple[str, ...]] = [(), *((g,) for g in GROUPS), *WITH_EXAMPLES]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda args: run_cli(*args, "--help"), commands))
    for args, done in zip(commands, results, strict=True):
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.startswith("Usage: tufa"), args
        if args in WITH_EXAMPLES:
            assert "Example" in done.stdout, args
            # Examples are kept verbatim, one per line, not reflowed into a paragraph.
            assert f"\n    tufa {args[0]}" in done.stdout, (args, done.stdout)
    top = results[0].stdout
    for group in (*GROUPS, "login", "get"):
        assert f"  {group} " in top, group


def test_agent_help_exits_zero_and_shows_examples() -> None:
    commands: list[tuple[str, ...]] = [(), ("tuf",), *AGENT_WITH_EXAMPLES]

    def agent_help(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [console_script("tufa-agent"), *args, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(agent_help, commands))
    for args, done in zip(commands, results, strict=True):
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.startswith("Usage: tufa-agent"), args
        if args in AGENT_WITH_EXAMPLES:
            assert f"\n    tufa-agent {args[0]}" in done.stdout, (args, done.stdout)
    for command in ("register", "run", "check", "status", "install-bundle", "tuf"):
        assert f"  {command} " in results[0].stdout, command


def test_server_help_exits_zero_and_shows_examples() -> None:
    for args in [(), *SERVER_WITH_EXAMPLES]:
        done = subprocess.run(
            [console_script("tufa-server"), *args, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.startswith("Usage: tufa-server"), args
        if args:
            assert f"\n    tufa-server {args[0]}" in done.stdout, (args, done.stdout)


@pytest.mark.parametrize(
    "command",
    [
        ("tufa", "get", "/api/v1/factories", "--server", "127.0.0.1:18437"),
        ("tufa", "login", "--server", "127.0.0.1:18437"),
        ("tufa-agent", "register", "--server", "127.0.0.1:18437", "--factory", "acme",
         "--token", "t", "--hardware-id", "rpi4", "--tag", "main", "--root", "root.json"),
    ],
)  # fmt: skip
def test_a_server_url_without_a_scheme_is_refused_naming_the_fix(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    (tmp_path / "root.json").write_text("{}")
    env = {"TUFA_CONFIG": str(tmp_path / "config.json")}
    done = subprocess.run(
        [console_script(command[0]), *command[1:]],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "'127.0.0.1:18437' has no scheme" in done.stderr
    assert "http://127.0.0.1:18437" in done.stderr
    assert not (tmp_path / "config.json").exists()
