"""`tufa-server run` as an operator meets it: the port it is given, the log it writes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Factory, Server, create_factory
from tufa.demo.local_server import console_script


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_server(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFA_")}
    return subprocess.run(
        [console_script("tufa-server"), "run", "--data-dir", str(data_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_refused_before_anything_is_created(
    taken_port: int, tmp_path: Path, workers: str
) -> None:
    data_dir = tmp_path / "data"
    result = run_server(data_dir, "--port", str(taken_port), "--workers", workers)
    assert result.returncode == 1, result
    assert result.stdout == "", result.stdout
    assert result.stderr == (
        f"Error: cannot start: port 127.0.0.1:{taken_port} is already in use (another "
        "tufa-server, or another program): stop it, or choose another port with --port "
        "(or TUFA_PORT)\n"
    ), result.stderr
    assert not data_dir.exists()


def test_a_host_that_is_not_this_machine_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run_server(data_dir, "--host", "192.0.2.1", "--port", "18080")
    assert result.returncode == 1, result
    assert "cannot listen on 192.0.2.1:18080: the address is not one of this machine's" in (
        result.stderr
    ), result.stderr
    assert "--host (or TUFA_HOST)" in result.stderr
    assert not data_dir.exists()


def log_lines(server: Server, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The server's JSON log lines, once `done` holds of them: a request's line is
    written just after its answer is sent."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in server.local.log().splitlines() if line[:1] == "{"]
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def access_lines(lines: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "tufa.access" and line["path"] == path]


def test_the_access_log_names_each_request_and_caller_without_secrets(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("sqlite", extra_args=("--log-format", "json"))
    factory = create_factory(server)
    device = factory.register_device("ci")
    timestamp = factory.path("/repo/ci/metadata/timestamp.json")
    for _ in range(3):  # the first fills the poll cache, the others are answered from it
        response = factory.request("GET", "/repo/ci/metadata/timestamp.json", device["credential"])
        assert response.status_code == 200, response.text
    read_token = factory.token("read")
    refused = factory.request("POST", "/tokens", read_token, json={"scopes": ["admin"]})
    assert refused.status_code == 403, refused.text
    mistaken = factory.request("DELETE", f"/tokens/{read_token}")
    assert mistaken.status_code == 404, mistaken.text
    in_query = factory.request("GET", f"/targets?tag=main&token={read_token}")
    tokens_path = factory.path("/tokens")

    lines = log_lines(
        server,
        lambda lines: (
            len(access_lines(lines, factory.path("/targets?tag=main&token=[redacted]"))) == 1
        ),
    )
    polls = access_lines(lines, timestamp)
    assert [(p["method"], p["status"], p["caller_kind"], p["caller_id"]) for p in polls] == [
        ("GET", 200, "device", device["id"])
    ] * 3, polls
    assert all(isinstance(p["duration_ms"], float) for p in polls), polls
    (created,) = access_lines(lines, "/api/v1/factories")
    assert created["status"] == 201
    assert created["caller_kind"] == "operator"
    assert created["caller_id"].startswith("tok_")
    (scope_refusal,) = [line for line in access_lines(lines, tokens_path) if line["status"] == 403]
    assert scope_refusal["level"] == "info"
    assert scope_refusal["caller_kind"] == "token"
    assert scope_refusal["refusal"] == "forbidden"
    assert scope_refusal["reason"] == refused.json()["error"]["message"]
    assert "lacks the scope" in scope_refusal["message"]
    (redacted,) = access_lines(lines, f"{tokens_path}/[redacted]")
    assert redacted["method"] == "DELETE"
    assert redacted["reason"] == mistaken.json()["error"]["message"].replace(
        read_token, "[redacted]"
    )
    assert in_query.status_code == 200, in_query.text
    log = server.local.log()
    for secret in (factory.admin_token, read_token, device["credential"], server.operator_token):
        assert secret not in log


def test_plain_text_access_lines_and_refusals_only(
    factory: Factory, make_server: Callable[..., Server]
) -> None:
    response = factory.request("GET", "/devices/nope")
    assert response.status_code == 404, response.text
    path = factory.path("/devices/nope")
    line = rf"INFO tufa\.access: GET {path} 404 [\d.]+ms token tok_\w+ refused \(not_found\): "
    wait_for_line(factory.server, line + re.escape(response.json()["error"]["message"]))

    quiet = make_server("sqlite", extra_args=("--no-access-log",))
    assert quiet.request("GET", "/healthz").status_code == 200
    assert quiet.request("GET", "/api/v1/factories/nope").status_code == 401
    wait_for_line(quiet, r"GET /api/v1/factories/nope 401 .* refused \(unauthorized\)")
    assert "GET /healthz" not in quiet.local.log()


def wait_for_line(server: Server, pattern: str) -> None:
    deadline = time.monotonic() + 10
    while not re.search(pattern, server.local.log()):
        assert time.monotonic() < deadline, f"{pattern!r} not in\n{server.local.log()}"
        time.sleep(0.05)
