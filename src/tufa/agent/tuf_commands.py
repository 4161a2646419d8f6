"""`tufa-agent tuf`: plain TUF client commands, for debugging a trust store.

They work against any TUF repository with consistent snapshots (no tufa server
needed) and exit 0 on success, 1 on any verification failure, so scripts can test a
repository or a mirror the way a device would see it.
"""

from __future__ import annotations

from pathlib import Path

import click
from tuf.ngclient import UpdaterConfig

from tufa.agent.agent import describe_error
from tufa.agent.state import AgentError, printable
from tufa.agent.trust import (
    VERIFICATION_ERRORS,
    open_updater,
    provision_root,
    trusted_versions,
)
from tufa.core.command_help import WholeSentenceGroup
from tufa.core.fetcher import BearerFetcher, CredentialRefused
from tufa.core.json_output import json_option, print_json

metadata_dir_option = click.option(
    "--metadata-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The trust store: root.json and the metadata verified so far.",
)
metadata_url_option = click.option(
    "--metadata-url", required=True, help="Base URL of the repository's metadata."
)
# No environment variable on purpose: the admin CLI's TUFA_TOKEN must not reach a mirror
# that someone is debugging.
token_option = click.option(
    "--token",
    help="Bearer token or device credential for a tufa server; sent with every request.",
)


def _view(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    hardware_id, _, tag = value.rpartition("/")
    return {"hardware_id": hardware_id, "tag": tag} if hardware_id else {"tag": tag}


view_option = click.option(
    "--view",
    metavar="[HARDWARE_ID/]TAG",
    help="With a token on a tufa server: what devices of this view are served (CI: "
    "HARDWARE_ID/TAG, production: TAG). Without it, the channel's default view.",
)


# Any TUF repository, delegations included: python-tuf's own limits, not the agent's.
DEBUG_CONFIG = UpdaterConfig()


def _fail(error: BaseException) -> click.ClickException:
    what = "verification failed" if isinstance(error, VERIFICATION_ERRORS) else "failed"
    if isinstance(error, CredentialRefused):
        # The server's own words: the agent's advice about its state directory and
        # registration does not apply to a --token given here.
        return click.ClickException(f"{what}: {printable(str(error))}; check --token")
    return click.ClickException(f"{what}: {describe_error(error)}")


@click.group("tuf", cls=WholeSentenceGroup)
def tuf_group() -> None:
    """Plain TUF client operations on a trust store (debugging)."""


@tuf_group.command()
@metadata_dir_option
@click.argument("root", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@json_option
def init(metadata_dir: Path, root: Path, as_json: bool) -> None:
    """Start a trust store in METADATA_DIR from ROOT (checked to be self-signed).

    \b
    Example:
      tufa-agent tuf init --metadata-dir ./trust ci-root.json
    """
    if (metadata_dir / "root.json").exists():
        raise click.ClickException(
            f"{metadata_dir} already holds a trusted root; use an empty directory"
        )
    try:
        trusted = provision_root(metadata_dir, root.read_bytes(), str(root))
    except AgentError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        print_json({"metadata_dir": str(metadata_dir), "root_version": trusted.signed.version})
        return
    click.echo(f"Trusting root version {trusted.signed.version} in {metadata_dir}.")


@tuf_group.command()
@metadata_url_option
@metadata_dir_option
@token_option
@view_option
@json_option
def refresh(
    metadata_url: str, metadata_dir: Path, token: str | None, view: str | None, as_json: bool
) -> None:
    """Update the trust store from METADATA_URL, verifying every step.

    \b
    Example:
      tufa-agent tuf refresh --metadata-dir ./trust --token "$TOKEN" --view rpi4/main \\
          --metadata-url http://127.0.0.1:8080/api/v1/factories/acme/repo/ci/metadata/
    """
    fetcher = BearerFetcher(token, view=_view(view))
    try:
        open_updater(metadata_dir, metadata_url, fetcher, config=DEBUG_CONFIG).refresh()
    except Exception as e:
        raise _fail(e) from e
    finally:
        fetcher.close()
    versions = trusted_versions(metadata_dir)
    if as_json:
        print_json({"trusted_metadata": versions})
        return
    click.echo("Trusted: " + ", ".join(f"{role} v{v}" for role, v in versions.items()))


@tuf_group.command()
@metadata_url_option
@metadata_dir_option
@click.option("--target-base-url", required=True, help="Base URL of the target files.")
@click.option(
    "--target-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where verified files are written.",
)
@token_option
@view_option
@click.argument("names", nargs=-1, required=True)
@json_option
def download(
    metadata_url: str,
    metadata_dir: Path,
    target_base_url: str,
    target_dir: Path,
    token: str | None,
    view: str | None,
    names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Refresh, then download and verify the targets NAMES into TARGET_DIR.

    \b
    Example:
      tufa-agent tuf download --metadata-dir ./trust --token "$TOKEN" --view rpi4/main \\
          --metadata-url http://127.0.0.1:8080/api/v1/factories/acme/repo/ci/metadata/ \\
          --target-base-url http://127.0.0.1:8080/api/v1/factories/acme/repo/ci/targets/ \\
          --target-dir ./files rpi4-image-42
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    downloaded: dict[str, str] = {}
    fetcher = BearerFetcher(token, view=_view(view))
    try:
        updater = open_updater(
            metadata_dir, metadata_url, fetcher, target_dir, target_base_url, config=DEBUG_CONFIG
        )
        updater.refresh()
        for name in names:
            info = updater.get_targetinfo(name)
            if info is None:
                raise click.ClickException(f"{name} is not a target of this repository")
            downloaded[name] = updater.find_cached_target(info) or updater.download_target(info)
            if not as_json:
                click.echo(f"{name}: {downloaded[name]}")
    except click.ClickException:
        raise
    except Exception as e:
        raise _fail(e) from e
    finally:
        fetcher.close()
    if as_json:
        print_json({"targets": downloaded})
