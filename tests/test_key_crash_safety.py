"""No private key is ever lost, and a wrong archive changes nothing (invariants 4 and 5).

The real `tufa keys rotate-root` / `rotate-targets` are killed with SIGKILL at every step
(TUFA_CRASH_AT, see tufa.core.crashpoints): whatever the step, the archive on disk loads,
is private, and holds every offline key the served roots trust; running the command again
finishes the job, and python-tuf's ngclient, bootstrapped from the version-1 roots it had
before the crash, follows both channels. Wrong archives (another factory's, a
targets-only copy, corrupt files, hostile tarballs) are refused with a clear error, and
neither the archive file nor the server's database changes by a byte.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import signal
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from tests.helpers import (
    Factory,
    Server,
    cli_env,
    create_factory,
    download_archive,
    dump_all_tables,
    run_cli,
)
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import Channel

CHANNELS = tuple(c.value for c in Channel)
PROOF = b"proof of possession"

# The CLI is an HTTP client: the crash cases run against SQLite, plus one on PostgreSQL.
sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)
postgres_only = pytest.mark.parametrize("server", ["postgres"], indirect=True)

ROTATIONS = {"rotate-root": "root", "rotate-targets": "targets"}
# In the order the commands reach them; the write:* points are inside the archive save.
CRASH_POINTS = (
    "write:half-written",
    "write:before-rename",
    "opened",
    "key-saved",
    "staged",
    "signed",
    "applied",
)
# Before these points, the new key has not reached the archive on disk yet.
BEFORE_KEY_SAVED = ("write:half-written", "write:before-rename", "opened")


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Owner:
    """A factory whose owner has downloaded the offline keys archive, alone in its folder."""

    factory: Factory
    archive: Path
    env: dict[str, str]

    @property
    def folder(self) -> Path:
        return self.archive.parent


def _owner(factory: Factory, tmp_path: Path, name: str = "owner", cli: bool = False) -> Owner:
    """The factory's owner with the archive downloaded: by `tufa keys download` if `cli`,
    else by the same two API calls made in-process (one process start less)."""
    folder = tmp_path / name
    folder.mkdir()
    archive = folder / "keys.tgz"
    env = cli_env(factory, tmp_path / f"{name}-config.json")
    if cli:
        done = run_cli("keys", "download", str(archive), env=env)
        assert done.returncode == 0, done.stderr
    else:
        download_archive(factory, archive)
    return Owner(factory, archive, env)


@pytest.fixture
def owner(factory: Factory, tmp_path: Path) -> Owner:
    return _owner(factory, tmp_path)


@pytest.fixture(scope="module")
def other_archive(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """Another factory on the same server, and its genuine archive (read-only: copy it)."""
    other = _owner(create_factory(server), tmp_path_factory.mktemp("other"))
    return other.factory.name, other.archive.read_bytes()


def _crash_name(command: str, point: str) -> str:
    return point if point.startswith("write:") else f"{command}:{point}"


def _served_roots(factory: Factory) -> dict[str, Root]:
    roots = {}
    for channel in CHANNELS:
        response = factory.request("GET", f"/repo/{channel}/metadata/root.json")
        response.raise_for_status()
        roots[channel] = Metadata[Root].from_bytes(response.content).signed
    return roots


def _online_keyids(factory: Factory) -> set[str]:
    response = factory.request("GET")
    response.raise_for_status()
    return {k["keyid"] for k in response.json()["online_keys"]}


def _load_private_archive(factory: Factory, path: Path) -> OfflineArchive:
    """The archive at `path`: loadable, the factory's, and readable by its owner only."""
    archive = OfflineArchive.load(path)
    assert archive.factory == factory.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    return archive


def _assert_holds_every_offline_key(factory: Factory, path: Path) -> dict[str, Root]:
    """The archive holds the private key of every offline key the served roots trust
    (root keys, and targets keys the server does not hold); return the served roots."""
    archive = _load_private_archive(factory, path)
    online = _online_keyids(factory)
    roots = _served_roots(factory)
    for channel, root in roots.items():
        offline = set(root.roles["root"].keyids) | (set(root.roles["targets"].keyids) - online)
        assert offline, channel
        for keyid in sorted(offline):
            held = archive.find(keyid)
            assert held is not None, (
                f"the served {channel} root v{root.version} trusts {keyid}, which {path} lacks"
            )
            # The private key is the one the root trusts, not just a file of that name.
            (pair,) = [p for _, p in held.files() if p.keyid == keyid]
            root.keys[keyid].verify_signature(pair.signer().sign(PROOF), PROOF)
    return roots


def _versions(roots: dict[str, Root]) -> dict[str, int]:
    return {channel: root.version for channel, root in roots.items()}


