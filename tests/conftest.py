"""Fixtures: real tufa-server processes on loopback, on SQLite and on PostgreSQL.

PostgreSQL is the one at 127.0.0.1:5432 (trust auth). Each test session gets its own
database there, dropped at the end. With CI=true an unreachable PostgreSQL fails the
run instead of skipping its half of the suite.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import Factory, Server, create_factory
from tufa.demo.local_server import LocalServer

# Settings the CLI or a crash point would read from the environment of whoever runs the
# tests; each test sets what it needs.
TUFA_SETTINGS = ("TUFA_CONFIG", "TUFA_SERVER", "TUFA_FACTORY", "TUFA_TOKEN", "TUFA_CRASH_AT")
PG_ADMIN_URL = os.environ.get("TUFA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(autouse=True)
def _no_inherited_cli_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TUFA_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def _pg_database(name: str) -> str:
    """Create database `name` and return its SQLAlchemy URL."""
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"


def _drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def make_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str | None]]:
    """Make a fresh database for a backend: None (SQLite in the data dir) or a PG URL."""
    created: list[str] = []

    def make(backend: str) -> str | None:
        if backend == "sqlite":
            return None
        name = f"tufa_test_{secrets.token_hex(6)}"
        url = _pg_database(name)
        created.append(name)
        return url

    yield make
    for name in created:
        _drop_pg_database(name)


# Servers a test module started (all but the shared `server`s), stopped when it ends:
# each PostgreSQL server holds its connections while it runs, and PostgreSQL takes 100.
_module_servers: list[LocalServer] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_the_modules_servers() -> Iterator[None]:
    yield
    while _module_servers:
        _module_servers.pop().stop()


@pytest.fixture(scope="session")
def make_server(
    tmp_path_factory: pytest.TempPathFactory, make_db_url: Callable[[str], str | None]
) -> Iterator[Callable[..., Server]]:
    """Start a tufa-server process: make_server(backend, extra_args=(...), env={...}). It
    runs until the end of the test module (of the session, for_session=True)."""
    started: list[LocalServer] = []

    def make(
        backend: str = "sqlite",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        db_url: str | None = None,
        data_dir: Path | None = None,
        *,
        for_session: bool = False,
    ) -> Server:
        data_dir = data_dir or tmp_path_factory.mktemp(f"server-{backend}") / "data"
        local = LocalServer(
            data_dir,
            operator_token=f"tufa_op_{secrets.token_urlsafe(32)}",
            db_url=db_url or make_db_url(backend),
            extra_args=extra_args,
            env=env,
        )
        local.start()
        started.append(local)
        if not for_session:
            _module_servers.append(local)
        return Server(local, backend)

    yield make
    for local in started:
        local.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Server:
    """One shared server per backend; tests isolate themselves with their own factory."""
    backend: str = request.param
    return make_server(backend, for_session=True)


@pytest.fixture
def factory(server: Server) -> Factory:
    """A fresh factory on the shared server, with its admin token."""
    return create_factory(server)
