"""What tests use to talk to a real server: HTTP, the real CLI, and python-tuf's ngclient."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tuf.ngclient import Updater

from tufa.cli.local_server import LocalServer, console_script
from tufa.core.fetcher import BearerFetcher


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
