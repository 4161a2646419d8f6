"""The agent's downloads: `downloads/<sha256>` once verified, `<sha256>.part` before.

The transfer itself (resume, length bound, hash check) is `tufa.core.download`; this
module keeps the agent's folder in order (one cut download at a time, room on the
disk) and words each failure for the device's log and status.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from tuf.api.metadata import TargetFile

from tufa.agent.state import AgentError
from tufa.core import download as verified
from tufa.core.crashpoints import crashpoint
from tufa.core.download import Progress

log = logging.getLogger("tufa.agent")

# Room left on the disk beyond the file itself, for metadata and status writes.
FREE_SPACE_MARGIN = 1024 * 1024
PROGRESS_EVERY = 2.0  # seconds between progress lines


class DownloadFailed(AgentError):
    """The transfer broke off; what arrived is kept and the next attempt resumes."""


def sha256_of(target: TargetFile) -> str:
    return target.hashes["sha256"]


def partial_download_exists(target: TargetFile, downloads: Path) -> bool:
    """Is some of `target` on disk already (complete, or cut and to be resumed)?"""
    dest = downloads / sha256_of(target)
    return dest.exists() or verified.part_of(dest).exists()


def download(client: httpx.Client, url: str, target: TargetFile, downloads: Path) -> Path:
    """Fetch `target` from `url` into `downloads`, resuming a cut transfer."""
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / sha256_of(target)
    if verified.is_verified(dest, target):
        return dest
    # A cut download of a release that has since been superseded would never finish.
    for stale in downloads.glob("*.part"):
        if stale != verified.part_of(dest):
            stale.unlink(missing_ok=True)
    _check_free_space(downloads, target.length - verified.resume_offset(dest, target))
    with _worded(url):
        file = verified.download(client, url, target, dest, progress=_progress_log(target))
    log.info("%s: downloaded %s bytes", target.path, target.length)
    return file


def copy_verified(source: Path, target: TargetFile, downloads: Path) -> Path:
    """Copy a local file (from an offline bundle) into `downloads`, with the same
    length bound and hash check as a download."""
    downloads.mkdir(parents=True, exist_ok=True)
    if not source.is_file():  # missing, or a FIFO that would never end
        raise AgentError(f"{source} is missing from the bundle or not a regular file")
    size = source.stat().st_size
    if size != target.length:
        raise AgentError(
            f"{source} holds {size} bytes; the signed metadata says {target.length}: refused"
        )
    _check_free_space(downloads, size)
    with _worded(str(source)):
        return verified.copy(
            source, target, downloads / sha256_of(target), progress=_progress_log(target)
        )


@contextmanager
def _worded(url: str) -> Iterator[None]:
    """The agent's words for each way a download of a target from `url` fails."""
    try:
        yield
    except verified.DownloadError as e:
        raise _agent_error(e, url) from e


def _agent_error(error: verified.DownloadError, url: str) -> AgentError:
    name, length = error.target.path, error.target.length
    if isinstance(error, verified.Mismatch):
        return AgentError(
            f"{name}: the bytes do not match the signed hash, so they were thrown away "
            f"({error.error})"
        )
    if isinstance(error, verified.TooLong):
        return AgentError(
            f"{name}: the server sent more than the {length} bytes the signed metadata "
            "allows; download refused"
        )
    if isinstance(error, verified.DiskFull):
        return AgentError(
            f"the disk holding {error.folder} is full: {name} was not saved; free some "
            "space and the next check downloads it again"
        )
    if isinstance(error, verified.CannotResume):
        return DownloadFailed(
            f"{name}: the server could not resume at byte {error.offset} "
            f"(HTTP {error.status}); the download starts over"
        )
    if isinstance(error, verified.Refused):
        return DownloadFailed(f"{name}: the server answered HTTP {error.refusal.status} for {url}")
    if isinstance(error, verified.Interrupted):
        return DownloadFailed(f"{name}: download interrupted ({error.error}); it will resume")
    if isinstance(error, verified.Short):
        return DownloadFailed(
            f"{name}: the transfer stopped at {error.received} of {length} bytes; "
            "the next attempt resumes"
        )
    return AgentError(str(error))


def _progress_log(target: TargetFile) -> Progress:
    """A progress line every few seconds; the power-cut tests cut at the checkpoint
    half-way, which the download has just synced."""
    last_report = time.monotonic()
    previous: int | None = None  # the first call says where the file starts
    half = target.length // 2

    def report(written: int) -> None:
        nonlocal last_report, previous
        if previous is not None and previous < half <= written:
            crashpoint("download:half-written")
        previous = written
        if time.monotonic() - last_report >= PROGRESS_EVERY:
            last_report = time.monotonic()
            log.info(
                "%s: %d%% (%s of %s bytes)",
                target.path,
                100 * written // max(target.length, 1),
                written,
                target.length,
            )

    return report


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise AgentError(
            f"not enough free space in {folder}: the download needs {_mib(needed)} more "
            f"and {_mib(free)} is free; free some space (old files in {folder} can go)"
        )


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"
