"""`--poll-invalidation notify`: factory stamps kept from PostgreSQL's notifications.

tests/test_poll_cache.py runs every cross-process guarantee in this mode too. Here:
that the stamps really are kept (no read per poll, only the notification guards them),
and that a lost listening connection costs no guarantee: until it listens again, every
poll reads the stamp, as without the option.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.helpers import Factory, Server, assert_error, create_factory
from tests.test_poll_cache import NOTIFIED, _factories, _poll, _sql, _warm
from tufa.demo.local_server import console_script
from tufa.server.poll_notify import BEAT_TIMEOUT_SECONDS, listener_name


@pytest.fixture(scope="module")
def pair(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None]
) -> tuple[Server, Server]:
    db_url = make_db_url("postgres")
    notify = ("--poll-invalidation", "notify")
    first = make_server("postgres", db_url=db_url, extra_args=notify)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", db_url=db_url, extra_args=(*shared_key, *notify))
    second.local.operator_token = first.operator_token
    return first, second


def _listener(server: Server) -> str:
    """The condition on pg_stat_activity that finds `server`'s listening connection."""
    assert server.local.process is not None
    return f"application_name = '{listener_name(server.local.process.pid)}'"


def _listening(server: Server) -> bool:
    engine = create_engine(server.local.db_url, poolclass=NullPool)
    with engine.connect() as conn:
        query = f"SELECT count(*) FROM pg_stat_activity WHERE {_listener(server)}"  # noqa: S608
        count = conn.execute(text(query)).scalar_one()
    engine.dispose()
    return bool(count)


def _warm_listening(server: Server, factory: Factory, *credentials: str) -> None:
    """Polls that start `server` listening (it starts at its first poll), then fill its
    cache with stamps read while it listens."""
    for credential in credentials:
        _warm(factory, credential)
    deadline = time.monotonic() + 10
    while not _listening(server):
        assert time.monotonic() < deadline, "the server does not listen for changes"
        time.sleep(0.05)
    for credential in credentials:
        _warm(factory, credential)


def test_only_the_notification_guards_a_kept_stamp(pair: tuple[Server, Server]) -> None:
    """With the notification switched off, a revocation through one process goes unseen
    by the other, which keeps answering from what it remembered: so the stamps are kept
    and no poll reads them. Switched on again, the next revocation is seen at once."""
    assert NOTIFIED  # the same mode test_poll_cache.py runs everything in
    here, there = _factories(pair)
    unseen, seen = here.register_device("ci"), here.register_device("ci")
    _warm_listening(pair[1], there, unseen["credential"], seen["credential"])
    _sql(pair[0], text("ALTER TABLE factories DISABLE TRIGGER notify_factory_stamp"))
    try:
        done = here.request("POST", f"/devices/{unseen['name']}/revoke")
        assert done.status_code == 200, done.text
        assert _poll(there, unseen["credential"]).status_code == 200  # from memory
    finally:
        _sql(pair[0], text("ALTER TABLE factories ENABLE TRIGGER notify_factory_stamp"))
    done = here.request("POST", f"/devices/{seen['name']}/revoke")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, seen["credential"]), 401, "credential_revoked")
    assert_error(_poll(there, unseen["credential"]), 401, "credential_revoked")


def test_a_lost_listener_reads_every_stamp_until_it_listens_again(
    pair: tuple[Server, Server],
) -> None:
    here, there = _factories(pair)
    first, second = here.register_device("ci"), here.register_device("ci")
    _warm_listening(pair[1], there, first["credential"], second["credential"])
    lose = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
    _sql(pair[0], text(lose + _listener(pair[1])))
    # A revocation right after the loss: no notification can tell of it.
    done = here.request("POST", f"/devices/{first['name']}/revoke")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, first["credential"]), 401, "credential_revoked")
    assert _poll(there, second["credential"]).status_code == 200
    _warm_listening(pair[1], there, second["credential"])  # listening again, by itself
    done = here.request("POST", f"/devices/{second['name']}/revoke")
    assert done.status_code == 200, done.text
    assert_error(_poll(there, second["credential"]), 401, "credential_revoked")
    log = there.server.local.log()
    assert "lost the connection listening for factory changes" in log


def test_notify_is_refused_on_sqlite_before_anything_is_created(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = subprocess.run(
        [
            console_script("tufa-server"),
            "run",
            "--data-dir",
            str(data),
            "--poll-invalidation",
            "notify",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "'notify' needs PostgreSQL" in done.stderr, done.stderr
    assert not data.exists()


class _SilencingProxy:
    """A TCP proxy in front of PostgreSQL that, once silenced, drops what PostgreSQL
    sends to the connections that LISTEN, while their sockets stay up: what a proxy
    or pooler that lost its way does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silenced = False
        self._listening = socket.create_server(("127.0.0.1", 0))
        self.port = self._listening.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listening.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            listens = threading.Event()
            threading.Thread(
                target=self._pump, args=(client, upstream, listens), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, listens, True), daemon=True
            ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        listens: threading.Event,
        down: bool = False,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not down and b"LISTEN tufa_factory_stamps" in data:
                    listens.set()
                if not (down and listens.is_set() and self.silenced):
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_listener_that_hears_nothing_more_is_given_up(
    make_server: Callable[..., Server], make_db_url: Callable[[str], str | None]
) -> None:
    """Notifications stop arriving while the listening socket stays up: within the
    heartbeat's timeout the process gives the listener up and reads every stamp, so a
    revocation it was never told of holds; once heard again, it listens again."""
    direct = make_url(make_db_url("postgres") or "")
    proxy = _SilencingProxy(direct.port or 5432)
    through_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    server = make_server(
        "postgres", db_url=through_proxy, extra_args=("--poll-invalidation", "notify")
    )
    factory = create_factory(server)
    revoked, kept = factory.register_device("ci"), factory.register_device("ci")
    _warm_listening(server, factory, revoked["credential"], kept["credential"])
    proxy.silenced = True
    done = factory.request("POST", f"/devices/{revoked['name']}/revoke")
    assert done.status_code == 200, done.text
    deadline = time.monotonic() + BEAT_TIMEOUT_SECONDS + 3
    while _poll(factory, revoked["credential"]).status_code == 200:
        assert time.monotonic() < deadline, "a revocation nobody notified is served on"
        time.sleep(0.2)
    assert_error(_poll(factory, revoked["credential"]), 401, "credential_revoked")
    assert _poll(factory, kept["credential"]).status_code == 200
    assert "heartbeat notifications stopped arriving" in server.local.log()
    proxy.silenced = False
    _warm_listening(server, factory, kept["credential"])  # listening again, by itself
