"""Start a `tufa-server` process on loopback and wait until it answers.

Used by `tufa demo` and by the test suite, which both need a real server process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tufa.core import api_paths
from tufa.core.files import default_database_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def console_script(name: str) -> str:
    """The path of one of our entry points, next to the running interpreter if there."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed in this environment")
    return found


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ten seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LocalServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        operator_token: str,
        db_url: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.operator_token = operator_token
        self.db_url = db_url or default_database_url(data_dir)
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
        self._args = [
            console_script("tufa-server"),
            "run",
            "--data-dir",
            str(data_dir),
            "--port",
            str(self.port),
            *(["--db", db_url] if db_url else []),
            *extra_args,
        ]
        self._env = {**os.environ, **(env or {}), "TUFA_OPERATOR_TOKEN": operator_token}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> LocalServer:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._args, stdout=log, stderr=subprocess.STDOUT, env=self._env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tufa-server exited with status {self.process.returncode}:\n{self.log()}"
                )
            try:
                if httpx.get(self.url + api_paths.HEALTH, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"tufa-server did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
