"""What every request handler works with: settings, database, keys, repository, blobs.

The API reaches it through the request (`tufa.server.api.common.state_of`); domain
modules are given it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tufa.server.blobs import BlobStore
from tufa.server.db import Database
from tufa.server.poll_cache import PollCache
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
    # What device polls were last served, valid while the factory's generations hold.
    poll: PollCache = field(default_factory=PollCache)
