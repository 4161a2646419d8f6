"""What tests use to talk to a real server: HTTP, the real CLI, and python-tuf's ngclient."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from securesystemslib.signer import Signer
from sqlalchemy import Engine, Executable, Row, create_engine, select
from sqlalchemy.pool import NullPool
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet

from tufa.core.fetcher import BearerFetcher
from tufa.core.files import write_private_file
from tufa.demo.local_server import LocalServer, console_script
from tufa.server import db
from tufa.server.app import ROUTES


@dataclass
class Server:
    local: LocalServer
    backend: str

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def operator_token(self) -> str:
        return self.local.operator_token

    def request(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)


@dataclass
class Factory:
    server: Server
    name: str
    admin_token: str

    def path(self, suffix: str = "") -> str:
        return f"/api/v1/factories/{self.name}{suffix}"

    def request(
        self, method: str, suffix: str = "", token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        chosen = self.admin_token if token is None else token
        return self.server.request(method, self.path(suffix), chosen or None, **kwargs)

    def metadata_url(self, channel: str) -> str:
        return f"{self.server.url}{self.path(f'/repo/{channel}/metadata/')}"

    def root_v1(self, channel: str) -> bytes:
        response = self.request("GET", f"/repo/{channel}/metadata/1.root.json")
        response.raise_for_status()
        return response.content

    def token(self, *scopes: str) -> str:
        response = self.request("POST", "/tokens", json={"scopes": list(scopes)})
        response.raise_for_status()
        secret: str = response.json()["token"]
        return secret

    def register_device(self, channel: str, name: str | None = None) -> dict[str, Any]:
        body = {
            "name": name or f"dev-{secrets.token_hex(4)}",
            "hardware_id": "rpi4",
            "tag": "main",
            "channel": channel,
        }
        response = self.request("POST", "/devices", json=body)
        response.raise_for_status()
        device: dict[str, Any] = response.json()
        return device

    def updater(self, channel: str, trust_dir: Path, token: str | None = None) -> Updater:
        """python-tuf's ngclient, bootstrapped with the channel's version-1 root."""
        trust_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            str(trust_dir),
            self.metadata_url(channel),
            fetcher=BearerFetcher(self.admin_token if token is None else token),
            bootstrap=self.root_v1(channel),
        )


def create_factory(server: Server, name: str | None = None) -> Factory:
    name = name or f"f-{secrets.token_hex(5)}"
    response = server.request(
        "POST", "/api/v1/factories", server.operator_token, json={"name": name}
    )
    assert response.status_code == 201, response.text
    return Factory(server, name, response.json()["admin_token"])


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `tufa` command; config goes to a file the caller chooses via env."""
    return subprocess.run(
        [console_script("tufa"), *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def set_clock_offset(path: Path, seconds: float) -> None:
    """Move the clock of a server started with `--clock-offset-file path`.

    The server re-reads the file at any moment, so it is replaced atomically: a reader
    never sees a half-written number.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{seconds}\n")
    os.replace(tmp, path)


def cli_env(factory: Factory, config: Path) -> dict[str, str]:
    """Environment for `run_cli` acting as the factory's admin, with its own config file."""
    return {
        "TUFA_CONFIG": str(config),
        "TUFA_SERVER": factory.server.url,
        "TUFA_FACTORY": factory.name,
        "TUFA_TOKEN": factory.admin_token,
    }


# --- Shared by the authorization and bad-input tests -------------------------------

_client: httpx.Client | None = None


def http() -> httpx.Client:
    """One keep-alive client per test process: a new httpx client costs ~30 ms (TLS setup)."""
    global _client
    if _client is None:
        _client = httpx.Client(timeout=30)
    return _client


def send(
    server: Server, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    """Like `Server.request`, on the shared keep-alive client."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http().request(method, f"{server.url}{path}", headers=headers, **kwargs)


def damaged(data: bytes) -> bytes:
    """`data` with its last byte changed: never equal to `data` (replacing the last byte
    with a fixed one would leave random data intact once in 256 runs)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def assert_error(response: httpx.Response, status: int, code: str, message: str = "") -> None:
    """`response` is the API's JSON error {"error": {status, code, message}} naming `message`."""
    assert response.status_code == status, (
        f"expected {status}: {response.status_code} {response.text}"
    )
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"status", "code", "message"}, error
    assert error["status"] == status, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert message in error["message"], f"{message!r} not in {error['message']!r}"


DB_TABLES = (
    "factories",
    "channels",
    "metadata_files",
    "online_keys",
    "root_key_pairs",
    "key_archives",
    "tokens",
    "devices",
    "targets",
    "blob_owners",
    "device_events",
    "device_group_members",
    "retired_credentials",
    # Hooks, not their deliveries: the deliverer writes those in the background.
    "webhooks",
)


@functools.cache
def _engine(url: str) -> Engine:
    # No pool: the session drops PostgreSQL test databases, and SQLite files belong to servers.
    return create_engine(url, poolclass=NullPool)


def online_keyids(factory: Factory, channel: str) -> dict[str, str]:
    """Role -> key id of `channel`'s online keys in force, as `GET /factories/F` lists them."""
    keys = send(factory.server, "GET", factory.path(), factory.admin_token).json()["online_keys"]
    return {k["role"]: k["keyid"] for k in keys if k["channel"] == channel}


def dump_database(server: Server) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the server's database, sorted, to compare before/after."""
    dump: dict[str, list[tuple[Any, ...]]] = {}
    with _engine(server.local.db_url).connect() as conn:
        for name in DB_TABLES:
            rows = conn.execute(select(db.schema.tables[name])).all()
            dump[name] = sorted((tuple(row) for row in rows), key=repr)
    return dump


def served_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the server serves; HEAD is GET's twin."""
    return sorted(
        (method, route.path) for route in ROUTES for method in (route.methods or set()) - {"HEAD"}
    )


def path_params(path: str) -> list[str]:
    """The parameters of a route's path template, in order: '{factory}' -> 'factory'."""
    return re.findall(r"{(\w+)}", path)


def hostile_json(value: Any) -> bytes:
    """`value` as JSON bytes the way any client can send it: NaN and Infinity as bare
    words, lone surrogates as `\\ud800` escapes (httpx's own encoder refuses both)."""
    return json.dumps(value).encode()


def db_rows(server: Server, statement: Executable) -> list[Row[Any]]:
    """The rows a query returns from the server's database, for what no API shows."""
    with _engine(server.local.db_url).connect() as conn:
        return list(conn.execute(statement).all())


def dump_all_tables(server: Server) -> dict[str, list[tuple[Any, ...]]]:
    """Like `dump_database`, over every table of the schema (open root updates too)."""
    dump: dict[str, list[tuple[Any, ...]]] = {}
    with _engine(server.local.db_url).connect() as conn:
        for table in db.schema.sorted_tables:
            rows = conn.execute(select(table)).all()
            dump[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return dump


# The CI view that the devices `Factory.register_device` registers are served.
CI_VIEW_QUERY = "?hardware_id=rpi4&tag=main"


def served_metadata(factory: Factory, channel: str) -> dict[str, bytes]:
    """The bytes a client gets now: root.json, timestamp.json and, through them, the
    snapshot and targets versions the timestamp names (consistent snapshots). On CI, what
    a device of hardware id rpi4 and tag main is served."""

    def get(filename: str) -> bytes:
        path = factory.path(f"/repo/{channel}/metadata/{filename}")
        response = send(factory.server, "GET", path, factory.admin_token)
        assert response.status_code == 200, f"{filename}: {response.text}"
        return response.content

    timestamp = get("timestamp.json" + (CI_VIEW_QUERY if channel == "ci" else ""))
    snapshot_version = json.loads(timestamp)["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = get(f"{snapshot_version}.snapshot.json")
    targets_version = json.loads(snapshot)["signed"]["meta"]["targets.json"]["version"]
    return {
        "root": get("root.json"),
        "timestamp": timestamp,
        "snapshot": snapshot,
        "targets": get(f"{targets_version}.targets.json"),
    }


def download_archive(factory: Factory, path: Path) -> bytes:
    """What `tufa keys download` does, without starting a process: fetch the factory's
    one-time offline keys archive, save it (mode 0600), confirm; return its bytes."""
    response = factory.request("GET", "/keys/archive")
    response.raise_for_status()
    data = response.content
    digest = hashlib.sha256(data).hexdigest()
    assert digest == response.headers["x-tufa-archive-sha256"]
    write_private_file(path, data)
    factory.request("POST", "/keys/archive/confirm", json={"sha256": digest}).raise_for_status()
    return data


def target_updater(
    factory: Factory, channel: str, credential: str, metadata_dir: Path, target_dir: Path
) -> Updater:
    """ngclient as a device runs it: bootstrapped with the channel's version-1 root, with
    the channel's target download base (consistent-snapshot `SHA256.NAME` paths)."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    return Updater(
        str(metadata_dir),
        factory.metadata_url(channel),
        str(target_dir),
        f"{factory.server.url}{factory.path(f'/repo/{channel}/targets/')}",
        fetcher=BearerFetcher(credential),
        bootstrap=factory.root_v1(channel),
    )


def blob_files(server: Server) -> list[str]:
    """Every file (blobs and any leftover temporary file) under the server's blob dir."""
    root = server.local.data_dir / "blobs"
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def write_forged_mirror(
    served: dict[str, bytes],
    targets: Metadata[Targets],
    stolen: dict[str, Signer],
    metadata: Path,
) -> None:
    """Write what a mirror holding the stolen online keys would serve: the channel's
    root, `targets`, and a snapshot and timestamp naming it, re-signed with those keys."""
    snapshot = Metadata[Snapshot].from_bytes(served[Snapshot.type])
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile(targets.signed.version)
    snapshot.signatures.clear()
    snapshot.sign(stolen[Snapshot.type])
    snapshot_bytes = snapshot.to_bytes()
    timestamp = Metadata[Timestamp].from_bytes(served[Timestamp.type])
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(
        snapshot.signed.version,
        length=len(snapshot_bytes),
        hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
    )
    timestamp.signatures.clear()
    timestamp.sign(stolen[Timestamp.type])
    metadata.mkdir(parents=True)
    (metadata / "root.json").write_bytes(served[Root.type])
    (metadata / "timestamp.json").write_bytes(timestamp.to_bytes())
    (metadata / f"{snapshot.signed.version}.snapshot.json").write_bytes(snapshot_bytes)
    (metadata / f"{targets.signed.version}.targets.json").write_bytes(targets.to_bytes())


def poll_device(
    metadata_dir: Path,
    metadata_url: str,
    fetcher: FetcherInterface,
    bootstrap: bytes | None,
    seen: dict[str, int],
    who: str,
) -> tuple[TrustedMetadataSet, dict[str, int]]:
    """One device poll: a new ngclient over the metadata the device trusts on disk (the
    way an agent restarts between polls), refreshed; fails the test if any role's version
    fell below what the device had `seen`. Returns what it trusts now and the versions."""
    updater = Updater(str(metadata_dir), metadata_url, fetcher=fetcher, bootstrap=bootstrap)
    updater.refresh()
    trusted = updater._trusted_set  # read-only look at what the client now trusts
    versions = {
        Root.type: trusted.root.version,
        Timestamp.type: trusted.timestamp.version,
        Snapshot.type: trusted.snapshot.version,
        Targets.type: trusted.targets.version,
    }
    for role, version in versions.items():
        assert version >= seen.get(role, 0), (
            f"{who}: {role} went down from {seen.get(role)} to {version}"
        )
    return trusted, versions
