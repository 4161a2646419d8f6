"""What every request handler reaches through `request.app.state.tufa`."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from tufa.server.blobs import BlobStore
from tufa.server.db import Database
from tufa.server.repository import Repository
from tufa.server.secrets import MasterKey
from tufa.server.settings import Settings


@dataclass(frozen=True)
class ServerState:
    settings: Settings
    db: Database
    master_key: MasterKey
    repo: Repository
    blobs: BlobStore

    def base_url(self, request: Request) -> str:
        return (self.settings.public_url or str(request.base_url)).rstrip("/")


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.tufa
    return state
