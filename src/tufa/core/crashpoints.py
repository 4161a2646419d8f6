"""Named points where a test can have the running process killed, as by a power cut.

Crash safety is tested by killing real processes at each step of a key operation or an
install, not by reasoning about it: a test sets TUFA_CRASH_AT to a point's name, and the
process sends itself SIGKILL when it reaches that point. Unset, this costs one lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "TUFA_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
