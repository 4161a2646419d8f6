"""Credentials have a life cycle: devices revoked, deleted and rotating their own
credential; the operator token rotated; a weak chosen operator token refused.

Everything runs against real `tufa-server` processes on both databases, with the real
`tufa` CLI for what an admin types; several server replicas share one PostgreSQL
database where a change must hold on all of them at once. What a device is refused
is refused as an attack would be: the request fails with the reason, and the database
is left as it was. The agent's side (`tufa-agent`) is in test_agent_credentials.py.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import BACKENDS
from tests.helpers import (
    Factory,
    Server,
    assert_error,
    cli_env,
    create_factory,
    db_rows,
    download_archive,
    dump_all_tables,
    run_cli,
    send,
)
from tests.test_device_reports import create_wave, event, installed, publish_build, report
from tufa.demo.local_server import LocalServer, console_script
from tufa.server.db import retired_credentials, tokens
from tufa.server.principals import OPERATOR_SCOPE

REVOKED = "credential_revoked"


def tufa(env: dict[str, str], *args: str) -> str:
    done = run_cli(*args, env=env)
    assert done.returncode == 0, f"tufa {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tufa_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(tufa(env, *args, "--json"))


def device_requests(factory: Factory, channel: str) -> list[tuple[str, str, Any]]:
    """Every request a device makes: its metadata, its targets, reports, its credential."""
    repo = f"/repo/{channel}"
    body = {"installed": None, "events": [event("e-1")]}
    return [
        ("GET", factory.path(f"{repo}/metadata/timestamp.json"), None),
        ("GET", factory.path(f"{repo}/metadata/1.root.json"), None),
        ("GET", factory.path(f"{repo}/targets/{'ab' * 32}.rpi4-image-42"), None),
        ("POST", factory.path("/device-reports"), body),
        ("GET", factory.path("/device-credential"), None),
        ("POST", factory.path("/device-credential"), None),
    ]


def assert_refused_everywhere(factory: Factory, credential: str, channel: str, why: str) -> None:
    """Every device request with `credential` gets 401 `credential_revoked` saying `why`,
    and changes nothing."""
    before = dump_all_tables(factory.server)
    for method, path, body in device_requests(factory, channel):
        response = send(factory.server, method, path, credential, json=body)
        assert_error(response, 401, REVOKED, why)
    assert dump_all_tables(factory.server) == before


def rotate(factory: Factory, credential: str) -> str:
    """`POST /device-credential`, as `tufa-agent rotate-credential` sends it."""
    response = send(factory.server, "POST", factory.path("/device-credential"), credential)
    assert response.status_code == 201, response.text
    new: str = response.json()["credential"]
    assert new.startswith("tufad_")
    assert new != credential
    return new


def reads(factory: Factory, credential: str, channel: str = "ci") -> int:
    path = factory.path(f"/repo/{channel}/metadata/timestamp.json")
    return send(factory.server, "GET", path, credential).status_code


def shown(factory: Factory, device: str) -> dict[str, Any]:
    response = send(factory.server, "GET", factory.path(f"/devices/{device}"), factory.admin_token)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


# -- revoking a device ------------------------------------------------------------------


def test_a_revoked_device_is_refused_at_once_and_keeps_its_record(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    device = factory.register_device("prod", name="field-unit-1")
    neighbour = factory.register_device("prod", name="field-unit-2")
    credential = device["credential"]
    assert reads(factory, credential, "prod") == 200
    # A rotation it has not used yet when the revocation comes: that credential dies too.
    pending = rotate(factory, credential)

    out = tufa(env, "devices", "revoke", "field-unit-1")
    assert f"Revoked the credential of field-unit-1 ({device['id']})" in out, out
    assert f"tufa devices delete {device['id']}" in out, out

    for secret in (credential, pending):
        assert_refused_everywhere(factory, secret, "prod", "was revoked on")
    # Nobody else is touched.
    assert reads(factory, neighbour["credential"], "prod") == 200

    record = tufa_json(env, "devices", "show", device["id"])
    assert (record["id"], record["name"]) == (device["id"], "field-unit-1")
    assert record["revoked_at"] is not None
    assert f"credential: revoked {record['revoked_at']}" in tufa(
        env, "devices", "show", "field-unit-1"
    )
    listed = {d["name"]: d for d in tufa_json(env, "devices", "list")}
    assert listed["field-unit-1"]["revoked_at"] == record["revoked_at"]
    assert listed["field-unit-2"]["revoked_at"] is None
    table = tufa(env, "devices", "list")
    assert [line.split()[-2] for line in table.splitlines() if "field-unit" in line] == [
        "revoked",
        "active",
    ], table

    # Revoking again changes nothing; a device that does not exist is named.
    again = tufa_json(env, "devices", "revoke", "field-unit-1")
    assert again["revoked_at"] == record["revoked_at"]
    missing = run_cli("devices", "revoke", "field-unit-9", env=env)
    assert missing.returncode == 1
    assert "no device 'field-unit-9' in this factory" in missing.stderr, missing.stderr


def test_an_id_wins_over_a_name_that_looks_like_it(factory: Factory, tmp_path: Path) -> None:
    """A device named like another device's id cannot be revoked (or deleted) in its place."""
    env = cli_env(factory, tmp_path / "config.json")
    target = factory.register_device("ci")
    impostor = factory.register_device("ci", name=target["id"])
    tufa(env, "devices", "revoke", target["id"])
    assert shown(factory, target["id"])["revoked_at"] is not None
    assert reads(factory, impostor["credential"]) == 200
    assert_error(
        send(factory.server, "GET", factory.path("/repo/ci/metadata/timestamp.json"),
             target["credential"]),
        401, REVOKED, "revoked",
    )  # fmt: skip


