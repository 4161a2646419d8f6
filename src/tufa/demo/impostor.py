"""A fake update server for `tufa demo`: seed 003's man in the middle.

It answers at the same URLs as a tufa server and serves a complete, well-formed TUF
repository, a newer root included, offering a "build 765". Everything is signed, but
with the impostor's own keys: a device that trusts the factory's root must refuse it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tuf.api.metadata import TargetFile

from tufa.core import api_paths
from tufa.core.keys import KeyPair
from tufa.core.metadata import (
    Channel,
    build_root,
    build_snapshot,
    build_targets,
    build_timestamp,
    expiry,
    sign,
    to_bytes,
    utcnow,
)

FAKE_BUILD = b"an impostor's firmware that would revert the day's fixes\n" * 1024


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class FileServer:
    """A plain HTTP server on loopback: GET (or POST) of a path in `files` answers its
    bytes, anything else 404. Every request is kept in `seen`."""

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        self.files = dict(files or {})
        self.seen: list[SeenRequest] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: callers look at `seen`."""

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.seen.append(SeenRequest(self.command, self.path, dict(self.headers)))
                body = server.files.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body or b"")

            do_GET = do_POST = do_PUT = do_HEAD = _answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class Impostor(FileServer):
    """Serves a repository for `factory`/`channel` signed by keys nobody trusts."""

    def __init__(
        self, factory: str, channel: Channel, root_version: int, hardware_id: str, tag: str
    ):
        key = KeyPair.generate()
        signer = key.signer()
        expires = expiry(utcnow(), timedelta(days=365))
        target = TargetFile.from_data("rpi4-image-765", FAKE_BUILD, ["sha256"])
        target.unrecognized_fields["custom"] = {
            "version": "765",
            "hardwareIds": [hardware_id],
            "tags": [tag],
        }
        root = build_root(
            version=root_version,
            expires=expires,
            root_keys=[key.public],
            root_threshold=1,
            targets_keys=[key.public],
            targets_threshold=1,
            snapshot_key=key.public,
            timestamp_key=key.public,
        )
        targets = to_bytes(sign(build_targets(900, expires, {target.path: target}), [signer]))
        snapshot = to_bytes(sign(build_snapshot(900, expires, targets, 900), [signer]))
        timestamp = build_timestamp(900, expires, snapshot, 900)
        digest = hashlib.sha256(FAKE_BUILD).hexdigest()
        metadata = api_paths.metadata_base(factory, channel)
        super().__init__(
            {
                f"{metadata}{root_version}.root.json": to_bytes(sign(root, [signer])),
                f"{metadata}timestamp.json": to_bytes(sign(timestamp, [signer])),
                f"{metadata}900.snapshot.json": snapshot,
                f"{metadata}900.targets.json": targets,
                f"{api_paths.targets_base(factory, channel)}{digest}.{target.path}": FAKE_BUILD,
            }
        )
