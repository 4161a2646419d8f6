"""Verified target downloads, for the device agent and for the CLI's offline bundles.

A target is streamed into `DEST.part`, never past its signed length (a source that
keeps sending is cut off at once), and becomes DEST only once python-tuf's
`TargetFile.verify_length_and_hashes` accepts it. python-tuf's own `download_target`
starts over on every attempt; device images are large and device links flaky, so a
cut transfer keeps what arrived and the next call asks for the rest with a Range
request.

Every failure is a `DownloadError` subclass carrying what its caller needs to word it:
the agent and the CLI give different advice for the same failure.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from tuf.api import exceptions
from tuf.api.metadata import TargetFile

from tufa.core.responses import Refusal, streamed_refusal

log = logging.getLogger("tufa.download")

CHUNK_SIZE = 256 * 1024

# Told the bytes of the file so far: first where it starts (0, or where it resumes),
# then after each chunk, the half-way checkpoint included.
Progress = Callable[[int], None]


class DownloadError(Exception):
    """A download that ended without a verified file of `target`."""

    def __init__(self, target: TargetFile, detail: str) -> None:
        super().__init__(f"{target.path}: {detail}")
        self.target = target


class Refused(DownloadError):
    """The source answered with neither the file nor the asked-for part of it."""

    def __init__(self, target: TargetFile, refusal: Refusal) -> None:
        super().__init__(target, str(refusal))
        self.refusal = refusal


class CannotResume(DownloadError):
    """The source cannot send the rest from `offset`; what arrived is gone."""

    def __init__(self, target: TargetFile, offset: int, status: int) -> None:
        super().__init__(target, f"cannot resume at byte {offset} (HTTP {status})")
        self.offset = offset
        self.status = status


class Interrupted(DownloadError):
    """The transfer broke off (`error`); what arrived is kept for the next call."""

    def __init__(self, target: TargetFile, error: httpx.HTTPError) -> None:
        super().__init__(target, f"interrupted ({error})")
        self.error = error


class Short(DownloadError):
    """The answer ended `received` bytes in, before the signed length; the bytes are kept."""

    def __init__(self, target: TargetFile, received: int) -> None:
        super().__init__(target, f"stopped at {received} of {target.length} bytes")
        self.received = received


class TooLong(DownloadError):
    """The source sent more than the signed length; what arrived is gone."""

    def __init__(self, target: TargetFile) -> None:
        super().__init__(target, f"more than the {target.length} signed bytes")


class Mismatch(DownloadError):
    """The bytes do not match the signed length and hashes (`error`); they are gone."""

    def __init__(self, target: TargetFile, error: exceptions.LengthOrHashMismatchError) -> None:
        super().__init__(target, f"length or hash mismatch ({error})")
        self.error = error


class DiskFull(DownloadError):
    """The disk holding `folder` filled up; what arrived is gone."""

    def __init__(self, target: TargetFile, folder: Path) -> None:
        super().__init__(target, f"the disk holding {folder} is full")
        self.folder = folder


def part_of(dest: Path) -> Path:
    """Where the bytes of `dest` gather until they are verified."""
    return dest.with_name(f"{dest.name}.part")


def is_verified(dest: Path, target: TargetFile) -> bool:
    """Does `dest` hold `target` already? A file there that does not match goes."""
    if not dest.exists():
        return False
    try:
        with dest.open("rb") as f:
            target.verify_length_and_hashes(f)
    except exceptions.LengthOrHashMismatchError:
        dest.unlink()
        return False
    return True


def resume_offset(dest: Path, target: TargetFile) -> int:
    """How many bytes of `target` a download into `dest` has already; a part longer
    than the signed length cannot be the target, and goes."""
    part = part_of(dest)
    offset = part.stat().st_size if part.exists() else 0
    if offset > target.length:
        part.unlink()
        return 0
    return offset


def download(
    client: httpx.Client,
    url: str,
    target: TargetFile,
    dest: Path,
    *,
    progress: Progress | None = None,
    timeout: httpx.Timeout | float | None = None,
) -> Path:
    """Fetch `target` from `url` into `dest`, resuming a cut transfer; `timeout` (per
    read or write) replaces the client's."""
    if is_verified(dest, target):
        return dest
    part = part_of(dest)
    offset = resume_offset(dest, target)
    if offset < target.length:
        _transfer(client, url, target, part, offset, progress, timeout)
    return _accept(part, target, dest)


def copy(source: Path, target: TargetFile, dest: Path, *, progress: Progress | None = None) -> Path:
    """Copy a local file (from an offline bundle) into `dest`, with the same length
    bound and hash check as a download."""
    with source.open("rb") as f:
        chunks = iter(lambda: f.read(CHUNK_SIZE), b"")
        _write(part_of(dest), "wb", 0, target, chunks, progress)
    return _accept(part_of(dest), target, dest)


def _accept(part: Path, target: TargetFile, dest: Path) -> Path:
    """Keep `part` as the verified file of `target`, or delete it if it does not match."""
    try:
        with part.open("rb") as f:
            target.verify_length_and_hashes(f)
    except exceptions.LengthOrHashMismatchError as e:
        part.unlink()
        raise Mismatch(target, e) from e
    os.replace(part, dest)
    return dest


def _transfer(
    client: httpx.Client,
    url: str,
    target: TargetFile,
    part: Path,
    offset: int,
    progress: Progress | None,
    timeout: httpx.Timeout | float | None,
) -> None:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream(
            "GET",
            url,
            headers=headers,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        ) as response:
            if response.status_code == 206 and _range_start(response) == offset:
                mode = "ab"
            elif response.status_code == 200:
                offset, mode = 0, "wb"
            elif offset and response.status_code in (206, 416):
                # The source cannot resume where we stopped: start over next time.
                part.unlink(missing_ok=True)
                raise CannotResume(target, offset, response.status_code)
            else:
                raise Refused(target, streamed_refusal(response))
            if offset:
                log.info("%s: resuming at %s of %s", target.path, offset, target.length)
            _write(part, mode, offset, target, response.iter_bytes(CHUNK_SIZE), progress)
    except httpx.HTTPError as e:
        raise Interrupted(target, e) from e


def _range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _write(
    part: Path,
    mode: str,
    offset: int,
    target: TargetFile,
    chunks: Iterator[bytes],
    progress: Progress | None,
) -> None:
    written = offset
    half = target.length // 2
    if progress is not None:
        progress(written)
    try:
        with part.open(mode) as f:
            for chunk in chunks:
                if written + len(chunk) > target.length:
                    f.close()
                    part.unlink()
                    raise TooLong(target)
                f.write(chunk)
                if written < half <= written + len(chunk):
                    # A checkpoint: the first half survives a power cut, and the next
                    # call resumes from there.
                    f.flush()
                    os.fsync(f.fileno())
                written += len(chunk)
                if progress is not None:
                    progress(written)
            # Synced before it counts as downloaded: a device may lose power next, and
            # a USB stick is pulled soon after the CLI ends.
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise DiskFull(target, part.parent) from e
    if written < target.length:
        raise Short(target, written)
