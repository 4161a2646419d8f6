"""The server's background work: re-signing online metadata, stepping staged rollouts
and delivering webhooks. Each runs in the one process that holds its lock
(resigner.ResignerLock: the re-signer's for the first two, one of its own for the
deliverer, webhook_delivery.py), at its own interval; the others stand by and try the
lock at each of their turns, so when the holder dies another takes over within an
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from tufa.server.metrics import RESIGNER
from tufa.server.resigner import ResignerLock
from tufa.server.rollouts import Rollouts
from tufa.server.state import ServerState
from tufa.server.webhook_delivery import deliver_forever

log = logging.getLogger("tufa.server")


async def resign_pass(state: ServerState) -> None:
    try:
        refreshed = await asyncio.to_thread(state.repo.resign_due)
        if refreshed:
            log.info("re-signed online metadata of %d channel(s)", refreshed)
    except Exception:
        log.exception(
            "re-signing pass failed; trying again in %ss",
            state.settings.resign_interval.total_seconds(),
        )


async def rollout_pass(state: ServerState) -> None:
    try:
        await asyncio.to_thread(Rollouts(state).advance_all)
    except Exception:
        log.exception(
            "staged rollouts pass failed; trying again in %ss",
            state.settings.rollout_interval.total_seconds(),
        )


class _Turns:
    """The lock, taken by one job at a time: its connection is not shared by threads."""

    def __init__(self, lock: ResignerLock) -> None:
        self.lock = lock
        self._guard = asyncio.Lock()

    async def take(self) -> bool:
        async with self._guard:
            held = await asyncio.to_thread(self.lock.take)
        RESIGNER.set(1 if held else 0)
        return held


async def _every(seconds: float, turns: _Turns, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        if await turns.take():
            await job()


@contextlib.asynccontextmanager
async def background(state: ServerState, *, first_resign_pass: bool) -> AsyncIterator[None]:
    """Run the background jobs while the server runs. The first re-signing pass runs
    before the server answers anything: after downtime no device is served a timestamp
    that had expired while the server was down. Every replica runs it (it is safe at
    once); only the loops take turns."""
    turns = _Turns(ResignerLock(state.db))
    RESIGNER.set(0)
    tasks = []
    if state.settings.resign_enabled:
        if first_resign_pass:
            await resign_pass(state)
        tasks.append(
            _every(
                state.settings.resign_interval.total_seconds(), turns, lambda: resign_pass(state)
            )
        )
    tasks.append(
        _every(state.settings.rollout_interval.total_seconds(), turns, lambda: rollout_pass(state))
    )
    if not await turns.take():
        log.info("the background jobs run in another process; this one stands by")
    running = [asyncio.create_task(t) for t in (*tasks, deliver_forever(state))]
    try:
        yield
    finally:
        for task in running:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(turns.lock.release)
