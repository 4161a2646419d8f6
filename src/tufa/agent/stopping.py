"""Stopping `tufa-agent run` on SIGTERM (a service manager) or SIGINT (Ctrl-C).

Waiting between checks, the agent stops at once. In the middle of a check it first
finishes the check (and an install under way), so that a stop never leaves a half-done
step to recover; a second signal stops at once, which the agent survives as it
survives a power cut.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from tufa.agent.state import Release

log = logging.getLogger("tufa.agent")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """Unwinds the run loop when a signal asks to stop now; not an Exception, so that no
    handler of check failures takes it for one."""


class Stopper:
    """What the run loop waits with: a sleep that a signal ends."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._waiting = False

    def listen(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        again = self.requested
        self.signal_name = signal.Signals(signum).name
        if self._waiting or again:
            raise StopRequested
        log.info(
            "%s received: stopping once the check under way is done (again to stop now)",
            self.signal_name,
        )

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`; StopRequested once a signal asks to stop."""
        self._waiting = True
        try:
            if self.requested:
                raise StopRequested
            time.sleep(seconds)
        finally:
            self._waiting = False


def say_stopped(signal_name: str, installed: Release | None) -> None:
    running = (
        f"version {installed.version} ({installed.target}) stays installed"
        if installed is not None
        else "nothing is installed yet"
    )
    log.info("stopped on %s; %s", signal_name, running)
