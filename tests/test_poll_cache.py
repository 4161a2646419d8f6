"""The poll path's cache (ADR 0014): two real server processes share one database, and a
change made through one holds at once on the other, whose cache knew the old state.

Each test warms the second process's cache with two polls first (the first poll fills
it, the second is answered from it), then changes something through the first process,
then checks the very next poll of the second. On SQLite both processes use one data
directory; on PostgreSQL, one database.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.pool import NullPool

from tests.conftest import BACKENDS
from tests.helpers import Factory, Server, assert_error, create_factory
from tests.test_device_reports import publish_build
from tests.test_operations import scrape, value
from tufa.server.db import devices, factories

TIMESTAMP = "/repo/ci/metadata/timestamp.json"
NOTIFIED = "postgres-notify"
# Headers that differ between two answers of the same bytes.
_PER_ANSWER = {"date", "server"}


@pytest.fixture(scope="module", params=[*BACKENDS, NOTIFIED])
def pair(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
) -> tuple[Server, Server]:
    """Two server processes on one database; on PostgreSQL also with the stamps kept
    from notifications (`--poll-invalidation notify`), where each test holds too."""
    if request.param in ("postgres", NOTIFIED):
        db_url = make_db_url("postgres")
        notify = ("--poll-invalidation", "notify") if request.param == NOTIFIED else ()
        first = make_server("postgres", db_url=db_url, extra_args=notify)
        shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
        second = make_server("postgres", db_url=db_url, extra_args=(*shared_key, *notify))
    else:
        first = make_server("sqlite")
        second = make_server("sqlite", data_dir=first.local.data_dir)
    second.local.operator_token = first.operator_token  # the first start chose it
    return first, second


def _factories(pair: tuple[Server, Server]) -> tuple[Factory, Factory]:
    """A new factory, as seen through the first process and through the second."""
    made = create_factory(pair[0])
    return made, Factory(pair[1], made.name, made.admin_token)


def _poll(factory: Factory, secret: str | None, etag: str | None = None) -> httpx.Response:
    headers = {"If-None-Match": etag} if etag else {}
    return factory.request("GET", TIMESTAMP, secret or "", headers=headers)


def _warm(factory: Factory, secret: str | None) -> httpx.Response:
    """Two polls: the first fills the process's cache, the second is answered from it."""
    first = _poll(factory, secret)
    assert first.status_code == 200, first.text
    second = _poll(factory, secret)
    assert second.status_code == 200, second.text
    assert second.content == first.content
    return second


def _version(response: httpx.Response) -> int:
    version: int = json.loads(response.content)["signed"]["version"]
    return version


def _sql(server: Server, *statements: Any) -> None:
    """Statements in one transaction on the servers' database, bypassing the API."""
    engine = create_engine(server.local.db_url, poolclass=NullPool)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)
    engine.dispose()


def _shown(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in _PER_ANSWER}
    return response.status_code, response.content, headers


def test_cached_answers_are_the_full_handlers(pair: tuple[Server, Server]) -> None:
    _, there = _factories(pair)
    device = there.register_device("ci")["credential"]
    token = there.token("read")
    for secret in (device, token):
        filled, cached = _poll(there, secret), _poll(there, secret)
        assert _shown(cached) == _shown(filled)
        assert filled.headers["cache-control"] == "private, no-cache"
        etag = filled.headers["etag"]
        first_304, cached_304 = _poll(there, secret, etag), _poll(there, secret, etag)
        assert first_304.status_code == 304
        assert _shown(cached_304) == _shown(first_304)
        assert "content-length" not in cached_304.headers or cached_304.content == b""
        # Versioned files too, from the immutable cache once read.
        path = "/repo/ci/metadata/1.root.json"
        assert _shown(there.request("GET", path, secret)) == _shown(
            there.request("GET", path, secret)
        )
    # A device may not read the other channel, cached or not.
    for _ in range(2):
        refused = there.request("GET", "/repo/prod/metadata/timestamp.json", device)
        assert_error(refused, 403, "forbidden", "follows the ci channel")


def test_device_revoked_through_one_process_is_refused_by_the_other_at_once(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    revoked, deleted = here.register_device("ci"), here.register_device("ci")
    for device in (revoked, deleted):
        _warm(there, device["credential"])
    done = here.request("POST", f"/devices/{revoked['name']}/revoke")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, revoked["credential"]), 401, "credential_revoked", "revoked on")
    # The other device is unaffected, and still answered.
    _warm(there, deleted["credential"])
    done = here.request("DELETE", f"/devices/{deleted['name']}")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, deleted["credential"]), 401, "credential_revoked", "was deleted")


def test_token_revoked_through_one_process_is_refused_by_the_other_at_once(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    made = here.request("POST", "/tokens", json={"scopes": ["read"]})
    assert made.status_code == 201, made.text
    _warm(there, made.json()["token"])
    done = here.request("DELETE", f"/tokens/{made.json()['id']}")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, made.json()["token"]), 401, "unauthorized", "revoked")


