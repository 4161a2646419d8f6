"""Installers: how a verified file becomes what the device runs.

`SlotInstaller` (the default) keeps two slots and a `current` symlink. A release is
written in full into the slot that is not running, then `current` is switched to it in
one rename, so a power cut leaves `current` on a complete slot, old or new. A health
check decides whether the new slot stays; if not, `current` goes back.

`CommandInstaller` hands the verified file to a command of the user's (a package
manager, a flashing tool); its exit status decides. It is run again after a power cut
that interrupted it, so it must be safe to repeat.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from tufa.agent.state import AgentError, InstallerKind, Release, StateDir
from tufa.core.crashpoints import crashpoint
from tufa.core.files import fsync_dir, write_private_file

SLOT_NAMES = ("a", "b")
RELEASE_FILE = "release.json"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str = ""


class Installer(Protocol):
    # Whether a failed activation puts the previous release back (worth an event).
    rolls_back: bool

    def stage(self, release: Release, file: Path) -> Release:
        """Prepare `release` without changing what runs; returns it as staged."""

    def activate(self, release: Release) -> Outcome:
        """Make the staged release the one that runs, and check that it works."""

    def resume(self, release: Release) -> Outcome | None:
        """After a restart with `release` half-installed: finish it (an outcome) or
        report that it never took effect (None), so it can be installed again."""

    def roll_back(self, previous: Release | None) -> None:
        """Return to `previous` (None: to nothing installed) after a failed activation."""


def _run(command: str, env: dict[str, str], timeout: float, what: str) -> Outcome:
    try:
        # The device owner's own command line, run by their shell as they wrote it.
        done = subprocess.run(  # noqa: S602
            command,
            shell=True,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            errors="replace",  # a command may print anything; its verdict is its status
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Outcome(False, f"{what} did not finish within {timeout:g} s")
    except OSError as e:
        return Outcome(False, f"{what} could not be started: {e}")
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()[-500:]
        return Outcome(False, f"{what} exited with status {done.returncode}: {output}")
    return Outcome(True)


def _release_env(release: Release, path: Path) -> dict[str, str]:
    return {
        "TUFA_TARGET_PATH": str(path),
        "TUFA_TARGET_NAME": release.target,
        "TUFA_TARGET_VERSION": release.version,
        "TUFA_TARGET_SHA256": release.sha256,
    }


class SlotInstaller:
    rolls_back = True

    def __init__(self, state: StateDir, health_check: str | None, timeout: float) -> None:
        self.state = state
        self.health_check = health_check
        self.timeout = timeout

    def active_slot(self) -> str | None:
        try:
            return Path(os.readlink(self.state.current)).name
        except FileNotFoundError:
            return None

    def installed_path(self, release: Release) -> Path:
        return self.state.current / release.target

    def stage(self, release: Release, file: Path) -> Release:
        slot = "b" if self.active_slot() == "a" else "a"
        folder = self.state.slots / slot
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        crashpoint("install:slot-cleared")
        placed = folder / release.target
        try:
            os.link(file, placed)  # same file system: no second copy of a large image
        except OSError:
            shutil.copyfile(file, placed)
            with placed.open("rb") as f:
                os.fsync(f.fileno())
        crashpoint("install:file-placed")
        staged = replace(release, slot=slot)
        write_private_file(folder / RELEASE_FILE, json.dumps(staged.to_report()).encode())
        fsync_dir(folder)
        crashpoint("install:slot-written")
        return staged

    def _point_current_at(self, slot: str | None) -> None:
        if slot is None:
            self.state.current.unlink(missing_ok=True)
        else:
            link = self.state.path / "current.new"
            link.unlink(missing_ok=True)
            link.symlink_to(Path("slots") / slot)
            os.replace(link, self.state.current)
        fsync_dir(self.state.path)

    def activate(self, release: Release) -> Outcome:
        self._point_current_at(release.slot)
        crashpoint("install:switched")
        return self._check(release)

    def _check(self, release: Release) -> Outcome:
        if not self.health_check:
            return Outcome(True)
        outcome = _run(
            self.health_check,
            _release_env(release, self.installed_path(release)),
            self.timeout,
            "the health check",
        )
        crashpoint("install:health-checked")
        return outcome

    def resume(self, release: Release) -> Outcome | None:
        if release.slot is None or self.active_slot() != release.slot:
            return None  # the switch never happened: what runs is untouched
        return self._check(release)

    def roll_back(self, previous: Release | None) -> None:
        self._point_current_at(previous.slot if previous else None)


class CommandInstaller:
    rolls_back = False

    def __init__(self, state: StateDir, command: str, timeout: float) -> None:
        self.state = state
        self.command = command
        self.timeout = timeout

    def stage(self, release: Release, file: Path) -> Release:
        return release

    def activate(self, release: Release) -> Outcome:
        file = self.state.downloads / release.sha256
        return _run(self.command, _release_env(release, file), self.timeout, "the install command")

    def resume(self, release: Release) -> Outcome | None:
        if not (self.state.downloads / release.sha256).exists():
            return None
        return self.activate(release)

    def roll_back(self, previous: Release | None) -> None:
        """A command installs in one step; there is nothing of ours to undo."""


def make_installer(
    state: StateDir,
    kind: InstallerKind,
    command: str | None,
    health_check: str | None,
    timeout: float,
) -> Installer:
    if kind == "slots":
        return SlotInstaller(state, health_check, timeout)
    if kind == "command":
        if not command:
            raise AgentError("the command installer needs --install-command")
        return CommandInstaller(state, command, timeout)
    raise AgentError(f"unknown installer {kind!r} in the configuration: use slots or command")
