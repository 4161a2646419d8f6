"""The kinds of event a device reports: the agent sends them and the server accepts
only these, so both sides name them from this one list."""

from __future__ import annotations

from typing import Literal, get_args

EventKind = Literal[
    "download-started",
    "download-finished",
    "download-failed",
    "installed",
    "install-failed",
    "rolled-back",
    "check-failed",
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
# A broken download counts as a failed install for a staged rollout's health gate once
# a device has reported this many `download-failed` for the version: the agent tries
# again at each check, so one failure may be a link that dropped once.
DOWNLOAD_ATTEMPTS = 3
