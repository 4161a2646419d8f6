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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx

from tufa.core import api_paths
from tufa.core.http import api_client
from tufa.core.metadata import Channel
from tufa.demo.impostor import FileServer, Impostor
from tufa.demo.local_server import LocalServer, console_script, stop_process

AGENT_INTERVAL = "1"
WAIT_SECONDS = 60.0


@dataclass
class _Story:
    workdir: Path
    server: LocalServer
    env: dict[str, str] = field(default_factory=dict)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def chapter(self, title: str) -> None:
        click.secho(f"\n== {title}", bold=True, fg="cyan")

    def say(self, text: str) -> None:
        click.secho(text, fg="bright_black")

    def command(
        self, program: str, *args: str, fails: bool = False, shown: tuple[str, ...] | None = None
    ) -> str:
        """Run PROGRAM ARGS, echoing it; `fails` means the step is meant to be refused."""
        click.secho(f"$ {program} {shlex.join(shown or args)}", fg="green")
        done = self.run(program, *args)
        output = (done.stdout + done.stderr).rstrip()
        if output:
            click.echo(output)
        if (done.returncode != 0) != fails:
            expected = "be refused" if fails else "succeed"
            raise click.ClickException(
                f"demo step `{program} {shlex.join(args)}` did not {expected}"
            )
        return done.stdout

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """PROGRAM ARGS, quietly."""
        return subprocess.run(
            [console_script(program), *args],
            cwd=self.workdir,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
        )

    def wait_for_rollout(self, wave: str, state: str, stage: int) -> None:
        """Wait until the server's background task has moved WAVE's staged rollout on."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            done = self.run("tufa", "waves", "status", wave, "--json")
            rows = json.loads(done.stdout) if done.returncode == 0 else [{}]
            if (rows[0].get("state"), rows[0].get("stage")) == (state, stage):
                return
            if time.monotonic() > deadline:
                raise click.ClickException(f"wave {wave} did not reach {state} at stage {stage}")
            time.sleep(0.5)

    def tufa(self, *args: str, fails: bool = False, shown: tuple[str, ...] | None = None) -> str:
        return self.command("tufa", *args, fails=fails, shown=shown)

    def agent_dir(self, device: str) -> Path:
        return self.workdir / "devices" / device

    def start_agent(self, device: str) -> None:
        """`tufa-agent run` for DEVICE in the background, logging to devices/DEVICE.log."""
        args = ("run", "--interval", AGENT_INTERVAL, "--dir", f"devices/{device}")
        click.secho(f"$ tufa-agent {shlex.join(args)} &", fg="green")
        with (self.workdir / "devices" / f"{device}.log").open("ab") as log:
            self.agents[device] = subprocess.Popen(
                [console_script("tufa-agent"), *args], cwd=self.workdir, stdout=log, stderr=log
            )

    def stop_agents(self) -> None:
        for process in self.agents.values():
            stop_process(process)
        self.agents.clear()

    def agent_status(self, device: str) -> dict[str, Any]:
        status_file = self.agent_dir(device) / "status.json"
        found: dict[str, Any] = json.loads(status_file.read_bytes()) if status_file.exists() else {}
        return found

    def wait_installed(self, device: str, version: str) -> None:
        """Wait until DEVICE's running agent has installed VERSION, then show its status."""
        deadline = time.monotonic() + WAIT_SECONDS
        while (self.agent_status(device).get("installed") or {}).get("version") != version:
            process = self.agents.get(device)
            if process is not None and process.poll() is not None:
                raise click.ClickException(f"the agent of {device} exited")
            if time.monotonic() > deadline:
                raise click.ClickException(f"{device} did not install version {version}")
            time.sleep(0.2)
        self.command("tufa-agent", "status", "--dir", f"devices/{device}")


