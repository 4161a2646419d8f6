"""A webhook receiver on loopback for tests: a threaded http.server that records every
delivery, answers with the status it is told, and can be down (nothing listening)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload

    @property
    def event(self) -> str:
        return self.headers["x-tufa-event"]


def verifies(secret: str, body: bytes, header: str) -> bool:
    """What the README tells a receiver to do with X-Tufa-Signature."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Receiver:
    """Deliveries land in `received`; each answer is `status` (200 unless changed). A
    receiver that de-duplicates applies each delivery id's effect once, in `effects`."""

    port: int = field(default_factory=free_port)
    status: int = 200
    delay: float = 0.0  # seconds to wait before answering
    received: list[Received] = field(default_factory=list)
    effects: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._lock:
                    receiver.received.append(got)
                    delivery = got.headers.get("x-tufa-delivery", "")
                    if delivery not in receiver.effects:
                        receiver.effects.append(delivery)
                    status, delay = receiver.status, receiver.delay
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_event(self, event: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.event == event]

    def wait_for(
        self, what: Callable[[list[Received]], bool], timeout: float = 20
    ) -> list[Received]:
        """The deliveries received, once `what` holds of them (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                received = list(self.received)
            if what(received):
                return received
            assert time.monotonic() < deadline, f"timed out; received {received}"
            time.sleep(0.05)
