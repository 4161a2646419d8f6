"""Resumable, length-bounded, hash-checked target downloads.

python-tuf's `download_target` starts over on every attempt; device images are large
and device links flaky, so the agent keeps what it got in `downloads/<sha256>.part`
and asks for the rest with a Range request. The signed length bounds what it accepts
(a server that keeps sending is cut off at once), and the file becomes
`downloads/<sha256>` only after its length and hash match the signed metadata.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tuf.api import exceptions
from tuf.api.metadata import TargetFile

from tufa.agent.state import AgentError
from tufa.core.crashpoints import crashpoint

log = logging.getLogger("tufa.agent")

CHUNK_SIZE = 256 * 1024
# Room left on the disk beyond the file itself, for metadata and status writes.
FREE_SPACE_MARGIN = 1024 * 1024
PROGRESS_EVERY = 2.0  # seconds between progress lines


class DownloadFailed(AgentError):
    """The transfer broke off; what arrived is kept and the next attempt resumes."""


def sha256_of(target: TargetFile) -> str:
    return target.hashes["sha256"]


def _verified_file(target: TargetFile, downloads: Path) -> Path | None:
    """A completed download of `target`, if one is on disk and still matches."""
    path = downloads / sha256_of(target)
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            target.verify_length_and_hashes(f)
    except exceptions.LengthOrHashMismatchError:
        path.unlink()
        return None
    return path


def partial_download_exists(target: TargetFile, downloads: Path) -> bool:
    """Is some of `target` on disk already (complete, or cut and to be resumed)?"""
    sha256 = sha256_of(target)
    return (downloads / sha256).exists() or (downloads / f"{sha256}.part").exists()


def download(client: httpx.Client, url: str, target: TargetFile, downloads: Path) -> Path:
    """Fetch `target` from `url` into `downloads`, resuming a cut transfer."""
    downloads.mkdir(parents=True, exist_ok=True)
    done = _verified_file(target, downloads)
    if done is not None:
        return done
    part = downloads / f"{sha256_of(target)}.part"
    # A cut download of a release that has since been superseded would never finish.
    for stale in downloads.glob("*.part"):
        if stale != part:
            stale.unlink(missing_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if offset > target.length:
        part.unlink()
        offset = 0
    _check_free_space(downloads, target.length - offset)
    if offset < target.length:
        _transfer(client, url, target, part, offset)
    return _accept(part, target, downloads)


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
    part = downloads / f"{sha256_of(target)}.part"
    with source.open("rb") as f:
        _write(part, "wb", 0, target, iter(lambda: f.read(CHUNK_SIZE), b""))
    return _accept(part, target, downloads)


def _accept(part: Path, target: TargetFile, downloads: Path) -> Path:
    """Keep `part` as the verified file of `target`, or delete it if it does not match."""
    try:
        with part.open("rb") as f:
            target.verify_length_and_hashes(f)
    except exceptions.LengthOrHashMismatchError as e:
        part.unlink()
        raise AgentError(
            f"{target.path}: the bytes do not match the signed hash, so they were thrown away ({e})"
        ) from e
    final = downloads / sha256_of(target)
    os.replace(part, final)
    return final


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise AgentError(
            f"not enough free space in {folder}: the download needs {_mib(needed)} more "
            f"and {_mib(free)} is free; free some space (old files in {folder} can go)"
        )


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def _transfer(client: httpx.Client, url: str, target: TargetFile, part: Path, offset: int) -> None:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 206 and _range_start(response) == offset:
                mode = "ab"
            elif response.status_code == 200:
                offset, mode = 0, "wb"
            elif offset and response.status_code in (206, 416):
                # The server cannot resume where we stopped: start over next time.
                part.unlink(missing_ok=True)
                raise DownloadFailed(
                    f"{target.path}: the server could not resume at byte {offset} "
                    f"(HTTP {response.status_code}); the download starts over"
                )
            else:
                raise DownloadFailed(
                    f"{target.path}: the server answered HTTP {response.status_code} for {url}"
                )
            if offset:
                log.info("%s: resuming at %s of %s", target.path, offset, target.length)
            _write(part, mode, offset, target, response.iter_bytes(CHUNK_SIZE))
    except httpx.HTTPError as e:
        raise DownloadFailed(f"{target.path}: download interrupted ({e}); it will resume") from e


def _range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _write(part: Path, mode: str, offset: int, target: TargetFile, chunks: Iterator[bytes]) -> None:
    written = offset
    half = target.length // 2
    last_report = time.monotonic()
    try:
        with part.open(mode) as f:
            for chunk in chunks:
                if written + len(chunk) > target.length:
                    f.close()
                    part.unlink()
                    raise AgentError(
                        f"{target.path}: the server sent more than the {target.length} bytes "
                        "the signed metadata allows; download refused"
                    )
                f.write(chunk)
                if written < half <= written + len(chunk):
                    f.flush()
                    os.fsync(f.fileno())
                    crashpoint("download:half-written")
                written += len(chunk)
                if time.monotonic() - last_report >= PROGRESS_EVERY:
                    last_report = time.monotonic()
                    log.info(
                        "%s: %d%% (%s of %s bytes)",
                        target.path,
                        100 * written // max(target.length, 1),
                        written,
                        target.length,
                    )
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise AgentError(
            f"the disk holding {part.parent} is full: {target.path} was not saved; free "
            "some space and the next check downloads it again"
        ) from e
    if written < target.length:
        raise DownloadFailed(
            f"{target.path}: the transfer stopped at {written} of {target.length} bytes; "
            "the next attempt resumes"
        )
    log.info("%s: downloaded %s bytes", target.path, written)
