"""What a newcomer meets first: the set-up steps, the README's commands, `--help`, and
shell completion, checked against the real programs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from tests.helpers import Factory, run_cli
from tufa.agent.main import cli as agent_cli
from tufa.cli.main import cli
from tufa.demo.local_server import console_script
from tufa.server.main import cli as server_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROGRAMS: dict[str, click.Group] = {"tufa": cli, "tufa-agent": agent_cli, "tufa-server": server_cli}
sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(args[0]), *args[1:]],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# -- make install --------------------------------------------------------------------------


def test_make_install_links_working_commands_into_prefix(tmp_path: Path) -> None:
    # A stand-in for the checkout's .venv: the entry points of this environment, and the
    # marker that says it is installed, so make creates no environment of its own.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for command in ("tufa", "tufa-agent", "tufa-server"):
        (venv_bin / command).symlink_to(console_script(command))
    (venv_bin / ".installed").touch()
    prefix = tmp_path / "prefix"
    path_without_either = "/usr/bin:/bin"
    make = ["make", "-s", f"VENV={venv_bin.parent}", f"PREFIX={prefix}"]
    env = {**os.environ, "PATH": path_without_either}

    done = subprocess.run(
        [*make, "install"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"{prefix}/bin is not on your PATH" in done.stdout
    for command in ("tufa", "tufa-agent", "tufa-server"):
        linked = prefix / "bin" / command
        version = subprocess.run(
            [command, "--version"],
            env={**env, "PATH": f"{prefix / 'bin'}:{path_without_either}"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert version.returncode == 0, (command, version.stderr)
        assert re.match(rf"{command}, version \d", version.stdout), version.stdout
        assert linked.resolve() == Path(console_script(command)).resolve()

    on_path = {**env, "PATH": f"{prefix / 'bin'}:{path_without_either}"}
    again = subprocess.run(
        [*make, "install"], cwd=ROOT, env=on_path, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr
    assert "not on your PATH" not in again.stdout

    (prefix / "bin" / "unrelated").write_text("kept\n")
    removed = subprocess.run(
        [*make, "uninstall"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == ["unrelated"]


# -- the README against the programs -------------------------------------------------------


def _readme_command_lines() -> Iterator[str]:
    """Every command line of the README that runs one of the programs: in ```sh blocks
    (continuations joined, comments dropped) and in inline code."""
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.split(" ")[0] in PROGRAMS:
                yield line
    yield from re.findall(r"`((?:tufa|tufa-agent|tufa-server) [^`]*)`", README)


def test_every_command_the_readme_types_exists_with_its_options() -> None:
    lines = list(_readme_command_lines())
    assert len(lines) > 100
    problems = []
    for line in lines:
        words = shlex.split(line.split(" | ")[0])
        command: click.Command = PROGRAMS[words[0]]
        used = 1
        while isinstance(command, click.Group) and words[used:] and words[used] in command.commands:
            command = command.commands[words[used]]
            used += 1
        if isinstance(command, click.Group) and words[used:] and words[used][0] != "-":
            problems.append(f"{line}: no command {words[used]!r}")
            continue
        flags = {flag for p in command.params for flag in (*p.opts, *p.secondary_opts)}
        for word in words[used:]:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("-") and flag not in flags | {"-h", "--help"}:
                problems.append(f"{line}: no option {flag}")
    assert problems == []


def test_the_readme_server_table_lists_every_run_option_with_its_variable() -> None:
    rows = dict(re.findall(r"^\| `(--[a-z-]+)` \| (?:`([A-Z_]+)` )?\|", README, re.M))
    options = {
        param.opts[-1]: param.envvar or ""
        for param in server_cli.commands["run"].params
        if isinstance(param, click.Option) and not param.hidden
    }
    assert {flag: rows.get(flag) for flag in options} == options


def test_examples_use_the_port_the_server_listens_on() -> None:
    default_port = next(p.default for p in server_cli.commands["run"].params if p.name == "port")
    texts = [README]
    for group in PROGRAMS.values():
        texts += [command.help or "" for _, command in _walk(group)]
    ports = {port for text in texts for port in re.findall(r"//127\.0\.0\.1:(\d+)", text)}
    assert ports == {str(default_port)}


# -- --help ----------------------------------------------------------------------------------


def _walk(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _walk(command, (*path, name))


def _command_list(help_page: str) -> dict[str, str]:
    """The Commands section of a --help page: each command and its description, joined."""
    listed: dict[str, str] = {}
    section = help_page.partition("\nCommands:\n")[2]
    for line in section.splitlines():
        entry = re.match(r"  (\S+)\s+(.*)", line)
        if entry:
            listed[entry[1]] = entry[2]
        elif line.startswith("    ") and listed:
            last = next(reversed(listed))
            listed[last] += " " + line.strip()
    return listed


def test_command_lists_show_each_description_as_a_whole_sentence() -> None:
    groups = [
        (program, path)
        for program, group in PROGRAMS.items()
        for path in [(), *(p for p, c in _walk(group) if isinstance(c, click.Group))]
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pages = list(pool.map(lambda g: _run(g[0], *g[1], "--help"), groups))
    cut = []
    for (program, path), page in zip(groups, pages, strict=True):
        assert page.returncode == 0, page.stderr
        listed = _command_list(page.stdout)
        assert listed, (program, path)
        cut += [
            f"{program} {' '.join((*path, name))}: {text}"
            for name, text in listed.items()
            if not text.endswith(".") or text.endswith("...")
        ]
    assert cut == []


def test_server_run_help_names_each_environment_variable() -> None:
    page = " ".join(_run("tufa-server", "run", "--help").stdout.split())
    variables = [
        param.envvar
        for param in server_cli.commands["run"].params
        if isinstance(param, click.Option) and param.envvar and not param.hidden
    ]
    assert "TUFA_PORT" in variables
    assert [v for v in variables if f"env var: {v}" not in page] == []
    assert "TUFA_OPERATOR_TOKEN" in page


def test_every_program_prints_its_version() -> None:
    versions = {program: _run(program, "--version") for program in PROGRAMS}
    for program, done in versions.items():
        assert done.returncode == 0, (program, done.stderr)
    numbers = {done.stdout.split(", version ")[1] for done in versions.values()}
    assert len(numbers) == 1, versions


# -- registration errors ---------------------------------------------------------------------


@sqlite_only
def test_a_refused_registration_names_the_agents_own_token_settings(
    factory: Factory, tmp_path: Path
) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(factory.root_v1("ci"))
    done = _run(
        "tufa-agent", "register", "--server", factory.server.url, "-f", factory.name,
        "--hardware-id", "rpi4", "--tag", "main", "--root", str(root),
        "--dir", str(tmp_path / "device"),
        env={"TUFA_REGISTRATION_TOKEN": "tufa_not_a_token", "TUFA_TOKEN": factory.admin_token},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip()
    assert error.startswith("Error: the server refused the registration: HTTP 401"), error
    assert "--token or TUFA_REGISTRATION_TOKEN" in error
    assert "tufa tokens create --scope register" in error
    assert f"factory {factory.name!r}" in error
    assert "TUFA_TOKEN" not in error.replace("TUFA_REGISTRATION_TOKEN", "")
    assert "tufa login" not in error
    assert not (tmp_path / "device").exists()

    # The admin CLI keeps naming its own settings.
    admin = run_cli(
        "devices", "list", "--server", factory.server.url, "-f", factory.name,
        env={"TUFA_TOKEN": "tufa_not_a_token", "TUFA_CONFIG": str(tmp_path / "none.json")},
    )  # fmt: skip
    assert admin.returncode == 1
    assert "unknown token" in admin.stderr
    assert "check --token, TUFA_TOKEN or `tufa login`" in admin.stderr


# -- shell completion ------------------------------------------------------------------------


def _readme_completion_commands() -> list[tuple[str, str, str]]:
    """(variable, shell, program) of each completion command the README gives."""
    return re.findall(r"(_TUFA\w*_COMPLETE)=(bash|zsh|fish)_source ([\w-]+)", README)


def test_the_readme_gives_completion_for_every_shell_and_both_commands() -> None:
    given = {(shell, program) for _, shell, program in _readme_completion_commands()}
    assert given == {(s, p) for s in ("bash", "zsh", "fish") for p in ("tufa", "tufa-agent")}
    assert "_TUFA_SERVER_COMPLETE" in README


@pytest.mark.parametrize(("variable", "shell", "program"), _readme_completion_commands())
def test_each_readme_completion_command_prints_a_script(
    variable: str, shell: str, program: str
) -> None:
    done = _run(program, env={variable: f"{shell}_source"})
    assert done.returncode == 0, done.stderr
    marker = {"bash": "complete -o nosort -F", "zsh": "#compdef", "fish": "complete --no-files"}
    assert marker[shell] in done.stdout
    assert program in done.stdout


@pytest.mark.parametrize(
    ("program", "variable", "typed", "offered"),
    [
        ("tufa", "_TUFA_COMPLETE", "tufa ke", "keys"),
        ("tufa", "_TUFA_COMPLETE", "tufa keys rotate-r", "rotate-root"),
        ("tufa-agent", "_TUFA_AGENT_COMPLETE", "tufa-agent reg", "register"),
        ("tufa-server", "_TUFA_SERVER_COMPLETE", "tufa-server run --blob", "--blob-dir"),
    ],
)
def test_completion_offers_commands_and_options(
    program: str, variable: str, typed: str, offered: str
) -> None:
    words = typed.split(" ")
    done = _run(
        program,
        env={variable: "bash_complete", "COMP_WORDS": typed, "COMP_CWORD": str(len(words) - 1)},
    )
    assert done.returncode == 0, done.stderr
    assert f"plain,{offered}" in done.stdout.splitlines(), done.stdout
