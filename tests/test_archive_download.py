"""The offline keys archive: downloaded once with `tufa keys download`, then gone for good."""

from __future__ import annotations

import hashlib
import stat
import tarfile
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select
from tuf.api.metadata import Metadata, Root

from tests.helpers import Factory, Server, cli_env, run_cli
from tufa.core.archive import FIRST_ROOT_KEY_NAME, OfflineArchive
from tufa.core.metadata import Channel
from tufa.server.db import factories, key_archives

ARCHIVE_PATH = "/keys/archive"


def _download(factory: Factory, tmp_path: Path, target: Path) -> None:
    done = run_cli("keys", "download", str(target), env=cli_env(factory, tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr


def _stored_blob(server: Server, factory_name: str) -> bytes | None:
    """The factory's pending archive as the server stores it (encrypted), or None."""
    engine = create_engine(server.local.db_url)
    try:
        with engine.connect() as conn:
            blob: bytes | None = conn.execute(
                select(key_archives.c.archive_encrypted)
                .join(factories, factories.c.id == key_archives.c.factory_id)
                .where(factories.c.name == factory_name)
            ).scalar()
    finally:
        engine.dispose()
    return blob


def _sqlite_files(server: Server) -> list[Path]:
    db = server.local.data_dir / "tufa.db"
    return [p for p in (db, db.with_name("tufa.db-wal"), db.with_name("tufa.db-shm")) if p.exists()]


def _pem_body(pem: bytes) -> bytes:
    """The base64 lines of a PEM block, without its BEGIN/END lines."""
    lines = pem.strip().splitlines()
    assert lines[0].startswith(b"-----BEGIN")
    assert lines[-1].startswith(b"-----END")
    return b"\n".join(lines[1:-1])


def test_download_saves_private_archive_with_root_key_and_served_roots(
    factory: Factory, tmp_path: Path
) -> None:
    target = tmp_path / "keys.tgz"
    _download(factory, tmp_path, target)

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
    assert {
        "config.json",
        f"keys/{FIRST_ROOT_KEY_NAME}.ci.sec",
        f"keys/{FIRST_ROOT_KEY_NAME}.ci.pub",
        f"keys/{FIRST_ROOT_KEY_NAME}.prod.sec",
        f"keys/{FIRST_ROOT_KEY_NAME}.prod.pub",
        "roles/ci/root.json",
        "roles/prod/root.json",
    } <= names

    archive = OfflineArchive.load(target)
    assert archive.factory == factory.name
    (first_root,) = [k for k in archive.keys if k.name == FIRST_ROOT_KEY_NAME]
    assert first_root.role == "root"

    served = {channel: factory.root_v1(channel.value) for channel in Channel}
    for channel in Channel:
        assert archive.roots[channel] == served[channel], channel
        root = Metadata[Root].from_bytes(served[channel]).signed
        half = first_root.half(channel)
        assert root.roles["root"].keyids == [half.keyid], channel
        # The private key in the archive is the one the served root trusts: a signature
        # made with it verifies against the root's key.
        signature = half.signer().sign(b"proof of possession")
        root.keys[half.keyid].verify_signature(signature, b"proof of possession")
    # Each channel has its own half of the root key (ADR 0009).
    assert not first_root.is_shared


def test_second_download_is_refused_because_the_archive_is_gone(
    factory: Factory, tmp_path: Path
) -> None:
    _download(factory, tmp_path, tmp_path / "first.tgz")

    second = tmp_path / "second.tgz"
    done = run_cli("keys", "download", str(second), env=cli_env(factory, tmp_path / "config.json"))
    assert done.returncode != 0
    assert "already downloaded" in done.stderr.lower() or "was downloaded" in done.stderr
    assert "deleted" in done.stderr
    assert done.stdout == ""
    assert not second.exists()

    response = factory.request("GET", ARCHIVE_PATH)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "archive_gone"
    assert factory.request("GET").json()["archive_downloaded_at"] is not None


def test_downloaded_archive_leaves_no_bytes_in_the_database(
    server: Server, factory: Factory, tmp_path: Path
) -> None:
    blob = _stored_blob(server, factory.name)
    assert blob is not None
    chunk = blob[12:76]  # ciphertext, after the random nonce: found nowhere else
    if server.backend == "sqlite":
        # The scan must be able to see the blob while it is stored, or it proves nothing.
        assert any(chunk in p.read_bytes() for p in _sqlite_files(server))

    target = tmp_path / "keys.tgz"
    _download(factory, tmp_path, target)
    (first_root,) = [k for k in OfflineArchive.load(target).keys if k.name == FIRST_ROOT_KEY_NAME]
    pem_body = _pem_body(first_root.prod.private_pem)

    assert _stored_blob(server, factory.name) is None
    assert factory.request("GET", ARCHIVE_PATH).status_code == 410
    if server.backend == "sqlite":
        for path in _sqlite_files(server):
            data = path.read_bytes()
            assert chunk not in data, f"the deleted archive's ciphertext is still in {path}"
            assert pem_body not in data, f"the root private key is in {path}"


def test_download_never_overwrites_an_existing_file(factory: Factory, tmp_path: Path) -> None:
    target = tmp_path / "keys.tgz"
    target.write_bytes(b"precious backup")
    env = cli_env(factory, tmp_path / "config.json")

    done = run_cli("keys", "download", str(target), env=env)
    assert done.returncode != 0
    assert "already exists" in done.stderr
    assert target.read_bytes() == b"precious backup"

    # Nothing was confirmed, so the archive is still there to download elsewhere.
    assert factory.request("GET", ARCHIVE_PATH).status_code == 200
    _download(factory, tmp_path, tmp_path / "other.tgz")
    assert OfflineArchive.load(tmp_path / "other.tgz").factory == factory.name


def test_unconfirmed_download_keeps_the_archive_and_wrong_digest_is_refused(
    factory: Factory, tmp_path: Path
) -> None:
    # A download that dies after the GET (the CLI never confirms) loses nothing.
    first = factory.request("GET", ARCHIVE_PATH)
    assert first.status_code == 200
    digest = hashlib.sha256(first.content).hexdigest()
    assert first.headers["x-tufa-archive-sha256"] == digest
    assert first.headers["cache-control"] == "no-store"

    again = factory.request("GET", ARCHIVE_PATH)
    assert again.status_code == 200
    assert again.content == first.content

    wrong = factory.request("POST", f"{ARCHIVE_PATH}/confirm", json={"sha256": "0" * 64})
    assert wrong.status_code == 400, wrong.text
    assert wrong.json()["error"]["code"] == "bad_request"
    assert factory.request("GET", ARCHIVE_PATH).content == first.content
    assert factory.request("GET").json()["archive_downloaded_at"] is None

    # The CLI still gets the archive, byte for byte what the server held.
    target = tmp_path / "keys.tgz"
    _download(factory, tmp_path, target)
    assert target.read_bytes() == first.content
    assert factory.request("GET", ARCHIVE_PATH).status_code == 410


def test_confirm_needs_the_admin_scope(factory: Factory) -> None:
    reader = factory.token("read")
    digest = factory.request("GET", ARCHIVE_PATH).headers["x-tufa-archive-sha256"]
    for method, suffix, body in (
        ("GET", ARCHIVE_PATH, None),
        ("POST", f"{ARCHIVE_PATH}/confirm", {"sha256": digest}),
    ):
        response = factory.request(method, suffix, token=reader, json=body)
        assert response.status_code == 403, (method, response.text)
    unauthenticated = httpx.get(f"{factory.server.url}{factory.path(ARCHIVE_PATH)}")
    assert unauthenticated.status_code == 401
    assert factory.request("GET", ARCHIVE_PATH).status_code == 200