def test_rotated_credential_through_one_process_holds_on_the_other(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    old = here.register_device("ci")["credential"]
    _warm(there, old)
    rotated = here.request("POST", "/device-credential", old)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["credential"]
    _warm(there, old)  # valid until the new one is used once
    _warm(here, new)  # its first use, through the first process, retires the old one
    for factory in (there, here):
        assert_error(_poll(factory, old), 401, "credential_revoked", "replaced")
    _warm(there, new)


def test_anonymous_reads_turned_off_through_one_process_end_on_the_other(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    assert here.request("PATCH", "", json={"anonymous_read": True}).status_code == 200
    public = _warm(there, None)
    assert public.headers["cache-control"] == "public, no-cache"
    assert here.request("PATCH", "", json={"anonymous_read": False}).status_code == 200
    assert_error(_poll(there, None), 401, "unauthorized", "needs a token")


def test_timestamp_published_through_one_process_is_served_by_the_other_at_once(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    device = here.register_device("ci")["credential"]
    before = _warm(there, device)
    publish_build(here, "1.0.0")
    after = _poll(there, device)
    assert after.status_code == 200
    assert _version(after) > _version(before)
    assert after.content == _poll(here, device).content
    # The old ETag no longer matches: the new bytes come back, not a 304.
    revalidated = _poll(there, device, before.headers["etag"])
    assert revalidated.status_code == 200
    assert revalidated.content == after.content


def test_the_cache_is_used_and_only_the_generation_guards_it(
    pair: tuple[Server, Server],
) -> None:
    """A revocation written without its generation bump (what no writer can do: the
    triggers bump it) goes unseen by a process that cached the credential, and is seen
    once the generation moves. This shows the tests above went through the cache."""
    here, there = _factories(pair)
    device = here.register_device("ci")
    _warm(there, device["credential"])
    factory_id, generation = _row(pair[0], here.name)
    _sql(
        pair[0],
        update(devices).where(devices.c.id == device["id"]).values(revoked_at=datetime.now(UTC)),
        update(factories).where(factories.c.id == factory_id).values(auth_generation=generation),
    )
    assert _poll(there, device["credential"]).status_code == 200  # served from the cache
    bump = factories.c.auth_generation + 1
    _sql(
        pair[0], update(factories).where(factories.c.id == factory_id).values(auth_generation=bump)
    )
    assert_error(_poll(there, device["credential"]), 401, "credential_revoked")


def test_device_reports_leave_the_cache_valid(pair: tuple[Server, Server]) -> None:
    """What a device reports changes no generation: polls stay cached."""
    here, _ = _factories(pair)
    device = here.register_device("ci")
    before = _row(pair[0], here.name)
    report: dict[str, Any] = {"installed": None, "events": []}
    done = here.request("POST", "/device-reports", device["credential"], json=report)
    assert done.status_code in (200, 201), done.text
    assert _row(pair[0], here.name) == before


def _row(server: Server, name: str) -> tuple[int, int]:
    engine = create_engine(server.local.db_url, poolclass=NullPool)
    with engine.connect() as conn:
        row = conn.execute(
            select(factories.c.id, factories.c.auth_generation).where(factories.c.name == name)
        ).one()
    engine.dispose()
    return int(row.id), int(row.auth_generation)


def test_a_lost_database_connection_falls_back_then_reconnects(
    pair: tuple[Server, Server],
) -> None:
    """PostgreSQL drops every connection of the servers (a restart, a failover): polls
    are still answered, by the full handler until the generation query reconnects."""
    if pair[0].backend != "postgres":
        pytest.skip("SQLite has no connection to lose")
    here, there = _factories(pair)
    device = here.register_device("ci")["credential"]
    expected = _warm(there, device).content
    _sql(
        pair[0],
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ),
    )
    for _ in range(3):
        answer = _poll(there, device)
        assert answer.status_code == 200, answer.text
        assert answer.content == expected
    # The generation query's connection was lost, and said so once.
    assert there.server.local.log().count("poll cache: cannot read factory generations") == 1


def test_after_a_publish_one_poll_reads_the_new_file_and_the_others_wait_for_it(
    pair: tuple[Server, Server],
) -> None:
    """A publish makes every cached poll of the view miss at once. A burst of polls
    arriving then: one goes to the database and fills the cache, the others wait for it,
    and every one is answered the new timestamp. The database is made slow to answer
    (metadata_files locked for two seconds, long enough on a loaded machine), so that
    the whole burst arrives while the first read is under way."""
    first, server = pair
    if server.backend != "postgres":
        pytest.skip("SQLite cannot make a reader wait (WAL)")
    here, there = _factories(pair)
    device = there.register_device("ci")["credential"]
    publish_build(here, "1")
    old = _version(_warm(there, device))
    burst = 40

    async def polls() -> list[httpx.Response]:
        url = f"{server.url}{there.path(TIMESTAMP)}"
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
        headers = {"Authorization": f"Bearer {device}"}
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=30) as client:
            # Open the connections first, so that the burst below arrives at once.
            await asyncio.gather(*(client.get(url) for _ in range(burst)))
            publish_build(here, "2")
            with psycopg.connect(first.local.db_url.replace("+psycopg", "")) as lock:
                lock.execute("LOCK TABLE metadata_files IN ACCESS EXCLUSIVE MODE")
                answers = asyncio.gather(*(client.get(url) for _ in range(burst)))
                await asyncio.sleep(2)
            return await answers

    before = scrape(server)
    answers = asyncio.run(polls())
    after = scrape(server)
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert _version(answers[0]) > old

    def refills(outcome: str) -> float:
        return value(after, "tufa_poll_refills_total", outcome=outcome) - value(
            before, "tufa_poll_refills_total", outcome=outcome
        )

    assert (refills("led"), refills("waited")) == (1, burst - 1)