# -- deleting a device ------------------------------------------------------------------


def test_a_deleted_device_is_gone_and_its_name_registers_a_new_device(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    archive = tmp_path / "keys.tgz"
    download_archive(factory, archive)
    unit = factory.register_device("prod", name="unit-a")
    factory.register_device("prod", name="unit-b")
    publish_build(factory, "42")
    create_wave(factory, archive, "release-42", "42")
    tufa(env, "device-groups", "create", "canaries")
    tufa(env, "device-groups", "add", "canaries", "unit-a")
    tufa(env, "waves", "rollout", "release-42", "canaries")
    report(
        factory, unit["credential"], installed("42"), [event("a-1"), event("a-2", "rolled-back")]
    )
    report(factory, unit["credential"], installed("42"), [event("a-3")])

    def counts() -> tuple[int, int, int, int]:
        (wave,) = tufa_json(env, "waves", "status", "release-42")
        keys = ("devices_served", "devices_of_tag", "devices_installed", "devices_failed")
        return tuple(wave[k] for k in keys)

    def canaries() -> list[str]:
        (group,) = tufa_json(env, "device-groups", "list")
        return list(group["devices"])

    assert counts() == (1, 2, 1, 0)
    assert canaries() == [unit["id"]]

    out = tufa(env, "devices", "delete", "unit-a")
    assert f"Deleted unit-a ({unit['id']})" in out, out
    assert "3 event(s) deleted; left groups: canaries." in out, out

    # Gone for good: nothing of it is left but the digest that explains the refusal.
    assert_refused_everywhere(factory, unit["credential"], "prod", "'unit-a' was deleted")
    after = dump_all_tables(factory.server)
    for name, rows in after.items():
        if name != "retired_credentials":
            assert not any(unit["id"] in row for row in rows), f"{name} still names it"
    assert counts() == (0, 1, 0, 0)
    assert canaries() == []
    assert [d["name"] for d in tufa_json(env, "devices", "list")] == ["unit-b"]
    missing = run_cli("devices", "delete", unit["id"], env=env)
    assert missing.returncode == 1
    assert f"no device {unit['id']!r}" in missing.stderr, missing.stderr

    # The same name again: a new device, with no history, and it says whom it replaces.
    again = factory.register_device("prod", name="unit-a")
    assert again["id"] != unit["id"]
    record = tufa_json(env, "devices", "show", "unit-a")
    assert record["id"] == again["id"]
    assert (record["events"], record["installed_version"], record["last_report_at"]) == (
        [],
        None,
        None,
    )
    assert [e["id"] for e in record["earlier_devices"]] == [unit["id"]]
    text = tufa(env, "devices", "show", "unit-a")
    assert f"replaces: deleted device {unit['id']} of the same name" in text, text
    listed = tufa_json(env, "devices", "list")
    assert [(d["name"], d["id"]) for d in listed if d["name"] == "unit-a"] == [
        ("unit-a", again["id"])
    ]
    # Not a resurrection: not in the old group, not served the wave, nothing installed;
    # and the old credential still does not work.
    assert canaries() == []
    assert counts() == (0, 2, 0, 0)
    assert reads(factory, unit["credential"], "prod") == 401
    assert reads(factory, again["credential"], "prod") == 200
    tufa(env, "waves", "rollout", "release-42", "--uuids", "unit-a")
    assert counts() == (1, 2, 0, 0)


# -- a device rotating its credential ---------------------------------------------------


def test_a_rotated_credential_takes_over_at_its_first_use(factory: Factory) -> None:
    device = factory.register_device("ci", name="rotating-1")
    old = device["credential"]
    since = shown(factory, "rotating-1")["credential_since"]
    assert since == device["created_at"]

    new = rotate(factory, old)
    # Until the new one is used, the old one works: a device that lost the answer (a
    # power cut before it saved the new one) still has a working credential.
    assert shown(factory, "rotating-1")["credential_rotation_pending"] is True
    assert reads(factory, old) == 200
    assert reads(factory, new) == 200  # its first use (a metadata read, like any request)
    record = shown(factory, "rotating-1")
    assert record["credential_rotation_pending"] is False
    assert record["credential_since"] >= since
    assert_refused_everywhere(factory, old, "ci", "it was replaced on")
    assert_error(
        send(factory.server, "GET", factory.path("/device-credential"), old),
        401, REVOKED, "`tufa devices revoke rotating-1`",
    )  # fmt: skip

    # Two rotations whose answers were lost: only the last one issued can ever work.
    lost = rotate(factory, new)
    last = rotate(factory, new)
    assert_refused_everywhere(factory, lost, "ci", "before it was ever used")
    confirmed = send(factory.server, "GET", factory.path("/device-credential"), last)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["id"] == device["id"]
    assert confirmed.json()["credential_rotation_pending"] is False
    assert_refused_everywhere(factory, new, "ci", "it was replaced on")
    assert reads(factory, last) == 200


def test_concurrent_first_uses_of_a_rotated_credential_all_pass_and_retire_the_old_once(
    factory: Factory,
) -> None:
    device = factory.register_device("prod")
    path = factory.path("/repo/prod/metadata/timestamp.json")
    credential, rounds = device["credential"], 5
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(rounds):
            new = rotate(factory, credential)
            first_uses = [pool.submit(send, factory.server, "GET", path, new) for _ in range(8)]
            assert [f.result().status_code for f in first_uses] == [200] * 8
            assert reads(factory, credential, "prod") == 401
            credential = new
    retired = db_rows(
        factory.server,
        select(retired_credentials.c.reason).where(retired_credentials.c.device_id == device["id"]),
    )
    assert [r.reason for r in retired] == ["replaced"] * rounds


# -- waves and revoked devices ----------------------------------------------------------


def test_waves_neither_count_nor_roll_out_to_revoked_devices(
    factory: Factory, tmp_path: Path
) -> None:
    env = cli_env(factory, tmp_path / "config.json")
    archive = tmp_path / "keys.tgz"
    download_archive(factory, archive)
    for name in ("a", "b", "c"):
        factory.register_device("prod", name=name)
    publish_build(factory, "42")
    create_wave(factory, archive, "release-42", "42")

    def served() -> tuple[int, int]:
        (wave,) = tufa_json(env, "waves", "status", "release-42")
        return wave["devices_served"], wave["devices_of_tag"]

    tufa(env, "devices", "revoke", "a")
    assert served() == (0, 2)
    rolled = tufa_json(env, "waves", "rollout", "release-42", "--limit", "1")
    assert [d["name"] for d in rolled["devices"]] == ["b"]  # not a, first by name
    assert served() == (1, 2)
    tufa(env, "devices", "revoke", "b")
    assert served() == (0, 1)
    tufa(env, "waves", "complete", "release-42")
    assert served() == (1, 1)


# -- server replicas --------------------------------------------------------------------


def test_every_change_holds_at_once_on_every_replica(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None], tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL database: what one changes, the other enforces on
    the very next request (no cache, no delay)."""
    db_url = make_db_url("postgres")
    first = make_server("postgres", db_url=db_url)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", db_url=db_url, extra_args=shared_key)
    second.local.operator_token = first.operator_token  # the first start chose it
    via_first = create_factory(first)
    via_second = Factory(second, via_first.name, via_first.admin_token)
    revoked, deleted, rotating = (via_first.register_device("prod") for _ in range(3))
    for device in (revoked, deleted, rotating):
        assert reads(via_second, device["credential"], "prod") == 200

    tufa(cli_env(via_first, tmp_path / "first.json"), "devices", "revoke", revoked["name"])
    assert_error(
        send(second, "GET", via_second.path("/repo/prod/metadata/timestamp.json"),
             revoked["credential"]),
        401, REVOKED, "was revoked on",
    )  # fmt: skip
    tufa(cli_env(via_second, tmp_path / "second.json"), "devices", "delete", deleted["name"])
    assert reads(via_first, deleted["credential"], "prod") == 401

    new = rotate(via_first, rotating["credential"])
    assert reads(via_second, new, "prod") == 200  # adopted through the other replica
    assert reads(via_first, rotating["credential"], "prod") == 401

    # The operator token, by the API of one replica: the other refuses the old one.
    old = first.operator_token
    replaced = send(second, "POST", "/api/v1/operator-token", old)
    assert replaced.status_code == 201, replaced.text
    assert_error(send(first, "GET", "/api/v1/factories", old), 401, "unauthorized", "revoked")
    operator = replaced.json()["token"]
    assert send(first, "GET", "/api/v1/factories", operator).status_code == 200
    # ...and by the command, with both replicas running.
    done = server_command("rotate-operator-token", "--db", db_url or "", "--json")
    assert done.returncode == 0, done.stderr
    newest = json.loads(done.stdout)["token"]
    for replica in (first, second):
        assert send(replica, "GET", "/api/v1/factories", operator).status_code == 401
        assert send(replica, "GET", "/api/v1/factories", newest).status_code == 200
    first.local.operator_token = second.local.operator_token = newest


# -- the operator token -----------------------------------------------------------------


def server_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("tufa-server"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def live_operator_tokens(server: Server) -> int:
    live = tokens.c.scopes == OPERATOR_SCOPE, tokens.c.revoked_at.is_(None)
    return len(db_rows(server, select(tokens.c.id).where(*live)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_operator_token_rotates_by_api_and_by_command(
    make_server: Callable[..., Server], backend: str
) -> None:
    server = make_server(backend)  # its own: the shared servers' token must stay
    first = server.operator_token
    replaced = send(server, "POST", "/api/v1/operator-token", first)
    assert replaced.status_code == 201, replaced.text
    second = replaced.json()["token"]
    assert second.startswith("tufa_")
    assert second != first
    refused = send(server, "GET", "/api/v1/factories", first)
    assert_error(refused, 401, "unauthorized", "when a new one replaced it")
    assert send(server, "GET", "/api/v1/factories", second).status_code == 200

    # The command, while the server runs: the token is printed once, the old one dies.
    where = (
        ("--data-dir", str(server.local.data_dir))
        if backend == "sqlite"
        else ("--db", server.local.db_url)
    )
    done = server_command("rotate-operator-token", *where)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "New operator token (shown once; the old one no longer works, on any replica):"
    ), done.stdout
    third = lines[1].strip()
    assert send(server, "GET", "/api/v1/factories", second).status_code == 401
    assert send(server, "GET", "/api/v1/factories", third).status_code == 200
    server.local.operator_token = third
    create_factory(server)  # what the operator token is for
    assert live_operator_tokens(server) == 1

    # Refused for anyone else, changing nothing (the matrix covers every caller).
    admin = create_factory(server).admin_token
    before = dump_all_tables(server)
    assert_error(send(server, "POST", "/api/v1/operator-token", admin), 403, "forbidden")
    assert dump_all_tables(server) == before


def test_rotate_operator_token_needs_a_database_that_has_one(tmp_path: Path) -> None:
    done = server_command("rotate-operator-token", "--data-dir", str(tmp_path / "nothing"))
    assert done.returncode == 1
    assert f"no database in {tmp_path / 'nothing'}" in done.stderr, done.stderr
    assert not (tmp_path / "nothing").exists()


def start_refused(data_dir: Path, token: str) -> str:
    """Start a server whose TUFA_OPERATOR_TOKEN is `token`; it must exit; its log."""
    local = LocalServer(data_dir, operator_token=token)
    with pytest.raises(RuntimeError, match="exited with status 1"):
        local.start()
    return local.log()


@pytest.mark.parametrize(
    "token",
    ["tufa_short", "x" * 31, f"tufa_{'y' * 20} {'z' * 20}", "tufa_" + "ä" * 40, "t" * 257],
    ids=["short", "31-characters", "a-space", "not-ascii", "257-characters"],
)
def test_a_weak_chosen_operator_token_is_refused_at_start(tmp_path: Path, token: str) -> None:
    log = start_refused(tmp_path / "data", token)
    assert "cannot start: TUFA_OPERATOR_TOKEN must be 32 to 256 printable ASCII" in log, log
    assert f"it has {len(token)} characters" in log, log
    assert token not in log  # a secret is never echoed
    assert not (tmp_path / "data" / "tufa.db").exists()


def test_the_chosen_operator_token_length_is_checked_at_every_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    exactly = "k" * 32
    with LocalServer(data_dir, operator_token=exactly) as local:
        assert send_to(local, exactly).status_code == 200
    # A later start with a weak one in its environment is refused too, and says how to
    # replace the stored token if that is the weak one.
    log = start_refused(data_dir, secrets.token_hex(8))
    assert "tufa-server rotate-operator-token" in log, log
    with LocalServer(data_dir, operator_token=exactly) as local:
        assert send_to(local, exactly).status_code == 200


def send_to(local: LocalServer, token: str) -> Any:
    return send(Server(local, "sqlite"), "GET", "/api/v1/factories", token)
