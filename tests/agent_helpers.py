"""What the agent tests share: real `tufa-agent` processes, published builds, and a
tampering proxy that sits between a device and the server."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import Factory
from tufa.demo.impostor import SeenRequest
from tufa.demo.local_server import console_script, stop_process

HARDWARE_ID = "rpi4"
TAG = "main"


def build_bytes(version: str, size: int = 64 * 1024) -> bytes:
    """The image of build `version`: distinct per version, `size` bytes."""
    seed = hashlib.sha256(f"build {version}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def image_name(version: str, hardware_id: str = HARDWARE_ID) -> str:
    return f"{hardware_id}-image-{version}"


def publish_build(
    factory: Factory,
    version: str,
    data: bytes | None = None,
    *,
    name: str | None = None,
    hardware_ids: tuple[str, ...] = (HARDWARE_ID,),
    tags: tuple[str, ...] = (TAG,),
    token: str | None = None,
) -> bytes:
    """A CI job publishing build `version`: the file goes to the blob store, then the
    target to the CI channel (signed by the online key). Returns the bytes."""
    data = build_bytes(version) if data is None else data
    sha256 = hashlib.sha256(data).hexdigest()
    uploaded = factory.request("PUT", f"/blobs/{sha256}", token=token, content=data)
    assert uploaded.status_code in (200, 201), uploaded.text
    target = {
        "name": name or image_name(version, hardware_ids[0]),
        "version": version,
        "hardware_ids": list(hardware_ids),
        "tags": list(tags),
        "sha256": sha256,
        "length": len(data),
    }
    added = factory.request("POST", "/targets", token=token, json={"targets": [target]})
    assert added.status_code == 201, added.text
    return data


@dataclass
class AgentDevice:
    """One device: a state directory driven by the real `tufa-agent` command."""

    factory: Factory
    dir: Path
    name: str
    channel: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def register(
        cls,
        factory: Factory,
        where: Path,
        channel: str = "ci",
        *,
        name: str | None = None,
        hardware_id: str = HARDWARE_ID,
        tag: str = TAG,
        root: bytes | None = None,
        server_url: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> AgentDevice:
        name = name or f"dev-{secrets.token_hex(4)}"
        where.mkdir(parents=True, exist_ok=True)
        root_file = where / f"{name}-root.json"
        root_file.write_bytes(factory.root_v1(channel) if root is None else root)
        device = cls(factory, where / name, name, channel)
        done = device.agent(
            "register", "--server", server_url or factory.server.url, "--factory",
            factory.name, "--token", factory.token("register"), "--hardware-id", hardware_id,
            "--tag", tag, "--root", str(root_file), "--name", name, *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return device

    def agent(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`tufa-agent ARGS --dir DIR`, waited for."""
        return subprocess.run(
            [console_script("tufa-agent"), *args, "--dir", str(self.dir)],
            env={**os.environ, **self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def run_once(self, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.agent("run", "--once", env=env)

    def status(self) -> dict[str, Any]:
        done = self.agent("status", "--json")
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def installed_version(self) -> str | None:
        installed = self.status()["installed"]
        return None if installed is None else str(installed["version"])

    def running_bytes(self) -> bytes | None:
        """The file the `current` slot holds (what the device runs), if any."""
        release = self.dir / "current" / "release.json"
        if not release.exists():
            return None
        target = str(json.loads(release.read_bytes())["target"])
        return (self.dir / "current" / target).read_bytes()

    def point_at(self, url: str) -> None:
        """Send this device's traffic to `url` from now on, as a hijacked DNS name or
        a man in the middle would (the agent keeps its URL in config.json)."""
        config_file = self.dir / "config.json"
        config = json.loads(config_file.read_bytes())
        config["server"] = url.rstrip("/")
        config_file.write_text(json.dumps(config))

    def start(self, *args: str, interval: float = 0.3, env: dict[str, str] | None = None) -> None:
        """`tufa-agent run` in the background, its log in DIR.log."""
        log = (self.dir.parent / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            [console_script("tufa-agent"), "run", "--interval", str(interval), *args,
             "--dir", str(self.dir)],
            env={**os.environ, **self.env, **(env or {})},
            stdout=log,
            stderr=log,
        )  # fmt: skip

    def log(self) -> str:
        path = self.dir.parent / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 30) -> None:
        """Wait until the status file satisfies `condition` (read directly: a CLI process
        per poll would cost more than the agent's own cycle)."""
        deadline = time.monotonic() + timeout
        status_file = self.dir / "status.json"
        while True:
            status = json.loads(status_file.read_bytes()) if status_file.exists() else {}
            if condition(status):
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out; status {status}\n{self.log()}")
            time.sleep(0.1)

    def wait_installed(self, version: str, timeout: float = 30) -> None:
        self.wait_for(
            lambda s: (s.get("installed") or {}).get("version") == version and not s.get("pending"),
            timeout,
        )


# A tampering proxy -------------------------------------------------------------------

Tamper = Callable[["Exchange"], None]


@dataclass
class Exchange(SeenRequest):
    """One request through the proxy and the upstream answer, which a tamper hook may
    rewrite before the device sees it."""

    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)  # when the request arrived


class TamperingProxy:
    """An HTTP proxy on loopback in front of the server. `tamper(exchange)` may change
    the status, headers or body of any answer; `down` makes it refuse every request
    (503), as a server that is gone; `delay` slows each answer. Every request is kept
    in `seen` for assertions (method, path, Range header)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.tamper: Tamper | None = None
        self.down = False
        self.delay = 0.0
        self.seen: list[Exchange] = []
        self._client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests assert on `seen` instead."""

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                exchange = Exchange(self.command, self.path, dict(self.headers.items()))
                proxy.seen.append(exchange)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if proxy.down:
                    exchange.status, exchange.body = 503, b"down"
                else:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("host", "content-length", "connection")
                    }
                    upstream = proxy._client.request(
                        self.command, proxy.upstream + self.path, headers=headers, content=body
                    )
                    exchange.status = upstream.status_code
                    exchange.response_headers = {
                        k: v
                        for k, v in upstream.headers.items()
                        if k.lower()
                        not in (
                            "content-length",
                            "transfer-encoding",
                            "connection",
                            "content-encoding",
                        )
                    }
                    exchange.body = upstream.content
                    if proxy.tamper is not None:
                        proxy.tamper(exchange)
                try:
                    self.send_response(exchange.status)
                    for key, value in exchange.response_headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(exchange.body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(exchange.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the device hung up (or was killed)

            do_GET = do_POST = do_PUT = do_HEAD = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def requests_for(self, suffix: str) -> list[Exchange]:
        return [e for e in self.seen if e.path.split("?")[0].endswith(suffix)]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._client.close()

    def __enter__(self) -> TamperingProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
