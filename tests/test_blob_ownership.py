"""Factories never share bytes (invariant 8, ADR 0010), staged as attacks on real servers.

The blob store keeps one file per SHA-256 for the whole server; access is per factory.
Factory A publishes a build; factory B, holding only its own CI token, tries to publish
a target naming A's hash without uploading it, to download A's bytes through its own
devices, and to learn from upload answers which files A holds. Each attempt is refused
or answered exactly as for a file nobody holds, and nothing changes; then both
factories upload the same file and both work.

Also: an upgrade from the schema before ownership existed keeps every factory's
targets downloadable and gives no factory another's file.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from tests.helpers import (
    Factory,
    Server,
    assert_error,
    blob_files,
    cli_env,
    create_factory,
    damaged,
    dump_all_tables,
    run_cli,
    send,
    served_metadata,
    target_updater,
)
from tufa.server import db

HARDWARE_ID = "rpi4"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(
    factory: Factory, token: str, data: bytes, digest: str | None = None
) -> httpx.Response:
    """PUT `data` to the factory's blob store as `digest` (its own SHA-256 by default)."""
    path = factory.path(f"/blobs/{digest or sha256(data)}")
    return send(factory.server, "PUT", path, token, content=data)


def target_of(name: str, data: bytes, version: str = "1") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "hardware_ids": [HARDWARE_ID],
        "tags": ["main"],
        "sha256": sha256(data),
        "length": len(data),
    }


def add_targets(factory: Factory, token: str, *items: dict[str, Any]) -> httpx.Response:
    body = {"targets": list(items)}
    return send(factory.server, "POST", factory.path("/targets"), token, json=body)


def download_path(factory: Factory, data: bytes, name: str) -> str:
    return factory.path(f"/repo/ci/targets/{sha256(data)}.{name}")


def publish_file(factory: Factory, token: str, name: str, data: bytes) -> None:
    assert put_blob(factory, token, data).status_code == 201
    added = add_targets(factory, token, target_of(name, data))
    assert added.status_code == 201, added.text


