"""`tufa-server run` as an operator meets it: the port it is given, the log it writes."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