def _register(story: _Story, device: str, channel: Channel, registration_token: str) -> None:
    args = (
        "register", "--server", story.server.url, "--factory", "demo", "--token",
        registration_token, "--hardware-id", "rpi4", "--tag", "main", "--root",
        f"{channel}-root.json", "--name", device, "--dir", f"devices/{device}",
        "--health-check", 'test -s "$TUFA_TARGET_PATH"',
    )  # fmt: skip
    shown = tuple("$REGISTRATION_TOKEN" if a == registration_token else a for a in args)
    story.command("tufa-agent", *args, shown=shown)


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

    story.chapter(
        "3. Both channels' roots: keys of their own, production needs 2 targets signatures"
    )
    story.tufa("keys", "show-root", "-k", "demo-keys.tgz")
    story.tufa("keys", "show-root", "--prod", "-k", "demo-keys.tgz")
    story.tufa("factory", "show")
    for channel in Channel:
        root = story.tufa("get", api_paths.metadata_base("demo", channel) + "1.root.json")
        (story.workdir / f"{channel}-root.json").write_text(root)
    story.say("ci-root.json and prod-root.json are flashed onto devices at the factory")

    story.chapter("4. Tokens: one for the assembly line that registers devices")
    created = json.loads(
        story.tufa("tokens", "create", "--scope", "register", "-d", "assembly line", "--json")
    )
    story.tufa("tokens", "list")

    story.chapter("5. Devices register with the root they were provisioned with")
    devices = (
        (Channel.CI, "dev-board-1"),
        (Channel.PROD, "field-unit-1"),
        (Channel.PROD, "field-unit-2"),
    )
    for device_channel, name in devices:
        _register(story, name, device_channel, created["token"])
    story.tufa("devices", "list")
    story.say("two of them run the agent from now on, checking every second")
    story.start_agent("dev-board-1")
    story.start_agent("field-unit-1")
    credential = (story.agent_dir("dev-board-1") / "credential").read_text().strip()
    with _client(credential) as client:
        other = client.get(f"{url}{api_paths.metadata_base('demo', Channel.PROD)}timestamp.json")
    story.say(f"the CI device asking for production metadata gets HTTP {other.status_code}")
    if other.status_code != 403:
        raise click.ClickException("a CI device could read the production channel")

    story.chapter("6. The owner takes the keys: new root key, new offline targets key")
    story.tufa("keys", "rotate-root", "demo-keys.tgz")
    story.tufa("keys", "rotate-targets", "demo-keys.tgz", "--key-type", "ecdsa")
    story.tufa("keys", "show-root", "--prod", "-k", "demo-keys.tgz")
    story.say("a targets-only copy for release managers; it cannot change the root")
    story.tufa("keys", "copy-targets", "demo-keys.tgz", "release-keys.tgz")
    story.tufa("keys", "rotate-root", "release-keys.tgz", fails=True)

    story.chapter("7. A root update as a transaction: a second release manager's key")
    story.tufa("keys", "updates", "init", "-m", "add carol as release manager")
    story.tufa("keys", "updates", "add-offline-key", "-r", "targets", "-k", "carol.tgz")
    story.tufa("keys", "updates", "review", "--diff")
    story.tufa("keys", "updates", "apply", fails=True)
    story.tufa("keys", "updates", "sign", "-k", "demo-keys.tgz")
    story.tufa("keys", "updates", "apply", "-k", "demo-keys.tgz")

    story.chapter("8. CI publishes builds: the development device installs them at once")
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
    story.wait_installed("dev-board-1", "43")
    story.say("it followed the root from v1 to the owner's newest on the way")
    story.tufa("devices", "show", "dev-board-1")
    story.say("production devices install nothing that the owner did not sign")
    story.command("tufa-agent", "check", "--dir", "devices/field-unit-1")

    story.chapter("9. A wave releases build 42 to production, signed with the offline key")
    story.tufa("waves", "init", "release-42", "42", "main", "-k", "release-keys.tgz")
    story.tufa("device-groups", "create", "canaries")
    story.tufa("device-groups", "add", "canaries", "field-unit-1")
    story.tufa("waves", "rollout", "release-42", "canaries")
    story.wait_installed("field-unit-1", "42")
    story.command("tufa-agent", "run", "--once", "--dir", "devices/field-unit-2")
    story.tufa("waves", "status", "release-42")
    story.tufa("waves", "complete", "release-42")
    story.command("tufa-agent", "run", "--once", "--dir", "devices/field-unit-2")
    story.tufa("targets", "list", "--prod", "--tag", "main")

    story.chapter("10. Friday night: an impostor answers for the update server")
    story.stop_agents()
    trusted_root = _status_command(story, "dev-board-1")["trusted_metadata"]["root"]
    _attack(
        story,
        "dev-board-1",
        Impostor("demo", Channel.CI, trusted_root + 1, "rpi4", "main"),
        "a hijacked DNS name sends dev-board-1 to a server that offers build 765 under a "
        "newer root, all signed with its own keys",
        refusal="not signed by the trusted keys",
        still_runs="43",
        closing="refused: dev-board-1 still runs build 43; with its server back, it carries on",
    )

    story.chapter("11. A man in the middle serves a production device the CI channel's files")
    _attack(
        story,
        "field-unit-1",
        _recorded_ci_channel(story),
        "genuine files, every one signed by the server or the owner: the CI channel's "
        "roots, timestamp, snapshot and targets (build 43, never released), served at "
        "the production URLs. The channels share no signing key: the CI timestamp is "
        "signed by a key the production root does not list",
        refusal="timestamp was signed by 0/1 keys",
        still_runs="42",
        closing="refused: field-unit-1 still runs the release, 42, and carries on",
    )

    story.chapter("12. A staged rollout: the server goes on by itself while devices are well")
    (story.workdir / "image-44.img").write_bytes(os.urandom(256 * 1024))
    add = (
        "targets", "add", "rpi4-image-44", "--version", "44", "--hardware-id", "rpi4",
        "--tag", "main", "--file", "image-44.img", "--quiet", "--token",
    )  # fmt: skip
    story.tufa(*add, ci_token["token"], shown=(*add, "$CI_TOKEN"))
    story.tufa("waves", "init", "release-44", "44", "main", "-k", "release-keys.tgz")
    plan = ("waves", "rollout", "release-44", "--plan", "1,100%", "--soak", "3s")
    story.tufa(*plan, "--min-reports", "1", "--dry-run")
    story.tufa(*plan, "--min-reports", "1")
    for device in ("field-unit-1", "field-unit-2"):
        story.command("tufa-agent", "run", "--once", "--dir", f"devices/{device}")
        if device == "field-unit-1":
            story.tufa("waves", "status", "release-44")
            story.say("its report holds the gate; after the soak the server serves stage 2")
            story.wait_for_rollout("release-44", "soaking", 2)
    story.wait_for_rollout("release-44", "completed", 2)
    story.tufa("waves", "status", "release-44")