def _stray_files(owner: Owner) -> list[Path]:
    return sorted(p for p in owner.folder.iterdir() if p != owner.archive)


def _refresh(factory: Factory, trust: Path) -> dict[str, int]:
    """python-tuf's ngclient refreshes both channels; the root version each now trusts."""
    trusted = {}
    for channel in CHANNELS:
        factory.updater(channel, trust / channel).refresh()
        persisted = Metadata[Root].from_file(str(trust / channel / "root.json"))
        trusted[channel] = persisted.signed.version
    return trusted


# -- 1. crash safety ----------------------------------------------------------------------


def _crash_and_recover(owner: Owner, tmp_path: Path, command: str, point: str) -> None:
    factory, path = owner.factory, owner.archive
    role = ROTATIONS[command]
    downloaded = path.read_bytes()
    keys_before = set(OfflineArchive.load(path).keyids())
    replaced = {keyid for k in OfflineArchive.load(path).keys_for(role) for keyid in k.keyids}
    # Devices that trust the version-1 roots and have seen the current metadata.
    root_v1 = {channel: factory.root_v1(channel) for channel in CHANNELS}
    trust = tmp_path / "trust"
    assert _refresh(factory, trust) == dict.fromkeys(CHANNELS, 1)
    before = _versions(_assert_holds_every_offline_key(factory, path))

    crashed = run_cli(
        "keys", command, str(path), env={**owner.env, "TUFA_CRASH_AT": _crash_name(command, point)}
    )
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)

    # (a) The archive is whole and private; a temporary file may be left, never a mix.
    archive = _load_private_archive(factory, path)
    keys_after = set(archive.keyids())
    if point in BEFORE_KEY_SAVED:
        assert path.read_bytes() == downloaded
    else:
        new = keys_after - keys_before
        assert keys_before <= keys_after
        (added,) = {archive.find(keyid) for keyid in new}  # one key (a root key: both halves)
        assert added is not None
        assert added.role == role
        assert set(added.keyids) == new
    for stray in _stray_files(owner):
        # A SIGKILL'd write leaves its temporary file; it is acceptable only as that
        # (named after the archive, dot-hidden, private), next to an intact archive.
        assert re.fullmatch(rf"\.{re.escape(path.name)}\.\d+\.tmp", stray.name), stray
        assert point.startswith("write:"), f"{stray.name} left at {point}"
        assert stat.S_IMODE(stray.stat().st_mode) == 0o600, oct(stray.stat().st_mode)

    # (b) The archive holds every key the served roots trust; the roots moved only if
    # the update was applied before the crash.
    after_crash = _versions(_assert_holds_every_offline_key(factory, path))
    bump = 1 if point == "applied" else 0
    assert after_crash == {c: v + bump for c, v in before.items()}

    # (c) Running the command again finishes the rotation.
    done = run_cli("keys", command, str(path), env=owner.env)
    assert done.returncode == 0, done.stderr
    roots = _assert_holds_every_offline_key(factory, path)
    final = _versions(roots)
    assert final["ci"] == final["prod"]
    assert all(final[c] > after_crash[c] for c in CHANNELS), (after_crash, final)
    recovered = OfflineArchive.load(path)
    assert keys_before <= set(recovered.keyids()), "a key was dropped"
    for channel, root in roots.items():
        assert not replaced & set(root.roles[role].keyids), f"{channel} still trusts old {role}"
        served = factory.request("GET", f"/repo/{channel}/metadata/root.json").content
        assert recovered.roots[Channel(channel)] == served, f"stale {channel} root in archive"
    # The version-1 roots are those the devices were bootstrapped with before the crash,
    # and from them ngclient walks the root chain to the new one on both channels.
    assert {channel: factory.root_v1(channel) for channel in CHANNELS} == root_v1
    assert _refresh(factory, trust) == final


@sqlite_only
@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("command", list(ROTATIONS))
def test_rotation_killed_at_any_step_loses_no_key(
    factory: Factory, tmp_path: Path, command: str, point: str
) -> None:
    _crash_and_recover(_owner(factory, tmp_path), tmp_path, command, point)


@pytest.mark.postgres
@postgres_only
def test_rotation_killed_after_signing_recovers_on_postgres(
    factory: Factory, tmp_path: Path
) -> None:
    _crash_and_recover(_owner(factory, tmp_path, cli=True), tmp_path, "rotate-targets", "signed")


# -- 2. wrong archives --------------------------------------------------------------------


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        out = []
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            out.append((member, extracted.read() if extracted else None))
        return out


