"""`tufa-agent`: the command line of the device agent."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from tufa.agent.agent import Agent, describe_error
from tufa.agent.plan import Plan
from tufa.agent.registration import register_with_server
from tufa.agent.reports import MAX_INTERVAL, EventQueue
from tufa.agent.state import (
    CREDENTIAL_FILE,
    AgentConfig,
    AgentError,
    InstallerKind,
    StateDir,
    printable,
)
from tufa.agent.stopping import Stopper, StopRequested, say_stopped
from tufa.agent.trust import channel_of, load_root, provision_root, trusted_versions
from tufa.agent.tuf_commands import tuf_group
from tufa.core.bundle import BundleError
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.http import server_url_problem
from tufa.core.json_output import json_option, print_json

P = ParamSpec("P")
R = TypeVar("R")

state_dir_option = click.option(
    "--dir",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TUFA_AGENT_DIR",
    default="/var/lib/tufa-agent",
    show_default=True,
    help="The agent's state directory (env TUFA_AGENT_DIR).",
)


def _one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Print agent errors as one line naming the cause and the fix, exit status 1."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (AgentError, BundleError) as e:
            raise click.ClickException(printable(str(e))) from e
        except OSError as e:  # the disk, the state directory, a bundle on a bad stick
            raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}") from e

    return wrapper


class _PrintableFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # httpx logs every request at INFO; a device polling every minute needs none of it.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # python-tuf logs each key that did not sign; the agent reports the verdict instead.
    if not verbose:
        logging.getLogger("tuf").setLevel(logging.WARNING)
        logging.getLogger("securesystemslib").setLevel(logging.WARNING)


def _finite(seconds: float) -> float:
    if math.isnan(seconds):  # FloatRange lets NaN through: every comparison is false
        raise click.BadParameter("must be a number of seconds")
    return seconds


@click.group(cls=WholeSentenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tufa")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def cli(verbose: bool) -> None:
    """tufa-agent: verify, download and install updates on this device.

    Every file is checked against the TUF root the device was provisioned with
    (python-tuf's ngclient); nothing it did not authorise is installed.

    \b
    Example:
      tufa-agent register --server https://updates.example.com --factory acme \\
          --token "$REGISTRATION_TOKEN" --hardware-id rpi4 --tag main \\
          --root prod-root.json --dir /var/lib/tufa-agent
      tufa-agent run --dir /var/lib/tufa-agent --interval 300
      tufa-agent rotate-credential --dir /var/lib/tufa-agent
    """
    _setup_logging(verbose)


@cli.command()
@click.option("--server", required=True, help="Base URL of the tufa server.")
@click.option("-f", "--factory", required=True, help="Factory name.")
@click.option(
    "--token",
    required=True,
    envvar="TUFA_REGISTRATION_TOKEN",
    help="A registration-scope token (env TUFA_REGISTRATION_TOKEN).",
)
@click.option("--hardware-id", required=True, help="Hardware id targets must list.")
@click.option("--tag", required=True, help="Tag targets must list.")
@click.option(
    "--root",
    "root_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The root.json this device trusts (decides CI or production).",
)
@click.option("--name", help="Device name (default: HARDWARE-ID-<random>).")
@click.option(
    "--installer",
    type=click.Choice(["slots", "command"]),
    default="slots",
    show_default=True,
    help="Two slots with a `current` link, or your own command.",
)
@click.option("--install-command", help="For --installer command: run with TUFA_TARGET_PATH.")
@click.option(
    "--health-check",
    help="For --installer slots: a command run after switching; failure rolls back.",
)
@click.option(
    "--health-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds the health check or install command may take.",
)
@state_dir_option
@json_option
@_one_line_errors
def register(
    server: str,
    factory: str,
    token: str,
    hardware_id: str,
    tag: str,
    root_file: Path,
    name: str | None,
    installer: InstallerKind,
    install_command: str | None,
    health_check: str | None,
    health_timeout: float,
    state_dir: Path,
    as_json: bool,
) -> None:
    """Register this device with the server and provision its trusted root.

    The root decides the channel: a root that asks for two targets signatures is a
    production root. There is no trust on first use: the root must come from the
    factory owner (`tufa keys show-root`), not from the server.

    \b
    Example:
      tufa-agent register --server http://127.0.0.1:8080 --factory acme \\
          --token "$REG" --hardware-id rpi4 --tag main --root ci-root.json \\
          --dir ./agent-state --health-check './selftest.sh'
    """
    problem = server_url_problem(server)
    if problem is not None:
        raise click.UsageError(f"--server: {problem}")
    state = StateDir(state_dir)
    if state.is_registered():
        raise AgentError(
            f"{state_dir} already holds a registered device; use another --dir or remove it"
        )
    if installer == "command" and not install_command:
        raise AgentError("--installer command needs --install-command")
    root_bytes = root_file.read_bytes()
    channel = channel_of(load_root(root_bytes, str(root_file)))
    name = name or f"{hardware_id}-{uuid.uuid4().hex[:8]}"
    server = server.rstrip("/")
    existed = state.path.exists()
    try:
        # Everything that can fail locally happens before the server creates the device,
        # so a refused write leaves no device behind that nobody holds a credential of.
        state.path.mkdir(parents=True, exist_ok=True)
        provision_root(state.metadata, root_bytes, str(root_file))
        device = register_with_server(server, factory, token, name, hardware_id, tag, channel)
        state.save_credential(device["credential"])
        # The configuration goes last: its presence marks the device as registered.
        state.save_config(
            AgentConfig(
                server=server,
                factory=factory,
                channel=channel,
                device_id=device["id"],
                name=name,
                hardware_id=hardware_id,
                tag=tag,
                installer=installer,
                install_command=install_command,
                health_check=health_check,
                health_timeout=health_timeout,
            )
        )
    except BaseException as e:
        if existed:
            shutil.rmtree(state.metadata, ignore_errors=True)
            (state.path / CREDENTIAL_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(state.path, ignore_errors=True)
        if isinstance(e, OSError):
            raise AgentError(f"cannot write the state directory {state_dir}: {e}") from e
        raise
    if as_json:
        # Never the credential: it stays in the state directory, mode 0600.
        print_json(
            {"device": name, "device_id": device["id"], "channel": channel, "factory": factory}
        )
        return
    click.echo(f"Registered {name} ({device['id']}) on the {channel} channel of {factory}.")


@cli.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0, max=MAX_INTERVAL),
    callback=lambda _ctx, _param, value: _finite(value),
    default=300.0,
    show_default=True,
    help="Seconds between checks.",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Longest wait after repeated failures; also the wait between tries once the "
    "server refused the device credential (revoked).",
)
@click.option("--once", is_flag=True, help="One check (and install), then exit; 1 on failure.")
@state_dir_option
@_one_line_errors
def run(interval: float, max_backoff: float, once: bool, state_dir: Path) -> None:
    """Check for updates every INTERVAL seconds; install, roll back and report.

    If the server refuses the device credential (revoked, or the device deleted), the
    agent logs "credential revoked" with what to do, keeps what it has installed, and
    tries again only every --max-backoff seconds. It re-reads the credential file at
    every check, so a rotation or a new registration takes effect without a restart.
    SIGTERM or Ctrl-C stops it (exit 0): at once between checks, after the check under
    way otherwise (a second one stops it at once).

    \b
    Example:
      tufa-agent run --dir ./agent-state --interval 60
      tufa-agent run --dir ./agent-state --once
    """
    agent = Agent(StateDir(state_dir))
    stopper = Stopper()
    stopper.listen()
    try:
        ok = agent.run(interval, max(max_backoff, interval), once, stopper)
    except StopRequested:
        ok = True
    finally:
        agent.close()
    if stopper.signal_name is not None:
        say_stopped(stopper.signal_name, agent.state.status().installed)
    elif not ok:
        sys.exit(1)


@cli.command()
@json_option
@state_dir_option
@_one_line_errors
def check(as_json: bool, state_dir: Path) -> None:
    """Refresh the trusted metadata and print what would be installed.

    Exits 1 if the metadata cannot be verified (or the server cannot be reached).

    \b
    Example:
      tufa-agent check --dir ./agent-state
    """
    state = StateDir(state_dir)
    agent = Agent(state)
    try:
        with state.locked():
            plan = agent.check()
    except AgentError:
        raise
    except Exception as e:
        raise click.ClickException(describe_error(e)) from e
    finally:
        agent.close()
    _print_plan(plan, as_json)


def _print_plan(plan: Plan, as_json: bool) -> None:
    if as_json:
        print_json(plan.to_json())
    else:
        click.echo(printable(plan.reason[0].upper() + plan.reason[1:] + "."))


@cli.command()
@json_option
@state_dir_option
@_one_line_errors
def status(as_json: bool, state_dir: Path) -> None:
    """Print the installed version, the last check and the last error.

    \b
    Example:
      tufa-agent status --dir ./agent-state --json
    """
    state = StateDir(state_dir)
    config = state.config()
    current = state.status()
    report: dict[str, Any] = {
        "device": config.name,
        "device_id": config.device_id,
        "factory": config.factory,
        "channel": config.channel,
        "hardware_id": config.hardware_id,
        "tag": config.tag,
        "installed": asdict(current.installed) if current.installed else None,
        "installing": asdict(current.pending) if current.pending else None,
        "failed_sha256": current.failed,
        "last_check": current.last_check,
        "last_error": current.last_error,
        "trusted_metadata": trusted_versions(state.metadata),
        "unsent_events": len(EventQueue(state.path).pending()),
    }
    if as_json:
        print_json(report)
        return
    installed = current.installed
    lines = {
        "device": f"{config.name} ({config.channel}, {config.hardware_id}, tag {config.tag})",
        "installed": f"{installed.version} ({installed.target})" if installed else "-",
        "installing": f"{current.pending.version} (finished at the next start)"
        if current.pending
        else "-",
        "last check": current.last_check or "never",
        "last error": current.last_error or "-",
        "trusted": ", ".join(f"{r} v{v}" for r, v in report["trusted_metadata"].items()),
    }
    for key, value in lines.items():
        click.echo(f"{key:>11}: {value}")


@cli.command("rotate-credential")
@state_dir_option
@json_option
@_one_line_errors
def rotate_credential(state_dir: Path, as_json: bool) -> None:
    """Replace this device's credential with a new one; the old one stops working.

    The server issues the new credential, the agent saves it (write-then-rename,
    fsync'd, mode 0600) and uses it once, which retires the old one on the server. A
    power cut at any step leaves a credential that works: the old one stays valid until
    the new one is first used. Run it while `tufa-agent run` runs if you like: the
    service waits, then uses the new credential.

    \b
    Example:
      tufa-agent rotate-credential --dir /var/lib/tufa-agent
    """
    state = StateDir(state_dir)
    agent = Agent(state)
    try:
        with state.locked():
            agent.rotate_credential()
    finally:
        agent.close()
    credential_file = state.path / CREDENTIAL_FILE
    if as_json:
        print_json({"device_id": agent.config.device_id, "credential_file": str(credential_file)})
        return
    click.echo(
        f"Rotated the credential of {printable(agent.config.name)}: the new one is in "
        f"{credential_file} (mode 0600), and the old one no longer works."
    )


@cli.command("install-bundle")
@click.argument("bundle_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@json_option
@state_dir_option
@_one_line_errors
def install_bundle(bundle_dir: Path, as_json: bool, state_dir: Path) -> None:
    """Verify an offline bundle against the trusted root and install it; no network.

    BUNDLE_DIR is what `tufa targets offline-update` wrote (on a USB stick, say). The
    same rules apply as online: thresholds, expiry, no version going down.

    \b
    Example:
      tufa-agent install-bundle /media/usb/release-42 --dir ./agent-state
    """
    state = StateDir(state_dir)
    agent = Agent(state)
    try:
        with state.locked():
            agent.recover()
            plan = agent.install_bundle(bundle_dir)
    finally:
        agent.close()
    _print_plan(plan, as_json)


cli.add_command(tuf_group)