def _status_command(story: _Story, device: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(
        story.command("tufa-agent", "status", "--json", "--dir", f"devices/{device}")
    )
    return status


def _attack(
    story: _Story,
    device: str,
    fake: FileServer,
    how: str,
    *,
    refusal: str,
    still_runs: str,
    closing: str,
) -> None:
    """Point DEVICE at `fake` (a hijacked name), show that the agent refuses it for saying
    `refusal` and still runs version `still_runs`, then say `closing`, point it back and
    show that it carries on."""
    config_file = story.agent_dir(device) / "config.json"
    genuine = config_file.read_bytes()
    config_file.write_text(json.dumps({**json.loads(genuine), "server": fake.url}))
    try:
        story.say(how)
        story.command("tufa-agent", "run", "--once", "--dir", f"devices/{device}", fails=True)
        status = _status_command(story, device)
        if (status["installed"] or {}).get("version") != still_runs:
            raise click.ClickException(f"the attack changed what {device} runs")
        if refusal not in (status["last_error"] or ""):
            raise click.ClickException(f"{device} failed, but not by refusing the attack")
    finally:
        config_file.write_bytes(genuine)
        fake.close()
    story.say(closing)
    story.command("tufa-agent", "run", "--once", "--dir", f"devices/{device}")


def _client(token: str) -> httpx.Client:
    client, _ = api_client(token, "tufa-demo", timeout=10)
    return client


def _recorded_ci_channel(story: _Story) -> FileServer:
    """What a man in the middle who recorded the CI channel serves for the production
    channel: the CI roots, and the timestamp, snapshot and targets CI devices get now."""
    token = json.loads((story.workdir / "config.json").read_text())["token"]
    ci_base = story.server.url + api_paths.metadata_base("demo", Channel.CI)
    files: dict[str, bytes] = {}
    with _client(token) as client:

        def ci_file(name: str) -> httpx.Response:
            return client.get(ci_base + name)

        version = 1
        while (root := ci_file(f"{version}.root.json")).status_code == 200:
            files[f"{version}.root.json"] = root.content
            version += 1
        files["timestamp.json"] = ci_file("timestamp.json").content
        meta = json.loads(files["timestamp.json"])["signed"]["meta"]
        snapshot = f"{meta['snapshot.json']['version']}.snapshot.json"
        files[snapshot] = ci_file(snapshot).content
        targets = json.loads(files[snapshot])["signed"]["meta"]["targets.json"]
        name = f"{targets['version']}.targets.json"
        files[name] = ci_file(name).content
    prod_base = api_paths.metadata_base("demo", Channel.PROD)
    return FileServer({prod_base + filename: body for filename, body in files.items()})


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
    creation, the one-time keys download, roots, tokens, devices registering with
    `tufa-agent`, the owner's key rotations, a root update transaction, CI builds
    installed by a development device's agent, a wave to production agents, a device
    refusing an impostor server, a production device refusing the CI channel's
    genuine files, and a staged rollout the server advances by itself. Exits non-zero
    if any step misbehaves.
    """
    if keep_running and data_dir is None:
        raise click.UsageError("--keep-running needs --data-dir, so the data outlives the demo")
    with tempfile.TemporaryDirectory(prefix="tufa-demo-") as tmp:
        workdir = Path(tmp)
        server = LocalServer(
            data_dir or workdir / "server",
            operator_token=f"tufa_{secrets.token_urlsafe(32)}",
            log_path=workdir / "server.log",
            extra_args=("--rollout-interval", "1s"),
        )
        click.secho(
            f"Starting tufa-server on {server.url} (SQLite in {server.data_dir})", bold=True
        )
        server.start()
        story = _Story(workdir, server, env={"TUFA_CONFIG": str(workdir / "config.json")})
        try:
            (workdir / "devices").mkdir()
            _run_story(story)
            click.secho("\nDemo finished: every step behaved as described.", bold=True, fg="green")
            if keep_running:
                click.echo(f"Server still running at {server.url} (pid {server.process.pid}).")  # type: ignore[union-attr]
                server.process = None
        except BaseException:
            click.echo(f"--- server log ---\n{server.log()}", err=True)
            for log in sorted((workdir / "devices").glob("*.log")):
                click.echo(f"--- {log.stem} agent log ---\n{log.read_text()}", err=True)
            raise
        finally:
            story.stop_agents()
            server.stop()
