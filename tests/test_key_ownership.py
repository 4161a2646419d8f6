"""An owner releasing to production with the keys the server generated is told, at
each step, until they rotated them (`tufa keys rotate-root`, `rotate-targets`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Factory, run_cli
from tests.test_waves import publish, start_owner

sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)
BOTH = (
    "production devices still trust the root key and the offline targets key the server "
    "generated when it created this factory (it held them until the archive was "
    "downloaded): take ownership with `tufa keys rotate-root ARCHIVE` and `tufa keys "
    "rotate-targets ARCHIVE`"
)
TARGETS_ONLY = (
    "production devices still trust the offline targets key the server generated when it "
    "created this factory (it held them until the archive was downloaded): take ownership "
    "with `tufa keys rotate-targets ARCHIVE`"
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@sqlite_only
def test_waves_and_factory_show_warn_until_the_generated_keys_are_rotated(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    archive = str(owner.archive)
    publish(factory, "3", "4")
    shown = owner.json("factory", "show")
    assert shown["server_generated_keys"] == ["root", "targets"]
    assert BOTH in shown["warnings"]
    printed = run_cli("factory", "show", env=owner.env)
    assert printed.returncode == 0, printed.stderr
    assert f"WARNING: {BOTH}" in _one_line(printed.stderr)

    init = run_cli("waves", "init", "rel-3", "3", "main", "-k", archive, env=owner.env)
    assert init.returncode == 0, init.stderr
    assert "Wave rel-3: tag main, version 3" in init.stdout
    assert _one_line(init.stderr) == f"WARNING: {BOTH}"

    owner.tufa("keys", "rotate-root", archive)
    assert owner.json("factory", "show")["server_generated_keys"] == ["targets"]
    complete = run_cli("waves", "complete", "rel-3", env=owner.env)
    assert complete.returncode == 0, complete.stderr
    assert _one_line(complete.stderr) == f"WARNING: {TARGETS_ONLY}"

    owner.tufa("keys", "rotate-targets", archive)
    shown = owner.json("factory", "show")
    assert shown["server_generated_keys"] == []
    assert shown["warnings"] == []
    init = run_cli("waves", "init", "rel-4", "4", "main", "-k", archive, env=owner.env)
    assert init.returncode == 0, init.stderr
    assert init.stderr == ""
