"""`tufa demo`: the product's story, end to end, against a real server on SQLite.

Every step runs the real `tufa` command (shown as typed) or a real TUF client, and
the demo stops with an error the moment anything behaves other than described.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx
from tuf.ngclient import Updater

from tufa.cli.local_server import LocalServer, console_script
from tufa.core.fetcher import BearerFetcher


@dataclass
class _Story:
    workdir: Path
    server: LocalServer
    env: dict[str, str] = field(default_factory=dict)

    def chapter(self, title: str) -> None:
        click.secho(f"\n== {title}", bold=True, fg="cyan")

    def say(self, text: str) -> None:
        click.secho(text, fg="bright_black")

    def tufa(self, *args: str, fails: bool = False, shown: tuple[str, ...] | None = None) -> str:
        """Run `tufa ARGS`, echoing it; `fails` means the step is meant to be refused."""
        click.secho(f"$ tufa {shlex.join(shown or args)}", fg="green")
        done = subprocess.run(
            [console_script("tufa"), *args],
            cwd=self.workdir,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
        )
        output = (done.stdout + done.stderr).rstrip()
        if output:
            click.echo(output)
        if (done.returncode != 0) != fails:
            expected = "be refused" if fails else "succeed"
            raise click.ClickException(f"demo step `tufa {shlex.join(args)}` did not {expected}")
        return done.stdout


def _refresh(
    story: _Story, device: str, channel: str, credential: str, root: bytes | None
) -> Updater:
    """One TUF refresh, as a device does at each poll: a new client over the metadata it
    trusts on disk (bootstrapped with `root` the first time)."""
    metadata_url = f"{story.server.url}/api/v1/factories/demo/repo/{channel}/metadata/"
    trust_dir = story.workdir / f"device-{device}"
    trust_dir.mkdir(exist_ok=True)
    updater = Updater(
        str(trust_dir), metadata_url, fetcher=BearerFetcher(credential), bootstrap=root
    )
    updater.refresh()
    return updater


def _run_story(story: _Story) -> None:
    url, operator = story.server.url, story.server.operator_token

    story.chapter("1. The operator creates a factory")
    create = ("factory", "create", "demo", "--login", "--server", url, "--token")
    story.tufa(*create, operator, shown=(*create, "$OPERATOR_TOKEN"))

    story.chapter("2. The owner downloads the offline keys archive, exactly once")
    story.tufa("keys", "download", "demo-keys.tgz")
    with tarfile.open(story.workdir / "demo-keys.tgz") as tar:
        story.say("archive contents: " + ", ".join(sorted(tar.getnames())))
    story.say("a second download is refused: the server kept no copy")
    story.tufa("keys", "download", "again.tgz", fails=True)

    story.chapter("3. Both channels' roots: same keys, production needs 2 targets signatures")
    story.tufa("keys", "show-root", "-k", "demo-keys.tgz")
    story.tufa("keys", "show-root", "--prod", "-k", "demo-keys.tgz")
    story.tufa("factory", "show")

    story.chapter("4. Tokens: one for the assembly line that registers devices")
    created = json.loads(
        story.tufa("tokens", "create", "--scope", "register", "-d", "assembly line", "--json")
    )
    story.tufa("tokens", "list")

    story.chapter("5. Devices register, one per channel")
    credentials: dict[str, str] = {}
    devices = (("ci", "dev-board-1"), ("prod", "field-unit-1"), ("prod", "field-unit-2"))
    for channel, name in devices:
        body = {"name": name, "hardware_id": "rpi4", "tag": "main", "channel": channel}
        story.say(f"POST /api/v1/factories/demo/devices {json.dumps(body)}")
        response = httpx.post(
            f"{url}/api/v1/factories/demo/devices",
            json=body,
            headers={"Authorization": f"Bearer {created['token']}"},
        )
        response.raise_for_status()
        credentials[name] = response.json()["credential"]
    story.tufa("devices", "list")

    story.chapter("6. Each device refreshes its channel with python-tuf's ngclient")
    roots = {
        channel: story.tufa("get", f"/api/v1/factories/demo/repo/{channel}/metadata/1.root.json")
        for channel in ("ci", "prod")
    }
    for channel, name in devices:
        updater = _refresh(story, name, channel, credentials[name], roots[channel].encode())
        _report(story, name, updater)
    other = httpx.get(
        f"{url}/api/v1/factories/demo/repo/prod/metadata/timestamp.json",
        headers={"Authorization": f"Bearer {credentials['dev-board-1']}"},
    )
    story.say(f"the CI device asking for production metadata gets HTTP {other.status_code}")
    if other.status_code != 403:
        raise click.ClickException("a CI device could read the production channel")

    story.chapter("7. The owner takes the keys: new root key, new offline targets key")
    story.tufa("keys", "rotate-root", "demo-keys.tgz")
    story.tufa("keys", "rotate-targets", "demo-keys.tgz", "--key-type", "ecdsa")
    story.tufa("keys", "show-root", "--prod", "-k", "demo-keys.tgz")
    story.say("a targets-only copy for release managers; it cannot change the root")
    story.tufa("keys", "copy-targets", "demo-keys.tgz", "release-keys.tgz")
    story.tufa("keys", "rotate-root", "release-keys.tgz", fails=True)

    story.chapter("8. A root update as a transaction: a second release manager's key")
    story.tufa("keys", "updates", "init", "-m", "add carol as release manager")
    story.tufa("keys", "updates", "add-offline-key", "-r", "targets", "-k", "carol.tgz")
    story.tufa("keys", "updates", "review", "--diff")
    story.tufa("keys", "updates", "apply", fails=True)
    story.tufa("keys", "updates", "sign", "-k", "demo-keys.tgz")
    story.tufa("keys", "updates", "apply", "-k", "demo-keys.tgz")

    story.chapter("9. The devices follow the new roots from the ones they trusted")
    for channel, name in devices:
        _report(story, name, _refresh(story, name, channel, credentials[name], None))

    story.chapter("10. CI publishes builds: development devices see them at once")
    ci_token = json.loads(story.tufa("tokens", "create", "--scope", "ci", "-d", "CI", "--json"))
    for build in ("42", "43"):
        (story.workdir / f"image-{build}.img").write_bytes(os.urandom(256 * 1024))
        add = (
            "targets", "add", f"rpi4-image-{build}", "--version", build,
            "--hardware-id", "rpi4", "--tag", "main", "--file", f"image-{build}.img", "--quiet",
            "--token",
        )  # fmt: skip
        story.tufa(*add, ci_token["token"], shown=(*add, "$CI_TOKEN"))
    story.tufa("targets", "list")
    for channel, name in devices:
        _report(story, name, _refresh(story, name, channel, credentials[name], None))

    story.chapter("11. A wave releases build 42 to production, signed with the offline key")
    story.tufa("waves", "init", "release-42", "42", "main", "-k", "release-keys.tgz")
    story.tufa("device-groups", "create", "canaries")
    story.tufa("device-groups", "add", "canaries", "field-unit-1")
    story.tufa("waves", "rollout", "release-42", "canaries")
    story.tufa("waves", "status", "release-42")
    for channel, name in devices[1:]:
        _report(story, name, _refresh(story, name, channel, credentials[name], None))
    story.tufa("waves", "complete", "release-42")
    story.tufa("targets", "list", "--prod", "--tag", "main")
    for channel, name in devices[1:]:
        _report(story, name, _refresh(story, name, channel, credentials[name], None))


def _report(story: _Story, device: str, updater: Updater) -> None:
    trusted = updater._trusted_set  # read-only look at what the client now trusts
    names = ", ".join(sorted(trusted.targets.targets)) or "no targets"
    story.say(
        f"{device}: verified root v{trusted.root.version}, timestamp "
        f"v{trusted.timestamp.version}, snapshot v{trusted.snapshot.version}, targets "
        f"v{trusted.targets.version}: {names}"
    )


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the server's data here (default: a temporary folder, removed afterwards).",
)
@click.option(
    "--keep-running", is_flag=True, help="Leave the server running at the end (needs --data-dir)."
)
def demo(data_dir: Path | None, keep_running: bool) -> None:
    """Run the end-to-end demo against a fresh server on SQLite.

    Starts `tufa-server run` on a free loopback port, then walks through factory
    creation, the one-time keys download, roots, tokens, device registration, TUF
    refreshes of both channels, the owner's key rotations and a root update
    transaction. Exits non-zero if any step misbehaves.
    """
    if keep_running and data_dir is None:
        raise click.UsageError("--keep-running needs --data-dir, so the data outlives the demo")
    with tempfile.TemporaryDirectory(prefix="tufa-demo-") as tmp:
        workdir = Path(tmp)
        server = LocalServer(
            data_dir or workdir / "server",
            operator_token=f"tufa_{secrets.token_urlsafe(32)}",
            log_path=workdir / "server.log",
        )
        click.secho(
            f"Starting tufa-server on {server.url} (SQLite in {server.data_dir})", bold=True
        )
        server.start()
        story = _Story(workdir, server, env={"TUFA_CONFIG": str(workdir / "config.json")})
        try:
            _run_story(story)
            click.secho("\nDemo finished: every step behaved as described.", bold=True, fg="green")
            if keep_running:
                click.echo(f"Server still running at {server.url} (pid {server.process.pid}).")  # type: ignore[union-attr]
                server.process = None
        except BaseException:
            click.echo(f"--- server log ---\n{server.log()}", err=True)
            raise
        finally:
            server.stop()