def _tarball(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _with_entry(genuine: bytes, info: tarfile.TarInfo, data: bytes | None = None) -> bytes:
    """The genuine archive with one more entry: everything else in it is usable."""
    if data is not None:
        info.size = len(data)
    return _tarball([*_members(genuine), (info, data)])


def _relabelled(data: bytes, factory: str) -> bytes:
    """An archive whose config.json claims `factory`, keys and all else unchanged."""
    members = []
    for info, content in _members(data):
        if info.name == "config.json":
            assert content is not None
            content = json.dumps({**json.loads(content), "factory": factory}).encode()
            info.size = len(content)
        members.append((info, content))
    return _tarball(members)


@contextmanager
def _nothing_changes(owner: Owner, path: Path) -> Iterator[None]:
    """Neither the file at `path`, nor the owner's folder, nor the server's database
    changes while the block runs."""
    data = path.read_bytes()
    mode = path.stat().st_mode
    listing = sorted(p.name for p in path.parent.iterdir())
    database = dump_all_tables(owner.factory.server)
    yield
    assert path.read_bytes() == data, f"{path} was rewritten"
    assert path.stat().st_mode == mode
    assert sorted(p.name for p in path.parent.iterdir()) == listing
    assert dump_all_tables(owner.factory.server) == database


def _refused(owner: Owner, path: Path, command: str, *expected: str) -> str:
    """`command` run on the archive at `path` fails, says why (returned), and changes
    nothing."""
    if command == "sign":
        # Signing needs an open update: one that would accept a useful signature.
        response = owner.factory.request("POST", "/keys/updates", json={"message": "test"})
        assert response.status_code in (200, 201), response.text
        args = ["keys", "updates", "sign", "-k", str(path)]
    else:
        args = ["keys", command, str(path)]
    with _nothing_changes(owner, path):
        # From the archive's folder: a `..` entry, if it were ever written, lands next to it.
        done = run_cli(*args, env=owner.env, cwd=path.parent)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("Error: "), done.stderr
    for text in expected:
        assert text in done.stderr, f"{text!r} not in {done.stderr!r}"
    return done.stderr


COMMANDS = ("rotate-root", "rotate-targets", "sign")


@sqlite_only
@pytest.mark.parametrize("command", COMMANDS)
def test_another_factorys_archive_is_refused(owner: Owner, tmp_path: Path, command: str) -> None:
    other = _owner(create_factory(owner.factory.server), tmp_path, "other")
    _refused(
        owner,
        other.archive,
        command,
        f"is the archive of factory {other.factory.name!r}, not {owner.factory.name!r}",
        f"give the archive of {owner.factory.name!r}, or -f {other.factory.name}",
    )


@sqlite_only
@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("rotate-root", "it is the archive of another factory of that name"),
        ("rotate-targets", "it is the archive of another factory of that name"),
        ("sign", "holds no key that may sign this update"),
    ],
)
def test_another_factorys_keys_under_this_factorys_name_are_refused(
    owner: Owner, tmp_path: Path, other_archive: tuple[str, bytes], command: str, message: str
) -> None:
    forged = tmp_path / "forged.tgz"
    forged.write_bytes(_relabelled(other_archive[1], owner.factory.name))
    forged.chmod(0o600)
    _refused(owner, forged, command, message)


@sqlite_only
@pytest.mark.parametrize("command", ["rotate-root", "rotate-targets"])
def test_targets_only_archive_cannot_change_the_root(
    owner: Owner, tmp_path: Path, command: str
) -> None:
    copy = tmp_path / "release" / "targets-only.tgz"
    copy.parent.mkdir()
    done = run_cli("keys", "copy-targets", str(owner.archive), str(copy))
    assert done.returncode == 0, done.stderr
    assert not OfflineArchive.load(copy).keys_for("root")
    assert OfflineArchive.load(copy).keys_for("targets")
    _refused(owner, copy, command, "it is a targets-only copy", "needs a root key")


@sqlite_only
@pytest.mark.parametrize("command", ["rotate-root", "rotate-targets"])
def test_an_older_copy_of_the_archive_names_the_root_version_it_knows(
    owner: Owner, tmp_path: Path, command: str
) -> None:
    older = tmp_path / "older" / "keys.tgz"
    older.parent.mkdir()
    older.write_bytes(owner.archive.read_bytes())
    older.chmod(0o600)
    for _ in range(2):
        done = run_cli("keys", "rotate-root", str(owner.archive), env=owner.env)
        assert done.returncode == 0, done.stderr
    error = _refused(
        owner,
        older,
        command,
        "is an older copy: its root keys are those of root version 1",
        f"a root key of factory {owner.factory.name}'s current root (version 3)",
    )
    assert "targets-only" not in error


def _random_bytes(genuine: bytes) -> bytes:
    return secrets.token_bytes(len(genuine))


