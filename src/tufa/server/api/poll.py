"""The poll path: a device's `timestamp.json` (and `root.json`, and cached versioned
files) answered from this process's memory, ahead of the router (ADR 0014).

A request is answered here only when everything it needs is cached and still valid:
the credential's principal and the view's newest file, both read at the factory's
current generations (`poll_cache.py`), which one query made after the request arrived
tells. Anything else (no cache entry, a stale one, a refusal to give, a query string,
a method other than GET, a database error) goes on to the full handler in `repo.py`,
which answers as it always did and fills the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from tufa.core import api_paths
from tufa.core.metadata import Channel
from tufa.server.api.repo import IMMUTABLE, READERS, etag_matches, parse_filename
from tufa.server.poll_cache import FactoryStamp, PollCache, Stamps
from tufa.server.principals import Principal
from tufa.server.repository import DEFAULT_VIEW, Repository, StoredFile
from tufa.server.secrets import secret_digest

log = logging.getLogger("tufa.server")
_PATH = compile_path(api_paths.METADATA_FILE)[0]
_READER_SCOPES = frozenset(scope.value for scope in READERS)
_JSON = b"application/json"


class PollPath:
    """ASGI middleware answering cached metadata reads; everything else goes to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        cache: PollCache,
        repo: Repository,
        stamps: Stamps,
        now: Callable[[], datetime],
    ) -> None:
        self.app = app
        self.cache = cache
        self.repo = repo
        self.stamps = stamps
        self.now = now
        self._failing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            match = _PATH.match(scope["path"])
            if match is not None and await self._answered(match.groups(), scope, send):
                return
        await self.app(scope, receive, send)

    async def _answered(self, params: tuple[str, ...], scope: Scope, send: Send) -> bool:
        name, channel_name, filename = params
        parsed = parse_filename(filename)
        if parsed is None or not api_paths.FACTORY_NAME.fullmatch(name):
            return False
        try:
            channel = Channel(channel_name)
        except ValueError:
            return False
        authorization = if_none_match = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value
            elif key == b"if-none-match":
                if_none_match = value
        secret = None
        if authorization is not None:
            bearer, _, given = authorization.decode("latin-1").partition(" ")
            secret = given.strip()
            if bearer.lower() != "bearer" or not secret:
                return False
        stamp = await self._stamp(name)
        if stamp is None:
            return False
        stored = self._cached(stamp, secret, channel, *parsed)
        if stored is None:
            return False
        visibility = b"public" if stamp.anonymous_read else b"private"
        freshness = IMMUTABLE.encode() if parsed[1] is not None else b"no-cache"
        headers = [
            (b"etag", stored.etag.encode()),
            (b"cache-control", visibility + b", " + freshness),
        ]
        if if_none_match is not None and etag_matches(if_none_match.decode("latin-1"), stored.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return True
        headers += [(b"content-length", b"%d" % len(stored.body)), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": stored.body})
        return True

    async def _stamp(self, name: str) -> FactoryStamp | None:
        try:
            stamp = await self.stamps.stamp(name)
        except Exception:
            # The full handler, with its own connections, answers or reports the error.
            if not self._failing:
                log.warning("poll cache: cannot read factory generations", exc_info=True)
            self._failing = True
            return None
        self._failing = False
        return stamp

    def _cached(
        self,
        stamp: FactoryStamp,
        secret: str | None,
        channel: Channel,
        role: str,
        version: int | None,
    ) -> StoredFile | None:
        """The file this caller may read, if the cache knows both; None otherwise."""
        if secret is None:
            if not stamp.anonymous_read:
                return None
            view = DEFAULT_VIEW
        else:
            principal = self.cache.principal(secret_digest(secret), stamp, self.now)
            if principal is None or not _may_read(principal, channel):
                return None
            view = principal.view
        if version is not None:
            return self.repo.cached_version(stamp.id, channel, role, version)
        return self.cache.newest(stamp, channel, view, role)


def _may_read(principal: Principal, channel: Channel) -> bool:
    """As `repo._authorize` for a known principal of the path's factory (the cache
    checks the factory); a refusal is left to the full handler to word."""
    if principal.kind == "device":
        return principal.channel == channel
    return principal.kind == "token" and bool(principal.scopes & _READER_SCOPES)
