"""A refusal leaves the client's keep-alive connection usable: the next request on the
same connection is answered. (granian, the HTTP server, drops a connection on which the
application left a request body unread; an agent or CI client that reuses connections
would see its next request fail.)"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.helpers import Factory, Server
from tufa.server.app import DRAIN_SECONDS

POLL = "/repo/ci/metadata/timestamp.json"
LARGE = b'{"targets": "' + b"x" * (2 << 20) + b'"}'


class Connection:
    """One HTTP/1.1 connection, read by hand, so that reuse is certain."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.local.port), timeout=10)
        self.host = f"127.0.0.1:{server.local.port}"
        self.buffer = b""

    def send(self, method: str, path: str, token: str = "", body: bytes = b"") -> int:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        return self._answer()

    def _answer(self) -> int:
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        assert status, head
        assert b"connection: close" not in head.lower(), head
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length, head
        while len(self.buffer) < int(length.group(1)):
            self._receive()
        self.buffer = self.buffer[int(length.group(1)) :]
        return int(status.group(1))

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("case", "method", "suffix", "token", "body", "status"),
    [
        ("bad token, body unread", "POST", "/targets", "tufa_wrong", b'{"targets": []}', 401),
        # Larger than the server reads ahead: a wave's signed targets may run to megabytes.
        ("bad token, large body unread", "POST", "/waves", "tufa_wrong", LARGE, 401),
        ("unknown route, body at the limit", "POST", "/nope", "", b" " * (1 << 20), 404),
        ("no token, body unread", "POST", "/targets", "", b'{"targets": []}', 401),
        ("unknown route with a body", "POST", "/nope", "", b'{"a": 1}', 404),
        ("bad JSON", "POST", "/targets", "admin", b"{not json", 400),
        ("oversized JSON body", "POST", "/devices", "admin", b" " * (2 << 20), 413),
        ("bad credential on a poll", "GET", POLL, "tufad_wrong", b"", 401),
    ],
)
def test_the_connection_serves_the_next_request_after_a_refusal(
    factory: Factory,
    server: Server,
    case: str,
    method: str,
    suffix: str,
    token: str,
    body: bytes,
    status: int,
) -> None:
    connection = Connection(server)
    try:
        secret = factory.admin_token if token == "admin" else token
        assert connection.send(method, factory.path(suffix), secret, body) == status, case
        assert connection.send("GET", "/healthz") == 200, case
        answer = connection.send("GET", factory.path(""), factory.admin_token)
        assert answer == 200, case
    finally:
        connection.close()


def test_a_body_sent_slowly_does_not_hold_its_refusal(factory: Factory, server: Server) -> None:
    """An answer given before the body was read waits for the rest of it only so long
    (app.DRAIN_SECONDS): a client trickling its body gets the refusal, and the
    connection is closed, rather than holding the server's answer."""
    sock = socket.create_connection(("127.0.0.1", server.local.port), timeout=10)
    try:
        head = (
            f"POST {factory.path('/targets')} HTTP/1.1\r\nHost: x\r\n"
            "Authorization: Bearer tufa_wrong\r\nContent-Length: 1000000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"{")
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, "closed without an answer"
            answer += chunk
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        assert b"connection: close" in answer.lower(), answer
        assert DRAIN_SECONDS <= waited < DRAIN_SECONDS + 2, waited
    finally:
        sock.close()
