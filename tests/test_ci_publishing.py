"""CI publishing end to end: the `tufa targets` CLI and the API on real server processes,
checked by python-tuf's ngclient as CI and production devices run it.

Covers design workflow 3.6 (CI builds reach CI devices at once, never production ones),
invariant 5 for publishing (a refused request changes nothing: database rows and blob
files) and invariant 6 (concurrent publishers through threads, processes and two server
replicas on one PostgreSQL lose no target and never serve a snapshot naming a targets
version that is not served).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from tests.helpers import (
    CI_VIEW_QUERY,
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
from tufa.demo.local_server import console_script

# --- helpers -----------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(factory: Factory, data: bytes, client: httpx.Client | None = None) -> str:
    """PUT the bytes to the blob store as the factory admin; return their SHA-256."""
    digest = sha256(data)
    path = factory.path(f"/blobs/{digest}")
    headers = {"Authorization": f"Bearer {factory.admin_token}"}
    if client is None:
        response = send(factory.server, "PUT", path, factory.admin_token, content=data)
    else:
        response = client.put(f"{factory.server.url}{path}", content=data, headers=headers)
    assert response.status_code == 201, response.text
    return digest


def target(
    name: str,
    data: bytes | None = None,
    *,
    version: str = "1",
    hardware_ids: tuple[str, ...] = ("rpi4",),
    tags: tuple[str, ...] = ("main",),
    **extra: Any,
) -> dict[str, Any]:
    """A POST /targets item for `data` (uploaded separately), or for `extra` fields."""
    body: dict[str, Any] = {
        "name": name,
        "version": version,
        "hardware_ids": list(hardware_ids),
        "tags": list(tags),
    }
    if data is not None:
        body |= {"length": len(data), "sha256": sha256(data)}
    return body | extra


def publish(
    factory: Factory, *items: dict[str, Any], client: httpx.Client | None = None
) -> dict[str, Any]:
    path = factory.path("/targets")
    body = {"targets": list(items)}
    if client is None:
        response = send(factory.server, "POST", path, factory.admin_token, json=body)
    else:
        headers = {"Authorization": f"Bearer {factory.admin_token}"}
        response = client.post(f"{factory.server.url}{path}", json=body, headers=headers)
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


def served_targets(factory: Factory) -> Targets:
    """The CI targets a client reaches now through timestamp -> snapshot -> targets."""
    return Metadata[Targets].from_bytes(served_metadata(factory, "ci")["targets"]).signed


def cli_json(*args: str, env: dict[str, str]) -> Any:
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, f"tufa {' '.join(args)}: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def ci_env(factory: Factory, tmp_path: Path) -> dict[str, str]:
    """`tufa` as a CI job runs it: a token with only the `ci` scope."""
    return cli_env(factory, tmp_path / "ci-config.json") | {"TUFA_TOKEN": factory.token("ci")}


def target_path(factory: Factory, channel: str, digest: str, name: str) -> str:
    return factory.path(f"/repo/{channel}/targets/{digest}.{name}")


# --- CI devices see every build at once; production devices none of them ----------


def test_ci_device_sees_each_build_within_one_refresh(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    ci_device = factory.register_device("ci")["credential"]
    prod_device = factory.register_device("prod")["credential"]
    metadata_dir, target_dir = tmp_path / "ci-metadata", tmp_path / "ci-targets"
    published: dict[str, bytes] = {}
    for build in (1, 2, 3):
        data = secrets.token_bytes(30_000 + build)
        image = tmp_path / f"image-{build}.img"
        image.write_bytes(data)
        name = f"rpi4-image-{build}"
        result = cli_json(
            "targets",
            "add",
            name,
            "--version",
            str(build),
            "--hardware-id",
            "rpi4",
            "--tag",
            "main",
            "--file",
            str(image),
            "--custom",
            json.dumps({"git": f"c0ffee{build}"}),
            env=env,
        )
        assert result == {
            "added": [name],
            "unchanged": [],
            "removed": [],
            "targets_version": 1 + build,
        }
        published[name] = data

        # A device that polls next (same trusted metadata dir) sees the build at once.
        updater = target_updater(factory, "ci", ci_device, metadata_dir, target_dir)
        updater.refresh()
        assert updater._trusted_set.targets.version == 1 + build
        assert set(updater._trusted_set.targets.targets) == set(published)
        info = updater.get_targetinfo(name)
        assert info is not None
        assert info.custom == {
            "version": str(build),
            "hardwareIds": ["rpi4"],
            "tags": ["main"],
            "git": f"c0ffee{build}",
        }
        assert info.length == len(data)
        assert info.hashes == {"sha256": sha256(data)}
        assert updater.find_cached_target(info) is None
        downloaded = Path(updater.download_target(info))
        assert downloaded.read_bytes() == data
        assert sha256(downloaded.read_bytes()) == sha256(data)

    listed = cli_json("targets", "list", env=env)
    assert [t["name"] for t in listed] == ["rpi4-image-1", "rpi4-image-2", "rpi4-image-3"]
    assert [t["version"] for t in listed] == ["1", "2", "3"]

    # Production devices: same factory, no CI build is offered to them.
    prod = target_updater(factory, "prod", prod_device, tmp_path / "p-md", tmp_path / "p-t")
    prod.refresh()
    assert prod._trusted_set.targets.targets == {}
    assert prod._trusted_set.targets.version == 1
    for name in published:
        assert prod.get_targetinfo(name) is None
    assert cli_json("targets", "list", "--prod", env=env) == []
    shown = cli_json("targets", "show", "rpi4-image-2", env=env)
    assert shown["channels"] == ["ci"]


def test_external_target_is_described_not_served(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    digest = sha256(b"an artifact that lives on a CDN")
    url = "https://cdn.example.com/builds/app-7.tar"
    result = cli_json(
        "targets",
        "add",
        "app-7",
        "--version",
        "7",
        "--hardware-id",
        "rpi4",
        "--tag",
        "main",
        "--url",
        url,
        "--sha256",
        digest.upper(),  # the CLI normalises the digest
        "--length",
        "1048576",
        env=env,
    )
    assert result["added"] == ["app-7"]

    (listed,) = cli_json("targets", "list", env=env)
    assert listed["url"] == url
    assert listed["custom"]["url"] == url
    assert (listed["sha256"], listed["length"]) == (digest, 1048576)
    shown = cli_json("targets", "show", "app-7", env=env)
    assert (shown["url"], shown["sha256"], shown["length"]) == (url, digest, 1048576)

    device = factory.register_device("ci")["credential"]
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    info = updater.get_targetinfo("app-7")
    assert info is not None
    assert info.custom["url"] == url
    assert info.hashes == {"sha256": digest}
    assert info.length == 1048576

    # The server holds no bytes for it: devices are sent to the URL.
    for token in (factory.admin_token, device):
        response = send(factory.server, "GET", target_path(factory, "ci", digest, "app-7"), token)
        assert_error(response, 404, "not_found", url)
    with pytest.raises(exceptions.DownloadHTTPError):
        updater.download_target(info)


def test_batch_publishes_one_version_per_view_it_changes(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    before = Metadata[Snapshot].from_bytes(served_metadata(factory, "ci")["snapshot"]).signed
    files: dict[str, bytes] = {}
    items: list[dict[str, Any]] = []
    for i in range(6):
        data = secrets.token_bytes(1000 + i)
        (tmp_path / f"fw-{i}.bin").write_bytes(data)
        files[f"fw-{i}"] = data
        items.append(
            {
                "name": f"fw-{i}",
                "version": str(10 + i),
                "hardware_ids": ["rpi4", "rpi5"],
                "tags": ["main"],
                "file": f"fw-{i}.bin",
            }
        )
    external = sha256(b"external in a batch")
    items.append(
        {
            "name": "docs-1",
            "version": "1",
            "hardware_ids": ["rpi4"],
            "tags": ["main"],
            "url": "https://cdn.example.com/docs-1.tgz",
            "sha256": external,
            "length": 12,
        }
    )
    batch = tmp_path / "targets.json"
    batch.write_text(json.dumps(items))

    result = cli_json("targets", "add", "--batch", str(batch), env=env)
    names = [*files, "docs-1"]
    assert sorted(result["added"]) == sorted(names)
    # Two views changed (hardware ids rpi4 and rpi5 of tag main): one version each.
    assert result["targets_version"] == 3

    served = served_metadata(factory, "ci")
    targets = Metadata[Targets].from_bytes(served["targets"]).signed
    snapshot = Metadata[Snapshot].from_bytes(served["snapshot"]).signed
    assert targets.version == 2
    assert sorted(targets.targets) == sorted(names)
    for name, data in files.items():
        assert targets.targets[name].hashes == {"sha256": sha256(data)}
        assert targets.targets[name].custom["hardwareIds"] == ["rpi4", "rpi5"]
    # One publish: one new targets version per view, one new snapshot naming it.
    assert snapshot.version == before.version + 1
    assert snapshot.meta["targets.json"].version == 2

    def served_version(version: int) -> httpx.Response:
        path = factory.path(f"/repo/ci/metadata/{version}.targets.json")
        return send(factory.server, "GET", path, factory.admin_token)

    rpi5 = Metadata[Targets].from_bytes(served_version(3).content).signed
    assert sorted(rpi5.targets) == sorted(files)  # docs-1 is for rpi4 only
    assert served_version(4).status_code == 404


# --- Re-publishing: identical is a no-op, different is refused ---------------------


def test_identical_readd_is_a_noop_and_a_different_target_conflicts(
    factory: Factory, tmp_path: Path
) -> None:
    env = ci_env(factory, tmp_path)
    image = tmp_path / "image.img"
    image.write_bytes(secrets.token_bytes(5000))
    args = ("targets", "add", "fw-42", "--version", "42", "--hardware-id", "rpi4")
    first = cli_json(*args, "--tag", "main", "--file", str(image), env=env)
    assert first["added"] == ["fw-42"]
    assert first["targets_version"] == 2

    server = factory.server
    other_bytes = secrets.token_bytes(5000)
    upload(factory, other_bytes)  # so that the conflict, not a missing blob, is what's refused
    state = dump_all_tables(server)
    metadata = served_metadata(factory, "ci")

    # The same target again, by the CLI (nothing is uploaded) and by the API.
    again = run_cli(*args, "--tag", "main", "--file", str(image), env=env)
    assert again.returncode == 0, again.stderr
    assert "already published, identical" in again.stdout
    assert "CI targets version 2." in again.stdout
    same = target("fw-42", image.read_bytes(), version="42")
    response = send(
        server, "POST", factory.path("/targets"), factory.admin_token, json={"targets": [same]}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "added": [],
        "unchanged": ["fw-42"],
        "removed": [],
        "targets_version": 2,
    }
    assert dump_all_tables(server) == state
    assert served_metadata(factory, "ci") == metadata  # timestamp not even re-signed

    # A different target under the name: refused, whatever differs; nothing changes.
    differing = [
        target("fw-42", other_bytes, version="42"),
        same | {"version": "43"},
        same | {"tags": ["main", "beta"]},
        same | {"custom": {"git": "abc"}},
        same | {"url": "https://cdn.example.com/fw-42.img"},
    ]
    new = target("fw-43", other_bytes, version="43")
    for body in [*[[d] for d in differing], [new, same | {"version": "41"}]]:
        response = send(
            server, "POST", factory.path("/targets"), factory.admin_token, json={"targets": body}
        )
        assert_error(response, 409, "conflict", "'fw-42'")
        assert dump_all_tables(server) == state
    other = tmp_path / "other.img"
    other.write_bytes(other_bytes)
    refused = run_cli(*args, "--tag", "main", "--file", str(other), env=env)
    assert refused.returncode == 1
    assert "already published" in refused.stderr
    assert "409" in refused.stderr
    assert dump_all_tables(server) == state
    assert served_metadata(factory, "ci") == metadata


# --- Bad input: a clear error, and nothing changed --------------------------------

BAD_BLOB = b"the bytes the bad-input cases refer to"
NEVER_UPLOADED = sha256(b"no one ever uploaded these bytes: " + b"x" * 32)
VALID = target("fw-1", BAD_BLOB)


@dataclass(frozen=True)
class BadTarget:
    id: str
    targets: Any  # the value of "targets" in the request body
    message: str
    status: int = 400
    code: str = "bad_request"


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != key}


BAD_TARGETS = [
    BadTarget("name-slash", [VALID | {"name": "rpi4/image-1"}], "'name'"),
    BadTarget("name-dotdot", [VALID | {"name": "../image-1"}], "'name'"),
    BadTarget("name-empty", [VALID | {"name": ""}], "'name'"),
    BadTarget("name-missing", [_without("name")], "'name'"),
    BadTarget("name-not-string", [VALID | {"name": 7}], "'name'"),
    BadTarget("version-missing", [_without("version")], "'version'"),
    BadTarget("hardware-ids-missing", [_without("hardware_ids")], "'hardware_ids'"),
    BadTarget("hardware-ids-empty", [VALID | {"hardware_ids": []}], "'hardware_ids'"),
    BadTarget("hardware-ids-string", [VALID | {"hardware_ids": "rpi4"}], "'hardware_ids'"),
    BadTarget("tags-missing", [_without("tags")], "'tags'"),
    BadTarget("tags-empty", [VALID | {"tags": []}], "'tags'"),
    BadTarget("tags-bad-label", [VALID | {"tags": ["ma in"]}], "'tags'"),
    BadTarget("sha256-short", [VALID | {"sha256": "abc123"}], "'sha256'"),
    BadTarget("sha256-upper", [VALID | {"sha256": sha256(BAD_BLOB).upper()}], "'sha256'"),
    BadTarget("sha256-missing", [_without("sha256")], "'sha256'"),
    BadTarget("length-negative", [VALID | {"length": -1}], "'length'"),
    BadTarget("length-string", [VALID | {"length": "38"}], "'length'"),
    BadTarget("length-bool", [VALID | {"length": True}], "'length'"),
    BadTarget("url-ftp", [VALID | {"url": "ftp://cdn.example.com/fw-1"}], "'url'"),
    BadTarget("url-file", [VALID | {"url": "file:///etc/passwd"}], "'url'"),
    BadTarget("url-not-string", [VALID | {"url": 42}], "'url'"),
    BadTarget("custom-list", [VALID | {"custom": ["a"]}], "'custom'"),
    BadTarget("custom-string", [VALID | {"custom": "x"}], "'custom'"),
    BadTarget("never-uploaded", [VALID | {"sha256": NEVER_UPLOADED}], NEVER_UPLOADED),
    BadTarget("length-not-the-uploaded", [VALID | {"length": len(BAD_BLOB) + 1}], "'length' is"),
    BadTarget(
        "url-too-long",
        [VALID | {"url": "https://cdn.example.com/".ljust(2049, "u")}],
        "'url' may be at most 2048 characters",
    ),
    BadTarget(
        "custom-too-large",
        [VALID | {"custom": {"notes": "n" * (4097 - len('{"notes":""}'))}}],
        "'custom' may be at most 4096 bytes",
    ),
    BadTarget(
        "custom-too-deep",
        [VALID | {"custom": json.loads('{"in":' * 8 + "{}" + "}" * 8)}],
        "nests deeper than 8 levels",
    ),
    BadTarget(
        "custom-list-too-deep",
        [VALID | {"custom": json.loads('{"a":' + "[" * 8 + "]" * 8 + "}")}],
        "nests deeper than 8 levels",
    ),
    BadTarget("custom-url", [VALID | {"custom": {"url": "https://x.example/a"}}], "'custom.url'"),
    BadTarget("custom-version", [VALID | {"custom": {"version": "2"}}], "'custom.version'"),
    BadTarget("custom-tags", [VALID | {"custom": {"tags": ["main"]}}], "'custom.tags'"),
    BadTarget("custom-hardware-ids", [VALID | {"custom": {"hardwareIds": []}}], "'hardware_ids'"),
    BadTarget(
        "hardware-ids-too-many",
        [VALID | {"hardware_ids": [f"hw{i}" for i in range(65)]}],
        "1 to 64 labels",
    ),
    BadTarget(
        "too-many-views",
        [VALID | {"hardware_ids": ["rpi4", "rpi5"], "tags": [f"t{i}" for i in range(33)]}],
        "at most 64 pairs (it has 2 x 33)",
    ),
    BadTarget("tags-too-many", [VALID | {"tags": [f"t{i}" for i in range(65)]}], "'tags'"),
    BadTarget("tags-label-too-long", [VALID | {"tags": ["t" * 129]}], "'tags'"),
    BadTarget("not-an-object", ["fw-1"], "JSON object"),
    BadTarget("empty-list", [], "1 to 1000"),
    BadTarget("not-a-list", VALID, "'targets'"),
    BadTarget("same-name-twice", [VALID, VALID | {"version": "2"}], "twice"),
    # One bad target refuses the whole publish: the good one is not published either.
    BadTarget("good-then-bad", [VALID, target("fw-2", BAD_BLOB) | {"length": -5}], "'fw-2'"),
    BadTarget(
        "good-then-missing-blob",
        [VALID, target("fw-2", BAD_BLOB) | {"sha256": NEVER_UPLOADED}],
        "'fw-2'",
    ),
]


@pytest.fixture(scope="module")
def bad_input_factory(server: Server) -> Factory:
    """One factory per backend for the bad-input cases, with BAD_BLOB uploaded."""
    made = create_factory(server)
    upload(made, BAD_BLOB)
    return made


@pytest.mark.parametrize("case", BAD_TARGETS, ids=lambda c: c.id)
def test_bad_target_is_refused_and_changes_nothing(
    bad_input_factory: Factory, case: BadTarget
) -> None:
    factory = bad_input_factory
    server = factory.server
    state, blobs = dump_all_tables(server), blob_files(server)
    body = {"targets": case.targets}
    response = send(server, "POST", factory.path("/targets"), factory.admin_token, json=body)
    assert_error(response, case.status, case.code, case.message)
    assert dump_all_tables(server) == state
    assert blob_files(server) == blobs


def _raw_put(
    server: Server, path: str, token: str, declared: int, body: bytes, *, cut: bool
) -> bytes:
    """Send a PUT whose Content-Length says `declared` but whose body is `body`, and
    maybe `cut` the connection then; return whatever the server answers (maybe nothing)."""
    head = (
        f"PUT {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.local.port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    received = []
    with socket.create_connection(("127.0.0.1", server.local.port), timeout=10) as sock:
        sock.sendall(head + body)
        if cut:
            sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            received.append(chunk)
    return b"".join(received)


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match.group(1))


def _nothing_stored_for(server: Server, digest: str) -> None:
    """No file of the blob store (stored or incoming) is named after `digest`. The server
    cleans up after a cut upload on its own time: wait for it, then make sure nothing
    appears afterwards either. Only this upload's files count: the server is shared
    with other tests, whose uploads may be under way."""

    def named() -> list[str]:
        return [name for name in blob_files(server) if digest in name]

    # The shared server may be busy for seconds with other tests' publishes of
    # multi-megabyte targets (test_publish_limits) before it sees the cut connection.
    deadline = time.monotonic() + 30
    while named() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert named() == []
    time.sleep(0.3)
    assert named() == []


def test_bad_uploads_store_nothing(bad_input_factory: Factory) -> None:
    factory = bad_input_factory
    server = factory.server
    token = factory.admin_token
    state = dump_all_tables(server)
    data = secrets.token_bytes(4096)
    digest = sha256(data)
    blob_path = factory.path(f"/blobs/{digest}")

    # Bytes that do not hash to the declared SHA-256.
    wrong = send(server, "PUT", blob_path, token, content=damaged(data))
    assert_error(wrong, 400, "bad_request", digest)
    _nothing_stored_for(server, digest)

    # A digest that is not one.
    for bad in ("xyz", digest.upper(), digest[:-1]):
        response = send(server, "PUT", factory.path(f"/blobs/{bad}"), token, content=data)
        assert_error(response, 400, "bad_request", "SHA-256")
    _nothing_stored_for(server, digest)

    # Shorter than its Content-Length: the connection is cut mid-upload.
    answer = _raw_put(server, blob_path, token, len(data), data[: len(data) // 2], cut=True)
    assert answer == b"" or _status(answer) == 400, answer[:300]
    _nothing_stored_for(server, digest)

    # Longer than its Content-Length: only the declared bytes are the body, and they do
    # not hash to the digest of the whole.
    answer = _raw_put(server, blob_path, token, len(data) // 2, data, cut=False)
    assert _status(answer) == 400, answer[:300]
    assert digest.encode() in answer
    _nothing_stored_for(server, digest)

    # No Content-Length at all (chunked).
    chunked = send(server, "PUT", blob_path, token, content=iter([data]))
    assert_error(chunked, 400, "bad_request", "Content-Length")
    _nothing_stored_for(server, digest)

    # Nothing half-stored: the target cannot be published, and the server still works.
    response = send(
        server, "POST", factory.path("/targets"), token, json={"targets": [target("x-1", data)]}
    )
    assert_error(response, 400, "bad_request", digest)
    assert dump_all_tables(server) == state
    assert upload(factory, data) == digest
    assert f"sha256/{digest[:2]}/{digest}" in blob_files(server)


CLI_USAGE_ERRORS = [
    ("missing-file", ["--file", "{tmp}/no-such-file.img"], "is not a file"),
    ("neither-file-nor-url", [], "either --file"),
    ("file-and-url", ["--file", "{tmp}/image.img", "--url", "https://x.example/a"], "either"),
    ("url-without-sha256", ["--url", "https://x.example/a", "--length", "3"], "--sha256"),
    ("custom-not-object", ["--file", "{tmp}/image.img", "--custom", "[1]"], "JSON object"),
]


@pytest.mark.parametrize(
    ("extra", "message"), [c[1:] for c in CLI_USAGE_ERRORS], ids=[c[0] for c in CLI_USAGE_ERRORS]
)
def test_cli_add_usage_errors(
    bad_input_factory: Factory, tmp_path: Path, extra: list[str], message: str
) -> None:
    factory = bad_input_factory
    (tmp_path / "image.img").write_bytes(b"an image")
    state, blobs = dump_all_tables(factory.server), blob_files(factory.server)
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = run_cli(
        "targets",
        "add",
        "fw-usage",
        "--version",
        "1",
        "--hardware-id",
        "rpi4",
        "--tag",
        "main",
        *args,
        env=cli_env(factory, tmp_path / "config.json"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert dump_all_tables(factory.server) == state
    assert blob_files(factory.server) == blobs


# --- Range requests -------------------------------------------------------------


def test_download_resumes_with_range_requests(factory: Factory) -> None:
    data = secrets.token_bytes(200_001)
    digest = upload(factory, data)
    publish(factory, target("big-1", data))
    device = factory.register_device("ci")["credential"]
    path = target_path(factory, "ci", digest, "big-1")
    headers = {"Authorization": f"Bearer {device}"}
    url = f"{factory.server.url}{path}"

    # A download cut after some bytes...
    got = bytearray()
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["accept-ranges"] == "bytes"
        for chunk in response.iter_raw(16384):
            got += chunk
            if len(got) >= 70_000:
                break
    # ...resumes where it stopped.
    rest = httpx.get(url, headers={**headers, "Range": f"bytes={len(got)}-"}, timeout=30)
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {len(got)}-{len(data) - 1}/{len(data)}"
    assert sha256(bytes(got) + rest.content) == digest

    # Two explicit halves.
    half = len(data) // 2
    first = httpx.get(url, headers={**headers, "Range": f"bytes=0-{half - 1}"}, timeout=30)
    second = httpx.get(url, headers={**headers, "Range": f"bytes={half}-"}, timeout=30)
    assert (first.status_code, second.status_code) == (206, 206)
    assert len(first.content) == half
    assert first.headers["content-range"] == f"bytes 0-{half - 1}/{len(data)}"
    assert sha256(first.content + second.content) == digest

    # Past the end: 416, saying how long the file is.
    beyond = httpx.get(url, headers={**headers, "Range": f"bytes={len(data)}-"}, timeout=30)
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"


# --- Prune ------------------------------------------------------------------------


def test_prune_keeps_newest_per_hardware_id_and_tag(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    files: dict[str, bytes] = {}
    items = []
    for tag, versions in (("main", range(1, 6)), ("beta", range(1, 3))):
        for v in versions:
            name = f"fw-{tag}-{v}"
            files[name] = secrets.token_bytes(2000 + v)
            upload(factory, files[name])
            items.append(target(name, files[name], version=str(v), tags=(tag,)))
    # Views rpi4/beta (version 2) and rpi4/main (version 3).
    assert publish(factory, *items)["targets_version"] == 3

    device = factory.register_device("ci")["credential"]
    metadata_dir, target_dir = tmp_path / "md", tmp_path / "t"
    updater = target_updater(factory, "ci", device, metadata_dir, target_dir)
    updater.refresh()
    assert len(updater._trusted_set.targets.targets) == 5  # its own view: rpi4/main

    result = cli_json("targets", "prune", "--keep", "2", env=env)
    assert result["removed"] == ["fw-main-1", "fw-main-2", "fw-main-3"]
    assert result["targets_version"] == 4  # only the view that changed: rpi4/main
    listed = cli_json("targets", "list", env=env)
    assert sorted(t["name"] for t in listed) == ["fw-beta-1", "fw-beta-2", "fw-main-4", "fw-main-5"]
    main = cli_json("targets", "list", "--tag", "main", "--hardware-id", "rpi4", env=env)
    assert [t["name"] for t in main] == ["fw-main-4", "fw-main-5"]
    assert sorted(served_targets(factory).targets) == ["fw-main-4", "fw-main-5"]

    # The inventory remembers pruned targets...
    shown = cli_json("targets", "show", "fw-main-1", env=env)
    assert shown["pruned_at"] is not None
    assert shown["channels"] == []
    # ...and their files stay downloadable by hash (a device mid-download, or a wave
    # built from an older build, still gets the bytes; TUF decides what is installed).
    response = send(
        factory.server,
        "GET",
        target_path(factory, "ci", sha256(files["fw-main-1"]), "fw-main-1"),
        device,
    )
    assert response.status_code == 200
    assert response.content == files["fw-main-1"]

    # Devices move on: the same trusted metadata dir refreshes onto the pruned targets.
    updater = target_updater(factory, "ci", device, metadata_dir, target_dir)
    updater.refresh()
    assert updater._trusted_set.targets.version == 4
    assert updater.get_targetinfo("fw-main-1") is None
    newest = updater.get_targetinfo("fw-main-5")
    assert newest is not None
    assert Path(updater.download_target(newest)).read_bytes() == files["fw-main-5"]

    # Pruning again finds nothing: no new version.
    again = cli_json("targets", "prune", "--keep", "2", env=env)
    assert again == {"added": [], "unchanged": [], "removed": [], "targets_version": 4}
    assert served_targets(factory).version == 4
    said = run_cli("targets", "prune", "--keep", "2", env=env)
    assert (
        said.stdout == "Nothing to remove: the CI targets are unchanged.\nCI targets version 4.\n"
    )

    # keep < 1 is refused, by the CLI and by the API, changing nothing.
    state = dump_all_tables(factory.server)
    assert run_cli("targets", "prune", "--keep", "0", env=env).returncode == 2
    prune_path = factory.path("/targets/prune")
    response = send(factory.server, "POST", prune_path, factory.admin_token, json={"keep": 0})
    assert_error(response, 400, "bad_request", "'keep'")
    assert dump_all_tables(factory.server) == state

    # Re-adding a pruned target, identical, lists it again in a new version.
    restored = publish(factory, items[0])
    assert restored["added"] == ["fw-main-1"]
    assert restored["targets_version"] == 5
    assert "fw-main-1" in served_targets(factory).targets


# --- Concurrency (invariant 6) -----------------------------------------------------

THREADS = 8
PER_THREAD = 5


def _check_chain(factory: Factory, names: set[str], publishes: int) -> None:
    """Served metadata lists exactly `names` at targets version 1 + `publishes`, every
    targets version in between is served and grows by one target, and ngclient agrees."""
    served = served_metadata(factory, "ci")
    timestamp = Metadata[Timestamp].from_bytes(served["timestamp"]).signed
    snapshot = Metadata[Snapshot].from_bytes(served["snapshot"]).signed
    targets = Metadata[Targets].from_bytes(served["targets"]).signed
    assert timestamp.snapshot_meta.version == snapshot.version
    assert snapshot.meta["targets.json"].version == targets.version
    assert set(targets.targets) == names
    assert targets.version == 1 + publishes
    for version in range(1, targets.version + 1):
        response = send(
            factory.server,
            "GET",
            factory.path(f"/repo/ci/metadata/{version}.targets.json"),
            factory.admin_token,
        )
        assert response.status_code == 200, f"{version}.targets.json: {response.text}"
        listed = Metadata[Targets].from_bytes(response.content).signed.targets
        assert len(listed) == version - 1, f"{version}.targets.json lists {len(listed)}"


def _publish_one(factory: Factory, client: httpx.Client, name: str) -> int:
    data = f"{factory.name}/{name}/".encode() + secrets.token_bytes(256)
    upload(factory, data, client)
    result = publish(factory, target(name, data, version=name.rsplit("-", 1)[1]), client=client)
    assert result["added"] == [name], result
    version: int = result["targets_version"]
    return version


def test_concurrent_threads_lose_no_target(factory: Factory, tmp_path: Path) -> None:
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> list[int]:
        with httpx.Client(timeout=60) as client:
            start.wait()
            return [_publish_one(factory, client, f"t{thread}-{j}") for j in range(PER_THREAD)]

    with ThreadPoolExecutor(THREADS) as pool:
        versions = [v for found in pool.map(worker, range(THREADS)) for v in found]

    # Every publish got its own targets version: they were serialised, none overwritten.
    total = THREADS * PER_THREAD
    assert sorted(versions) == list(range(2, 2 + total))
    names = {f"t{i}-{j}" for i in range(THREADS) for j in range(PER_THREAD)}
    _check_chain(factory, names, total)
    device = factory.register_device("ci")["credential"]
    updater = target_updater(factory, "ci", device, tmp_path / "md", tmp_path / "t")
    updater.refresh()
    assert set(updater._trusted_set.targets.targets) == names


def test_concurrent_cli_processes_lose_no_target(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    processes, rounds = 4, 3
    names: set[str] = set()
    for r in range(rounds):
        running = []
        for p in range(processes):
            name = f"proc{p}-{r}"
            image = tmp_path / f"{name}.img"
            image.write_bytes(secrets.token_bytes(3000))
            names.add(name)
            running.append(
                subprocess.Popen(
                    [
                        console_script("tufa"),
                        "targets",
                        "add",
                        name,
                        "--version",
                        str(r),
                        "--hardware-id",
                        "rpi4",
                        "--tag",
                        "main",
                        "--file",
                        str(image),
                        "--json",
                    ],
                    env={**os.environ, **env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in running:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert len(json.loads(out)["added"]) == 1
    _check_chain(factory, names, processes * rounds)


@dataclass
class ReaderLog:
    """What the reader thread saw, per server: (timestamp, snapshot, targets) versions."""

    seen: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _read_chain(client: httpx.Client, factory: Factory) -> tuple[int, int, int] | str:
    """Follow timestamp -> snapshot -> targets once; a string says what went wrong."""
    headers = {"Authorization": f"Bearer {factory.admin_token}"}
    base = f"{factory.server.url}{factory.path('/repo/ci/metadata/')}"
    response = client.get(f"{base}timestamp.json{CI_VIEW_QUERY}", headers=headers)
    if response.status_code != 200:
        return f"timestamp.json: {response.status_code} {response.text}"
    timestamp = Metadata[Timestamp].from_bytes(response.content).signed
    snapshot_version = timestamp.snapshot_meta.version
    response = client.get(f"{base}{snapshot_version}.snapshot.json", headers=headers)
    if response.status_code != 200:
        return f"{snapshot_version}.snapshot.json: {response.status_code} {response.text}"
    snapshot = Metadata[Snapshot].from_bytes(response.content).signed
    targets_version = snapshot.meta["targets.json"].version
    response = client.get(f"{base}{targets_version}.targets.json", headers=headers)
    if response.status_code != 200:
        return f"{targets_version}.targets.json: {response.status_code} {response.text}"
    targets = Metadata[Targets].from_bytes(response.content).signed
    if targets.version != targets_version:
        return f"{targets_version}.targets.json has version {targets.version}"
    return timestamp.version, snapshot.version, targets.version


def _reader(replicas: list[Factory], stop: threading.Event, log: ReaderLog) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            for replica in replicas:
                try:
                    seen = _read_chain(client, replica)
                except Exception as e:  # the test thread reports it
                    seen = f"{type(e).__name__}: {e}"
                if isinstance(seen, str):
                    log.errors.append(f"{replica.server.url}: {seen}")
                    continue
                log.seen.setdefault(replica.server.url, []).append(seen)


@pytest.mark.postgres
def test_two_replicas_on_one_postgres_lose_nothing(
    make_server: Callable[..., Server],
    make_db_url: Callable[[str], str | None],
    tmp_path: Path,
) -> None:
    db_url = make_db_url("postgres")
    blob_dir = ("--blob-dir", str(tmp_path / "blobs"))
    first = make_server("postgres", db_url=db_url, extra_args=blob_dir)
    shared_key = ("--master-key-file", str(first.local.data_dir / "master.key"))
    second = make_server("postgres", db_url=db_url, extra_args=(*blob_dir, *shared_key))
    second.local.operator_token = first.operator_token
    on_first = create_factory(first)
    on_second = Factory(second, on_first.name, on_first.admin_token)
    replicas = [on_first, on_second]

    stop, log = threading.Event(), ReaderLog()
    reader = threading.Thread(target=_reader, args=(replicas, stop, log))
    reader.start()
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> list[int]:
        versions = []
        with httpx.Client(timeout=60) as client:
            start.wait()
            for j in range(PER_THREAD):
                name = f"r{thread}-{j}"
                data = f"{name}/".encode() + secrets.token_bytes(256)
                # Upload to one replica and publish through the other, alternating.
                upload(replicas[(thread + j + 1) % 2], data, client)
                result = publish(
                    replicas[(thread + j) % 2], target(name, data, version=str(j)), client=client
                )
                assert result["added"] == [name], result
                versions.append(result["targets_version"])
        return versions

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            versions = [v for found in pool.map(worker, range(THREADS)) for v in found]
    finally:
        time.sleep(0.2)  # let the reader see the final state too
        stop.set()
        reader.join(timeout=30)
    assert not reader.is_alive()

    total = THREADS * PER_THREAD
    assert sorted(versions) == list(range(2, 2 + total))
    names = {f"r{i}-{j}" for i in range(THREADS) for j in range(PER_THREAD)}
    for replica in replicas:
        _check_chain(replica, names, total)
    assert served_metadata(on_first, "ci") == served_metadata(on_second, "ci")

    # The reader never met a snapshot naming an unserved targets version, and no
    # version went down, per replica nor across them (it read them one after another).
    assert log.errors == []
    for url, seen in log.seen.items():
        assert len(seen) >= 3, f"the reader barely ran against {url}"
        for earlier, later in itertools.pairwise(seen):
            assert all(a <= b for a, b in zip(earlier, later, strict=True)), (url, earlier, later)
    everything = [s for pair in zip(*log.seen.values(), strict=False) for s in pair]
    for earlier, later in itertools.pairwise(everything):
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), (earlier, later)
    assert max(s[2] for s in everything) == 1 + total

    # Devices on either replica get every build, bytes uploaded through the other one.
    device = on_first.register_device("ci")["credential"]
    for i, replica in enumerate(replicas):
        updater = target_updater(replica, "ci", device, tmp_path / f"md{i}", tmp_path / f"t{i}")
        updater.refresh()
        assert set(updater._trusted_set.targets.targets) == names
        info = updater.get_targetinfo(f"r{i}-0")
        assert info is not None
        assert sha256(Path(updater.download_target(info)).read_bytes()) == info.hashes["sha256"]

    for server in (first, second):
        assert not re.search(r"Traceback|IntegrityError|ERROR", server.local.log())