def _truncated_gzip(genuine: bytes) -> bytes:
    return genuine[: len(genuine) // 2]


def _damaged_deflate(genuine: bytes) -> bytes:
    # A valid gzip header, then a deflate block of the reserved (invalid) type.
    return genuine[:10] + b"\xff" * 64


def _gzip_not_tar(genuine: bytes) -> bytes:
    return gzip.compress(b"not a tar archive\n" * 64)


def _empty(genuine: bytes) -> bytes:
    return b""


CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "random-bytes": (_random_bytes, "is not a gzip'd tar archive"),
    "truncated-gzip": (_truncated_gzip, "is not a gzip'd tar archive"),
    "damaged-deflate": (_damaged_deflate, "is not a gzip'd tar archive"),
    "gzip-not-tar": (_gzip_not_tar, "is not a valid tar archive"),
    "empty": (_empty, "archive"),
}


# Every command reads the archive the same way: the two commonest kinds of damage are
# tried on each, the rarer ones on rotate-root.
CORRUPT_CASES = [
    *(
        (corruption, command)
        for corruption in ("random-bytes", "truncated-gzip")
        for command in COMMANDS
    ),
    *((corruption, "rotate-root") for corruption in ("damaged-deflate", "gzip-not-tar", "empty")),
]


@sqlite_only
@pytest.mark.parametrize(("corruption", "command"), CORRUPT_CASES)
def test_corrupt_archive_is_refused(
    factory: Factory,
    tmp_path: Path,
    other_archive: tuple[str, bytes],
    corruption: str,
    command: str,
) -> None:
    # The bytes are damaged before anything reads them: whose archive they were is moot,
    # and this factory's own archive stays on the server.
    owner = Owner(factory, tmp_path / "keys.tgz", cli_env(factory, tmp_path / "config.json"))
    corrupt, message = CORRUPTIONS[corruption]
    owner.archive.write_bytes(corrupt(other_archive[1]))
    owner.archive.chmod(0o600)
    _refused(owner, owner.archive, command, str(owner.archive), message)


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o600
    return info


@sqlite_only
@pytest.mark.parametrize("hostile", ["dotdot", "absolute", "symlink", "hardlink"])
def test_hostile_tarball_is_refused_before_anything_is_used(
    owner: Owner, tmp_path: Path, hostile: str
) -> None:
    tag = secrets.token_hex(4)
    escaped = {
        "dotdot": owner.folder.parent / f"escaped-{tag}.txt",
        "absolute": Path(f"/tmp/tufa-escaped-{tag}.txt"),
    }
    entries = {
        "dotdot": (_entry(f"../escaped-{tag}.txt"), "unsafe path"),
        "absolute": (_entry(str(escaped["absolute"])), "unsafe path"),
        "symlink": (_entry("keys/root-evil.sec", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        "hardlink": (_entry("keys/root-evil.sec", tarfile.LNKTYPE, "config.json"), "link"),
    }
    info, message = entries[hostile]
    data = b"escaped\n" if info.isfile() else None
    owner.archive.write_bytes(_with_entry(owner.archive.read_bytes(), info, data))
    _refused(owner, owner.archive, "rotate-root", message, repr(info.name))
    for path in escaped.values():
        assert not path.exists(), f"{path} was written outside the archive"


# -- 3. modes -----------------------------------------------------------------------------


@contextmanager
def _permissive_umask() -> Iterator[None]:
    """Files the CLI creates get no help from the umask: their mode is the code's doing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@sqlite_only
@pytest.mark.parametrize("command", list(ROTATIONS))
def test_rotated_archive_is_private_whatever_its_mode_was(owner: Owner, command: str) -> None:
    owner.archive.chmod(0o644)  # a careless copy: the rewrite must not keep this
    with _permissive_umask():
        done = run_cli("keys", command, str(owner.archive), env=owner.env)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(owner.archive.stat().st_mode) == 0o600
    assert _stray_files(owner) == []
    _assert_holds_every_offline_key(owner.factory, owner.archive)


@sqlite_only
@pytest.mark.parametrize("existing", [False, True])
def test_login_config_is_private(factory: Factory, tmp_path: Path, existing: bool) -> None:
    config = tmp_path / "conf" / "config.json"
    if existing:
        config.parent.mkdir()
        config.write_text("{}\n")
        config.chmod(0o644)
    with _permissive_umask():
        done = run_cli(
            "login",
            "--server",
            factory.server.url,
            "--factory",
            factory.name,
            "--token",
            factory.admin_token,
            env={"TUFA_CONFIG": str(config)},
        )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["token"] == factory.admin_token
    if not existing:
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]
