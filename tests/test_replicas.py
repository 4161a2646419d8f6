"""Several server replicas on one PostgreSQL database act as one server."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.helpers import Factory, Server, create_factory

ROLES = ("root", "timestamp", "snapshot", "targets")


def _versions(factory: Factory, server: Server, channel: str) -> dict[str, int]:
    shown = server.request("GET", factory.path(), factory.admin_token).json()
    return {role: shown["channels"][channel][role]["version"] for role in ROLES}


def test_replica_without_the_master_key_refuses_to_start(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None], tmp_path: Path
) -> None:
    db_url = make_db_url("postgres")
    make_server("postgres", db_url=db_url)
    with pytest.raises(RuntimeError, match=r"master key file .* not found"):
        make_server("postgres", db_url=db_url)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(secrets.token_bytes(32))
    other_key.chmod(0o600)
    with pytest.raises(RuntimeError, match=r"master key .* is not the one this database"):
        make_server("postgres", db_url=db_url, extra_args=("--master-key-file", str(other_key)))


def test_replicas_share_state_and_resign_without_conflict(
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
) -> None:
    db_url = make_db_url("postgres")
    clock = tmp_path / "clock-offset"
    clock.write_text("0")
    args = ("--resign-interval", "1s")
    env = {"TUFA_CLOCK_OFFSET_FILE": str(clock)}
    first = make_server("postgres", extra_args=args, env=env, db_url=db_url)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", extra_args=(*args, *shared_key), env=env, db_url=db_url)
    second.local.operator_token = first.operator_token  # the first start chose it

    # Factories created through both replicas at once: none lost, none duplicated.
    with ThreadPoolExecutor(max_workers=8) as pool:
        made = list(
            pool.map(lambda i: create_factory((first, second)[i % 2], f"rep-{i}"), range(8))
        )
    listed = second.request("GET", "/api/v1/factories", first.operator_token).json()
    assert {f"rep-{i}" for i in range(8)} <= {item["name"] for item in listed}

    factory = made[0]
    body = first.request(
        "GET", factory.path("/repo/ci/metadata/timestamp.json"), factory.admin_token
    )
    again = second.request(
        "GET", factory.path("/repo/ci/metadata/timestamp.json"), factory.admin_token
    )
    assert body.content == again.content

    # Two days later both replicas' re-signers race for every channel: the channel lock
    # lets one win, the other finds nothing due, and both serve the same newer metadata.
    clock.write_text(str(2 * 86400))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(_versions(f, first, "ci")["timestamp"] > 1 for f in made):
            break
        time.sleep(0.2)
    for f in made:
        for channel in ("ci", "prod"):
            assert _versions(f, first, channel) == _versions(f, second, channel)
            assert _versions(f, first, channel)["snapshot"] >= 1

    for server in (first, second):
        assert not re.search(r"Traceback|IntegrityError|ERROR", server.local.log())

    updater = factory.updater("ci", tmp_path / "ci")
    updater._trusted_set.reference_time = datetime.now(UTC) + timedelta(days=2)
    updater.refresh()
    assert updater._trusted_set.timestamp.version > 1
