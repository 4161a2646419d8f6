"""Crash-safe writing of files that hold secrets (archives, tokens, keys)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tufa.core.crashpoints import crashpoint


def write_private_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, readable by the owner only (mode 0600).

    The bytes go to a temporary file in the same folder, are fsync'd, then renamed over
    the target, and the folder is fsync'd: a crash at any point leaves either the old
    file or the new one, never a mix, so an archive holding private keys is never lost.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            crashpoint("write:half-written")
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        crashpoint("write:before-rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)
    _remove_abandoned_copies(folder, path.name)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned_copies(folder: Path, name: str) -> None:
    """Delete temporary copies that a killed writer left (they may hold private keys)."""
    for leftover in folder.glob(f".{name}.*.tmp"):
        pid = leftover.name[len(name) + 2 : -len(".tmp")]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_plain_name(name: str) -> bool:
    """A file name that stays inside its folder: no separator, not `.` or `..`.

    tufa target names are letters, digits and `._+-` only, so this refuses none of
    them; it keeps names from untrusted places (a bundle directory anyone can write,
    metadata signed with stolen keys) from reaching other files.
    """
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")


def default_database_url(data_dir: Path) -> str:
    """The embedded SQLite database of a server data directory."""
    return f"sqlite:///{(Path(data_dir) / 'tufa.db').resolve()}"