def answer_shape(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """An upload answer without what the uploader itself sent (hash and length)."""
    body = response.json()
    return response.status_code, {k: v for k, v in body.items() if k not in ("sha256", "length")}


@pytest.fixture
def victim_and_attacker(server: Server) -> tuple[Factory, Factory]:
    return create_factory(server), create_factory(server)


def test_a_ci_token_cannot_publish_or_download_another_factorys_file(
    victim_and_attacker: tuple[Factory, Factory], tmp_path: Path
) -> None:
    victim, attacker = victim_and_attacker
    server = victim.server
    secret_build = b"factory A's unreleased firmware\n" + secrets.token_bytes(20_000)
    publish_file(victim, victim.token("ci"), "a-image-1", secret_build)
    attacker_ci = attacker.token("ci")
    attacker_device = attacker.register_device("ci")["credential"]
    before, blobs = dump_all_tables(server), blob_files(server)
    attacker_metadata = served_metadata(attacker, "ci")

    # B's CI token publishes a target naming A's hash (and the right length), with no
    # upload: refused as for a file nobody ever uploaded, naming the field.
    stolen = target_of("b-image-1", secret_build)
    never = target_of("b-image-2", b"bytes nobody has: " + secrets.token_bytes(32))
    for item in (stolen, never):
        refused = add_targets(attacker, attacker_ci, item)
        assert_error(refused, 400, "bad_request", "'sha256': this factory has no uploaded file")
        assert refused.json()["error"]["message"].replace(item["sha256"], "H").replace(
            item["name"], "N"
        ) == (
            "target 'N': 'sha256': this factory has no uploaded file with SHA-256 H; upload it "
            "first (`tufa targets add --file` does both), or give the 'url' devices download "
            "it from"
        )
    assert dump_all_tables(server) == before
    assert blob_files(server) == blobs
    assert served_metadata(attacker, "ci") == attacker_metadata

    # B's devices cannot download A's bytes: not through B's factory (no such target
    # there, whatever name they try), not through A's (their credential is not A's).
    for name in ("a-image-1", "b-image-1"):
        got = send(server, "GET", download_path(attacker, secret_build, name), attacker_device)
        assert_error(got, 404, "not_found")
        assert secret_build not in got.content
    across = send(server, "GET", download_path(victim, secret_build, "a-image-1"), attacker_device)
    assert_error(across, 403, "forbidden", "not valid for factory")
    assert (
        send(
            server, "GET", download_path(victim, secret_build, "a-image-1"), attacker_ci
        ).status_code
        == 403
    )
    assert dump_all_tables(server) == before

    # A's own device still gets A's build, and B still publishes its own files.
    victim_device = victim.register_device("ci")["credential"]
    updater = target_updater(victim, "ci", victim_device, tmp_path / "a-md", tmp_path / "a-t")
    updater.refresh()
    info = updater.get_targetinfo("a-image-1")
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == secret_build
    own = b"factory B's own build\n" * 100
    publish_file(attacker, attacker_ci, "b-image-3", own)
    got = send(server, "GET", download_path(attacker, own, "b-image-3"), attacker_device)
    assert (got.status_code, got.content) == (200, own)


def test_an_upload_tells_nobody_which_files_other_factories_hold(
    victim_and_attacker: tuple[Factory, Factory],
) -> None:
    """B uploads a file it guessed A holds, and one nobody holds: the answers are the
    same. A damaged or cut upload of A's file gets B nothing, exactly as for any file."""
    victim, attacker = victim_and_attacker
    server = victim.server
    held = b"the file A holds\n" * 500
    publish_file(victim, victim.admin_token, "a-image-1", held)
    attacker_ci = attacker.token("ci")
    fresh = secrets.token_bytes(len(held))

    # Damaged bytes under A's hash: refused like damaged bytes under any hash, and B does
    # not get the file.
    before = dump_all_tables(server)
    for digest, data in ((sha256(held), held), (sha256(fresh), fresh)):
        wrong_bytes = put_blob(attacker, attacker_ci, damaged(data), digest)
        assert_error(wrong_bytes, 400, "bad_request", f"not {digest}")
        short = put_blob(attacker, attacker_ci, data[:-1], digest)
        assert_error(short, 400, "bad_request", f"not {digest}")
    assert dump_all_tables(server) == before
    refused = add_targets(attacker, attacker_ci, target_of("b-guess", held))
    assert_error(refused, 400, "bad_request", "'sha256'")

    # The full, genuine bytes: the same answer for the file A holds as for a new one, and
    # as A got for its own first upload.
    guessed = put_blob(attacker, attacker_ci, held)
    unheld = put_blob(attacker, attacker_ci, fresh)
    again_by_victim = put_blob(victim, victim.admin_token, held)
    assert answer_shape(guessed) == answer_shape(unheld) == answer_shape(again_by_victim)
    assert answer_shape(guessed) == (201, {"stored": True})
    assert guessed.json() == {"sha256": sha256(held), "length": len(held), "stored": True}


def test_two_factories_uploading_the_same_file_both_work(
    victim_and_attacker: tuple[Factory, Factory], tmp_path: Path
) -> None:
    """The same build in two factories, each by its own `tufa targets add --file`: both
    publish it and both fleets download it; the server stores the bytes once."""
    first, second = victim_and_attacker
    server = first.server
    shared = b"an open-source base image both products ship\n" * 400
    image = tmp_path / "base.img"
    image.write_bytes(shared)
    for factory in (first, second):
        env = cli_env(factory, tmp_path / f"{factory.name}.json") | {
            "TUFA_TOKEN": factory.token("ci")
        }
        done = run_cli(
            "targets", "add", "base-1", "--version", "1", "--hardware-id", HARDWARE_ID,
            "--tag", "main", "--file", str(image), "--json", env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["added"] == ["base-1"]
    assert [f for f in blob_files(server) if sha256(shared) in f] == [
        f"sha256/{sha256(shared)[:2]}/{sha256(shared)}"
    ]
    for factory in (first, second):
        device = factory.register_device("ci")["credential"]
        where = tmp_path / factory.name
        updater = target_updater(factory, "ci", device, where / "md", where / "t")
        updater.refresh()
        info = updater.get_targetinfo("base-1")
        assert info is not None
        assert Path(updater.download_target(info)).read_bytes() == shared


def test_a_target_length_must_match_the_uploaded_file(factory: Factory) -> None:
    data = b"twelve bytes"
    assert put_blob(factory, factory.admin_token, data).status_code == 201
    before = dump_all_tables(factory.server)
    for length in (len(data) - 1, len(data) + 1, 0):
        refused = add_targets(
            factory, factory.admin_token, target_of("fw-1", data) | {"length": length}
        )
        assert_error(refused, 400, "bad_request", f"'length' is {length}")
        assert f"has {len(data)} bytes" in refused.json()["error"]["message"]
    assert dump_all_tables(factory.server) == before
    assert add_targets(factory, factory.admin_token, target_of("fw-1", data)).status_code == 201


# -- upgrading a server from before blob ownership ------------------------------------------


def _migrate(db_url: str, revision: str, step: Callable[[Config, str], None]) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            step(config, revision)
    finally:
        engine.dispose()


def _owners(db_url: str) -> set[tuple[int, str, int]]:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    db.blob_owners.c.factory_id, db.blob_owners.c.sha256, db.blob_owners.c.length
                )
            ).all()
    finally:
        engine.dispose()
    return {(r.factory_id, r.sha256, r.length) for r in rows}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_upgrading_keeps_every_factorys_targets_and_shares_nothing(
    backend: str, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    """A server whose schema predates blob ownership (revision 0006: blob_owners dropped,
    as before the upgrade) is started on the new code: every factory's devices still
    download their targets, re-publishing them is still a no-op, and a factory gets no
    file its targets did not name."""
    server = make_server(backend)
    a, b = create_factory(server), create_factory(server)
    a_build, b_build = b"A's build\n" * 300, b"B's build\n" * 300
    publish_file(a, a.admin_token, "a-image-1", a_build)
    publish_file(b, b.admin_token, "b-image-1", b_build)
    external = target_of("b-cdn-1", b"on a CDN") | {"url": "https://cdn.example.com/b-cdn-1"}
    assert add_targets(b, b.admin_token, external).status_code == 201
    owners = _owners(server.local.db_url)

    server.local.stop()
    _migrate(server.local.db_url, "0006", command.downgrade)
    server.local.start()  # migrates to head on start

    assert _owners(server.local.db_url) == owners  # one row per hosted target, nothing else
    for factory, name, data in ((a, "a-image-1", a_build), (b, "b-image-1", b_build)):
        device = factory.register_device("ci")["credential"]
        where = tmp_path / factory.name
        updater = target_updater(factory, "ci", device, where / "md", where / "t")
        updater.refresh()
        info = updater.get_targetinfo(name)
        assert info is not None
        assert Path(updater.download_target(info)).read_bytes() == data
        again = add_targets(factory, factory.admin_token, target_of(name, data))
        assert (again.status_code, again.json()["unchanged"]) == (200, [name])
    refused = add_targets(b, b.admin_token, target_of("b-steal-1", a_build))
    assert_error(refused, 400, "bad_request", "'sha256'")
