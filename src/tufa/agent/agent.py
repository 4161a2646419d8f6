"""One device's update cycle: refresh, select, download, install, report.

Each step starts from what ngclient verified; what to install is decided in
`tufa.agent.plan`. The agent talks to its server through one HTTP client for its run
(metadata, targets, reports, the credential), which sends the device credential.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx
import tuf
from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface

import tufa
from tufa.agent.download import (
    DownloadFailed,
    copy_verified,
    download,
    partial_download_exists,
)
from tufa.agent.install import Outcome, make_installer
from tufa.agent.plan import Plan, plan_for
from tufa.agent.reports import EventQueue, send_reports
from tufa.agent.state import AgentError, AgentStatus, Release, StateDir, printable
from tufa.agent.stopping import Stopper
from tufa.agent.trust import (
    VERIFICATION_ERRORS,
    ChannelGuard,
    open_updater,
    trusted_targets,
    verified_timestamp,
)
from tufa.core.bundle import BUNDLE_METADATA_URL, TARGETS_DIR, BundleFetcher, read_manifest
from tufa.core.clock import now_iso
from tufa.core.crashpoints import crashpoint
from tufa.core.device_events import DOWNLOAD_ATTEMPTS
from tufa.core.fetcher import BearerFetcher, CredentialRefused
from tufa.core.http import api_client
from tufa.core.metadata import Channel
from tufa.core.responses import refusal_of
from tufa.core.selection import custom_of

log = logging.getLogger("tufa.agent")

USER_AGENT = f"tufa-agent/{tufa.__version__} python-tuf/{tuf.__version__}"
HEARTBEAT = 3600.0  # seconds between reports of an idle device


class Agent:
    def __init__(self, state: StateDir, timeout: float = 30.0) -> None:
        self.state = state
        self.config = state.config()
        self.credential = state.credential()
        self.events = EventQueue(state.path)
        self.installer = make_installer(
            state,
            self.config.installer,
            self.config.install_command,
            self.config.health_check,
            self.config.health_timeout,
        )
        limits = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.client, self.auth = api_client(self.credential, USER_AGENT, limits)
        # Targets hosted elsewhere (a CDN, a bucket) never see the device credential.
        self.external = httpx.Client(
            headers={"User-Agent": USER_AGENT}, timeout=limits, follow_redirects=True
        )
        self.fetcher = BearerFetcher(client=(self.client, self.auth))
        self.poll_interval: float | None = None  # told to the server; `run` sets it

    def reload_credential(self) -> None:
        """Use the credential file as it is now: a `rotate-credential` (or a new
        registration) may have replaced it while this process ran."""
        credential = self.state.credential()
        if credential != self.credential:
            self.credential = credential
            self.auth.token = credential

    def close(self) -> None:
        self.client.close()
        self.external.close()

    # Recovery ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish or undo an install that a power cut (or a broken step) interrupted."""
        status = self.state.status()
        pending = status.pending
        if pending is None:
            return
        if pending.sha256 in status.failed:
            log.warning("finishing the rollback of version %s", pending.version)
            self.installer.roll_back(status.installed)
            status.pending = None
            self.state.save_status(status)
            (self.state.downloads / pending.sha256).unlink(missing_ok=True)
            return
        try:
            outcome = self.installer.resume(pending)
        except Exception as e:
            outcome = Outcome(False, f"the install step broke: {describe_error(e)}")
        if outcome is None:
            log.warning(
                "the install of version %s was cut before it took effect; the device still "
                "runs %s and will install it again",
                pending.version,
                status.installed.version if status.installed else "nothing",
            )
            status.pending = None
            self.state.save_status(status)
            return
        log.info("finishing the install of version %s that a restart interrupted", pending.version)
        self._conclude(status, pending, outcome)

    # One cycle ----------------------------------------------------------------------------

    def check(
        self,
        metadata_url: str | None = None,
        fetcher: FetcherInterface | None = None,
        only: tuple[str, ...] | None = None,
    ) -> Plan:
        """Refresh the trusted metadata (from the server, or another source such as an
        offline bundle) and decide, among the targets named `only` if given; nothing is
        downloaded."""
        self.reload_credential()
        status = self.state.status()
        try:
            updater = open_updater(
                self.state.metadata,
                metadata_url or self.config.metadata_url,
                ChannelGuard(fetcher or self.fetcher, self.config.channel),
            )
            updater.refresh()
            targets = list(trusted_targets(self.state.metadata).values())
            if only is not None:
                targets = [t for t in targets if t.path in only]
            plan = plan_for(
                status, self.config.channel, self.config.hardware_id, self.config.tag, targets
            )
        except Exception as e:
            self._record_error(status, e)
            raise
        status.last_check = now_iso()
        self.state.save_status(status)
        return plan

    def poll(self) -> Plan:
        """One full cycle: finish an interrupted install, check, install what the check
        found; then report (unless the server refused the credential: so would it the
        report)."""
        refused = False
        try:
            self.recover()
            plan = self.check()
            log.info("%s", plan.reason)
            if plan.release is not None and plan.target is not None:
                file = self._download(plan.release, plan.target)
                self.install(plan.release, file)
            status = self.state.status()
            status.last_error = None
            self.state.save_status(status)
            return plan
        except CredentialRefused:
            refused = True
            raise
        finally:
            if not refused:
                self.report()

    def report(self) -> None:
        """Send queued events, the installed release and the timestamp the device last
        verified; an idle device still reports once an hour, so the server can tell it
        is alive (and whether its metadata went stale), and a device reports as soon as
        it verified a timestamp it has not reported, so the server soon sees it fresh."""
        status = self.state.status()
        verified = verified_timestamp(self.state.metadata)
        version = verified["version"] if verified is not None else None
        due = status.reported_at is None or time.time() - status.reported_at >= HEARTBEAT
        changed = version != status.reported_timestamp
        if status.reported and not due and not changed and not self.events.pending():
            return
        url, interval = self.config.reports_url, self.poll_interval
        if send_reports(self.client, url, self.events, status.installed, verified, interval):
            status = self.state.status()
            status.reported = True
            status.reported_at = time.time()
            status.reported_timestamp = version
            self.state.save_status(status)

    def _record_error(self, status: AgentStatus, error: BaseException) -> None:
        message = describe_error(error)
        if isinstance(error, VERIFICATION_ERRORS) and message != status.last_error:
            self.events.add("check-failed", None, message)
        status.last_error = message
        status.last_check = now_iso()
        self.state.save_status(status)

    def _download(self, release: Release, target: TargetFile) -> Path:
        external = custom_of(target).get("url")
        if isinstance(external, str):
            url, client = external, self.external
        else:
            url = f"{self.config.targets_url}{release.sha256}.{release.target}"
            client = self.client
        if not partial_download_exists(target, self.state.downloads):
            self.events.add("download-started", release)
        try:
            file = download(client, url, target, self.state.downloads)
        except AgentError as e:
            status = self.state.status()
            # An outage can cut the same download at every check: say it once, after the
            # attempts a staged rollout's health gate counts (core.device_events).
            attempts = status.download_failures.get(release.sha256, 0)
            repeated = isinstance(e, DownloadFailed) and str(e) == status.last_error
            if attempts < DOWNLOAD_ATTEMPTS or not repeated:
                self.events.add("download-failed", release, str(e))
                status.download_failures = {release.sha256: attempts + 1}
            self._record_error(status, e)
            raise
        status = self.state.status()
        if status.download_failures:
            status.download_failures = {}
            self.state.save_status(status)
        self.events.add("download-finished", release)
        return file

    def install_bundle(self, bundle_dir: Path) -> Plan:
        """Verify an offline bundle with the same rules as the server's metadata, and
        install what it holds for this device. Events wait for the next online check."""
        manifest = read_manifest(bundle_dir)
        if manifest.factory != self.config.factory:
            raise AgentError(
                f"{bundle_dir} is a bundle of factory {manifest.factory!r}; this device "
                f"belongs to {self.config.factory!r}"
            )
        if manifest.channel != self.config.channel:
            flag = "--prod" if self.config.channel == Channel.PROD else "no --prod"
            raise AgentError(
                f"{bundle_dir} is a {manifest.channel} bundle and this device follows the "
                f"{self.config.channel} channel: write the bundle with {flag}"
            )
        if manifest.tag != self.config.tag:
            raise AgentError(
                f"{bundle_dir} is a bundle for tag {manifest.tag} and this device follows tag "
                f"{self.config.tag}: write the bundle for tag {self.config.tag}"
            )
        try:
            # The metadata may list newer builds than the bundle holds: pick among its own.
            plan = self.check(BUNDLE_METADATA_URL, BundleFetcher(bundle_dir), manifest.targets)
        except AgentError:
            raise
        except Exception as e:
            raise AgentError(f"{bundle_dir} failed verification: {describe_error(e)}") from e
        if plan.release is None or plan.target is None:
            return plan
        source = bundle_dir / TARGETS_DIR / plan.target.path
        self.install(plan.release, copy_verified(source, plan.target, self.state.downloads))
        installed = f"installed version {plan.release.version} ({plan.release.target})"
        return dataclasses.replace(plan, reason=f"{installed} from {bundle_dir}")

    # The credential ------------------------------------------------------------------------

    def rotate_credential(self) -> None:
        """Replace the device credential: the server issues a new one, which is saved
        (atomically, fsync'd, 0600) and then used once, which retires the old one on the
        server. Until that use both work, so a power cut at any step leaves the device a
        working credential on disk (ADR 0011)."""
        self.reload_credential()
        url = self.config.credential_url
        issued = self._credential_call("POST", url, 201, "the credential is unchanged")
        new = issued.get("credential") if isinstance(issued, dict) else None
        if not isinstance(new, str) or not _header_safe(new):
            raise AgentError(
                f"{self.config.server} answered the rotation with no usable credential; the "
                "credential is unchanged"
            )
        crashpoint("rotate:answered")
        self.state.save_credential(new)
        crashpoint("rotate:saved")
        self.reload_credential()
        self._credential_call(
            "GET",
            url,
            200,
            "the new credential is saved, and the old one keeps working until the agent "
            "first uses the new one (its next check)",
        )

    def _credential_call(self, method: str, url: str, expected: int, otherwise: str) -> Any:
        try:
            response = self.client.request(method, url)
        except httpx.HTTPError as e:
            raise AgentError(f"cannot reach the server: {e}; {otherwise}") from e
        if response.status_code != expected:
            refusal = refusal_of(response)
            if refusal.status == 401:
                raise AgentError(describe_error(CredentialRefused(refusal.code, refusal.message)))
            raise AgentError(f"the server refused: {refusal}; {otherwise}")
        try:
            return response.json()
        except ValueError:
            return None

    # Installing -------------------------------------------------------------------------

    def install(self, release: Release, file: Path) -> Outcome:
        """Install a verified file: stage it, record it as pending, switch, check."""
        status = self.state.status()
        staged = self.installer.stage(release, file)
        status.pending = staged
        self.state.save_status(status)
        crashpoint("install:pending-saved")
        try:
            outcome = self.installer.activate(staged)
        except Exception as e:  # a switch or a command that broke: the release failed
            outcome = Outcome(False, f"the install step broke: {describe_error(e)}")
        return self._conclude(status, staged, outcome)

    def _conclude(self, status: AgentStatus, release: Release, outcome: Outcome) -> Outcome:
        """Keep or undo `release`. Each step is saved before the next, so `recover` can
        finish this after a power cut at any point; events may then be sent twice, which
        costs less than losing them."""
        if outcome.ok:
            previous = status.installed
            self.events.add("installed", release)
            status.installed = release
            status.reported = False
            status.pending = None
            self.state.save_status(status)
            if previous is not None and previous.sha256 != release.sha256:
                (self.state.downloads / previous.sha256).unlink(missing_ok=True)
        else:
            running = status.installed.version if status.installed else "nothing"
            self.events.add("install-failed", release, outcome.detail)
            if self.installer.rolls_back:
                self.events.add("rolled-back", release, f"back to {running}")
            # Failed first, rolled back second: a cut in between finishes the rollback
            # and never tries this release again.
            status.failed = [*status.failed, release.sha256][-50:]
            status.last_error = f"version {release.version} failed to install: {outcome.detail}"
            self.state.save_status(status)
            self.installer.roll_back(status.installed)
            crashpoint("install:rolled-back")
            status.pending = None
            self.state.save_status(status)
            (self.state.downloads / release.sha256).unlink(missing_ok=True)
        crashpoint("install:concluded")
        if not outcome.ok:
            raise AgentError(status.last_error or "install failed")
        return outcome

    # The loop -----------------------------------------------------------------------------

    def run(
        self, interval: float, max_backoff: float, once: bool, stopper: Stopper | None = None
    ) -> bool:
        """Poll forever (or once), or until `stopper` is asked to stop. Failures back off
        exponentially, bounded by `max_backoff`, and never touch what is installed."""
        stopper = stopper or Stopper()
        self.poll_interval = interval
        failures = 0
        while True:
            refused = False
            try:
                with self.state.locked():
                    self.poll()
                failures = 0
            except CredentialRefused as e:
                # Nothing changes that until someone acts: ask no more than once per
                # max_backoff, and keep running what is installed.
                failures += 1
                refused = True
                log.error(
                    "check failed: %s (device %s; checking again in %.0fs)",
                    describe_error(e),
                    self.config.name,
                    max_backoff,
                )
            except Exception as e:  # the loop must outlive any bad response
                failures += 1
                log.error("check failed: %s", describe_error(e))
            if once or stopper.requested:
                return failures == 0
            # The exponent is capped: 2**1024 does not fit a float (a device offline for weeks).
            backoff = interval * 2 ** min(failures, 60)
            delay = interval if failures == 0 else min(backoff, max_backoff)
            if refused:
                delay = max_backoff
            stopper.wait(delay * random.uniform(0.9, 1.1))  # noqa: S311 (jitter, not crypto)


