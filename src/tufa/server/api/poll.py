"""The poll path: a device's `timestamp.json` (and `root.json`, and cached versioned
files) answered from this process's memory, ahead of the router (ADR 0014).

A request is answered here only when everything it needs is cached and still valid:
the credential's principal and the view's newest file, both read at the factory's
current generations (`poll_cache.py`), which one query made after the request arrived
tells. Anything else (no cache entry, a stale one, a refusal to give, a query string,
a method other than GET, a database error) goes on to the full application, whose
handler in `repo.py` answers as it always did and fills the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tufa.core import api_paths
from tufa.core.metadata import Channel
from tufa.server import metrics
from tufa.server.api.repo import IMMUTABLE, LATEST, READERS, VERSIONED, etag_matches
from tufa.server.poll_cache import FactoryStamp, PollCache, Stamps
from tufa.server.principals import note_caller
from tufa.server.repository import DEFAULT_VIEW, Repository
from tufa.server.stored_files import StoredFile

log = logging.getLogger("tufa.server")
_PATH = compile_path(api_paths.METADATA_FILE)[0]
_CHANNELS = {channel.value: channel for channel in Channel}
_READER_SCOPES = frozenset(scope.value for scope in READERS)
_JSON = b"application/json"
# Response headers per (ETag, public, versioned): built once per file, not per request.
_MAX_HEADERS = 10_000
Headers = list[tuple[bytes, bytes]]


class _Answer(NamedTuple):
    """How one file is answered: its ETag as sent, and the 304's and the 200's headers."""

    etag: bytes
    not_modified: Headers
    full: Headers


# A cached file: factory id, channel, view, role, version (None for the newest).
_FileKey = tuple[int, Channel, str, str, int | None]
# How long a poll waits for another request to fill the cache before it reads itself.
REFILL_WAIT_SECONDS = 5.0


class _Wanted(NamedTuple):
    """A metadata file's path, parsed: its factory, channel, role and version (None for
    the newest)."""

    factory: str
    channel: Channel
    role: str
    version: int | None


# Paths parsed once each, up to this length: a device's are far shorter, and anyone may
# send paths, so what the parse cache holds is bounded in size as well as in number.
_MAX_REMEMBERED_PATH = 200


def _wanted(path: str) -> _Wanted | None:
    """What `path` asks for, if it is a metadata file's path. Devices poll the same
    paths over and over: each is parsed once."""
    if len(path) > _MAX_REMEMBERED_PATH:
        return _parsed(path)
    return _remembered(path)


def _parsed(path: str) -> _Wanted | None:
    match = _PATH.match(path)
    if match is None:
        return None
    name, channel_name, filename = match.groups()
    channel = _CHANNELS.get(channel_name)
    if channel is None or not api_paths.FACTORY_NAME.fullmatch(name):
        return None
    role = LATEST.get(filename)
    if role is not None:
        return _Wanted(name, channel, role, None)
    versioned = VERSIONED.match(filename)
    if versioned is None:
        return None
    return _Wanted(name, channel, versioned.group(2), int(versioned.group(1)))


_remembered = functools.lru_cache(maxsize=65_536)(_parsed)


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
        # SQLite is read right here, on the event loop; PostgreSQL through its batches.
        self.now = now
        self._answers: dict[tuple[str, bool, bool], _Answer] = {}
        self._refills: dict[_FileKey, asyncio.Event] = {}
        self._failing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            wanted = _wanted(scope["path"])
            if wanted is not None:
                await self._poll(wanted, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _poll(self, wanted: _Wanted, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # The request metrics behind count a request this path passes on from here,
        # the time it waited for a refill included.
        scope[metrics.STARTED] = started
        outcome = await self._counted(wanted, scope, send, started)
        if isinstance(outcome, tuple):
            # The caller is known, the file is not cached at the current generation.
            refill = self._refills.get(outcome)
            if refill is None:
                await self._refill(outcome, scope, receive, send)
                return
            await self._wait_for(refill)
            outcome = await self._counted(wanted, scope, send, started)
        if isinstance(outcome, int):
            metrics.observe_poll(outcome, time.perf_counter() - started)
        else:
            await self.app(scope, receive, send)

    async def _counted(
        self, wanted: _Wanted, scope: Scope, send: Send, started: float
    ) -> int | _FileKey | None:
        """`_answered`, with a failure counted as the 500 the client gets (what goes on
        to the full handler is counted there)."""
        try:
            return await self._answered(wanted, scope, send)
        except Exception:
            metrics.observe_poll(500, time.perf_counter() - started)
            raise

    async def _refill(self, key: _FileKey, scope: Scope, receive: Receive, send: Send) -> None:
        """The first request for a file the cache lacks goes to the full handler, which
        fills the cache before it answers; requests for it meanwhile wait for that
        answer to start, then look again (and go on to the full handler themselves if
        it filled nothing: a file that does not exist, a refusal). After a publish every
        poll of a view misses at once: each went to the database, and a fleet's p99 rose
        from 5 ms to 70 ms (bench/fleet.py)."""
        refill = self._refills[key] = asyncio.Event()
        metrics.POLL_REFILLS.labels("led").inc()

        async def release_on_answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._release(key, refill)
            await send(message)

        try:
            await self.app(scope, receive, release_on_answer)
        finally:
            self._release(key, refill)

    def _release(self, key: _FileKey, refill: asyncio.Event) -> None:
        if self._refills.get(key) is refill:
            del self._refills[key]
        refill.set()

    async def _wait_for(self, refill: asyncio.Event) -> None:
        metrics.POLL_REFILLS.labels("waited").inc()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(refill.wait(), REFILL_WAIT_SECONDS)

    async def _answered(self, wanted: _Wanted, scope: Scope, send: Send) -> int | _FileKey | None:
        """The status answered; or the key of the file to refill, if only the file is
        not cached; or None if the full application must answer."""
        name, channel, role, version = wanted
        authorization = if_none_match = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value
            elif key == b"if-none-match":
                if_none_match = value
            elif (key == b"content-length" and value != b"0") or key == b"transfer-encoding":
                # No poll carries a body; the full handler reads (and drops) it, and
                # such a request never holds back the polls waiting for a refill.
                return None
        digest = None
        if authorization is not None:
            bearer, _, secret = authorization.partition(b" ")
            secret = secret.strip()
            if bearer.lower() != b"bearer" or not secret:
                return None
            # As `secrets.secret_digest`, of the same text (latin-1 is how it arrived,
            # and ASCII, as every secret tufa issues, encodes to the same bytes).
            if not secret.isascii():
                secret = secret.decode("latin-1").encode()
            digest = hashlib.sha256(secret).hexdigest()
        try:
            stamp = await self.stamps.stamp(name)
        except Exception:
            # The full handler, with its own connections, answers or reports the error.
            if not self._failing:
                log.warning("poll cache: cannot read factory generations", exc_info=True)
            self._failing = True
            return None
        self._failing = False
        if stamp is None:
            return None
        stored = self._cached(stamp, digest, channel, role, version)
        if not isinstance(stored, StoredFile):
            return stored
        answer = self._answers.get((stored.etag, stamp.anonymous_read, version is not None))
        if answer is None:
            answer = self._answer(stored, stamp.anonymous_read, version is not None)
        if if_none_match is not None and (
            # What a client sends back is the ETag it was given: compared as bytes first.
            if_none_match == answer.etag
            or etag_matches(if_none_match.decode("latin-1"), stored.etag)
        ):
            await send(
                {"type": "http.response.start", "status": 304, "headers": answer.not_modified}
            )
            await send({"type": "http.response.body", "body": b""})
            return 304
        await send({"type": "http.response.start", "status": 200, "headers": answer.full})
        await send({"type": "http.response.body", "body": stored.body})
        return 200

    def _cached(
        self,
        stamp: FactoryStamp,
        digest: str | None,
        channel: Channel,
        role: str,
        version: int | None,
    ) -> StoredFile | _FileKey | None:
        """The file this caller may read, if the cache knows both; the file's key if it
        knows the caller only; None otherwise. Who may read is decided as in
        `repo._authorize`, for a principal of the path's factory (the cache checks the
        factory); any refusal is left to the full handler."""
        if digest is None:
            if not stamp.anonymous_read:
                return None
            view = DEFAULT_VIEW
        else:
            principal = self.cache.principal(digest, stamp, self.now)
            if principal is None:
                return None
            note_caller(principal)
            if principal.kind == "device":
                if principal.channel != channel:
                    return None
            elif not principal.scopes & _READER_SCOPES:
                return None
            view = principal.view
        if version is not None:
            stored = self.repo.cached_version(stamp.id, channel, role, version)
        else:
            stored = self.cache.newest(stamp, channel, view, role)
        return stored or (stamp.id, channel, view, role, version)

    def _answer(self, stored: StoredFile, public: bool, versioned: bool) -> _Answer:
        """The 304 and the 200 headers of `stored`, as `repo.metadata` sends them."""
        visibility = b"public" if public else b"private"
        freshness = IMMUTABLE.encode() if versioned else b"no-cache"
        etag = stored.etag.encode()
        common = [(b"etag", etag), (b"cache-control", visibility + b", " + freshness)]
        full = [*common, (b"content-length", b"%d" % len(stored.body)), (b"content-type", _JSON)]
        if len(self._answers) >= _MAX_HEADERS:
            self._answers.clear()
        answer = self._answers[(stored.etag, public, versioned)] = _Answer(etag, common, full)
        return answer
