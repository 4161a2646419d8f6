"""`tufa-server run --workers N`: what the parent process hands its worker processes.

uvicorn starts each worker as a fresh interpreter that imports the application by
name, so the settings travel in the environment, as JSON; the parent has already done
the start-up work (migrations, the master key check, the operator token, the first
re-signing pass) before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from tufa.core.keys import KeyType
from tufa.server.settings import Clock, OffsetClock, Settings

SETTINGS_ENV = "TUFA_WORKER_SETTINGS"
LOG_LEVEL_ENV = "TUFA_WORKER_LOG_LEVEL"
LOG_FORMAT_ENV = "TUFA_WORKER_LOG_FORMAT"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _encode(value: Any) -> Any:
    if isinstance(value, KeyType):  # before str: a KeyType is a str too
        return {"key_type": value.value}
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, timedelta):
        return {"seconds": value.total_seconds()}
    if isinstance(value, OffsetClock):
        return {"clock_offset_file": str(value.offset_file)}
    if type(value) is Clock:
        return {"clock": "real"}
    raise TypeError(f"cannot hand a setting of type {type(value).__name__} to workers")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    decoders: dict[str, Any] = {
        "key_type": KeyType,
        "path": Path,
        "seconds": lambda s: timedelta(seconds=s),
        "clock_offset_file": lambda p: OffsetClock(Path(p)),
        "clock": lambda _: Clock(),
    }
    return decoders[kind](inner)


def settings_to_json(settings: Settings) -> str:
    return json.dumps(
        {f.name: _encode(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    )


def settings_from_json(encoded: str) -> Settings:
    return Settings(**{name: _decode(value) for name, value in json.loads(encoded).items()})


def hand_over(settings: Settings, log_level: str, log_format: str) -> None:
    """Put the settings where the workers find them, and give their metrics a fresh
    shared directory (DATA_DIR/metrics): counts of an earlier run do not carry over."""
    os.environ[SETTINGS_ENV] = settings_to_json(settings)
    os.environ[LOG_LEVEL_ENV] = log_level
    os.environ[LOG_FORMAT_ENV] = log_format
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(mode=0o700)
    os.environ[METRICS_DIR_ENV] = str(metrics_dir)


def handed_over() -> tuple[Settings, str, str]:
    """In a worker: the settings, log level and log format its parent handed over."""
    return (
        settings_from_json(os.environ[SETTINGS_ENV]),
        os.environ[LOG_LEVEL_ENV],
        os.environ[LOG_FORMAT_ENV],
    )