def describe_error(error: BaseException) -> str:
    """One line for logs and status: which check failed and what it means."""
    return printable(_describe(error))


# What each of ngclient's verification failures means, most specific first.
_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (exceptions.ExpiredMetadataError, "expired metadata"),
    (exceptions.BadVersionNumberError, "rollback attack or bad version"),
    (exceptions.UnsignedMetadataError, "metadata not signed by the trusted keys"),
    (exceptions.LengthOrHashMismatchError, "length or hash mismatch"),
    (exceptions.DownloadLengthMismatchError, "response longer than allowed"),
)


def _describe(error: BaseException) -> str:
    meaning = next((text for kind, text in _REFUSALS if isinstance(error, kind)), None)
    if meaning is not None:
        return f"refused: {meaning} ({error})"
    if isinstance(error, exceptions.RepositoryError):
        return f"refused: {type(error).__name__}: {error}"
    if isinstance(error, CredentialRefused):
        if error.revoked:
            return (
                f"credential revoked: {error.reason}. The device keeps running what it has "
                "installed and gets no updates until it is registered again, as a new device "
                "with a state directory of its own (`tufa-agent register --dir NEW_DIR`), "
                "once a factory admin has deleted its old record (`tufa devices delete`)"
            )
        return (
            f"credential refused: {error.reason}. Check that the credential file in the "
            "agent's --dir belongs to this server and factory, or register the device again"
        )
    if isinstance(error, exceptions.DownloadHTTPError):
        return f"server error: HTTP {error.status_code}"
    if isinstance(error, exceptions.SlowRetrievalError):  # raised with no message
        return "cannot reach the server: it did not answer in time"
    if isinstance(error, exceptions.DownloadError | httpx.HTTPError):
        return f"cannot reach the server: {error}"
    if isinstance(error, AgentError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _header_safe(secret: str) -> bool:
    """A secret that can go into an HTTP header as it is."""
    return (
        0 < len(secret) <= 256 and secret.isascii() and secret.isprintable() and " " not in secret
    )
