"""Offline copies of the keys archive: `tufa keys copy-targets`, `backup` and `restore`.

No server is needed: these commands work on files only. Archives are built here with
real keys of all three types. The installed `tufa` command runs the main paths; the
long matrix of hostile and broken archives runs the same click command in-process (a
process start costs ~0.6 s). Each hostile archive is checked twice: against
`OfflineArchive.load` and through `copy-targets`, which must then write nothing at all.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import run_cli
from tufa.cli.keys.offline import backup, copy_targets, restore
from tufa.cli.main import cli
from tufa.core.archive import FIRST_ROOT_KEY_NAME, ArchiveError, ArchiveKey, OfflineArchive
from tufa.core.backup import FORMAT_TITLE, BackupError, parse_backup, render_backup
from tufa.core.backup_lines import line_check
from tufa.core.keys import KeyPair, KeyType, key_to_json
from tufa.core.metadata import ROOT, Channel

FACTORY = "acme"
CI_ROOT = b'{"signed": {"_type": "root", "version": 3}, "signatures": []}'
PROD_ROOT = b'{"signed": {"_type": "root", "version": 4}, "signatures": []}'
NOTES = b"kept by tufa, unknown to it\n"
PEM_LINE = re.compile(r"^(\d+)  ([A-Za-z0-9+/=]{16,})\s+([0-9a-f]{6})$")


@functools.cache
def _generated(key_type: KeyType, index: int) -> KeyPair:
    return KeyPair.generate(key_type)


def _pair(key_type: KeyType, index: int = 0) -> KeyPair:
    """The same key for the same (type, index) all through the run: RSA keys are slow."""
    return _generated(key_type, index)


def _archive(
    root_types: tuple[KeyType, ...] = (KeyType.ED25519,),
    targets_types: tuple[KeyType, ...] = (KeyType.ED25519,),
    *,
    shared_root: bool = False,
) -> OfflineArchive:
    """An archive like a real one: root keys as pairs (the first as offline-root), roots,
    extras. With `shared_root`, root keys are one key for both channels, as in archives
    of factories created before the channels were separated."""
    archive = OfflineArchive(factory=FACTORY)
    for i, key_type in enumerate(root_types):
        ci = _pair(key_type, i)
        name = FIRST_ROOT_KEY_NAME if i == 0 else f"root-{ci.keyid}"
        prod = ci if shared_root else _pair(key_type, 50 + i)
        archive.add(ArchiveKey(ROOT, name, ci, prod))
    for i, key_type in enumerate(targets_types):
        archive.add_key("targets", _pair(key_type, 10 + i))
    archive.roots = {Channel.CI: CI_ROOT, Channel.PROD: PROD_ROOT}
    archive.extra = {"notes/readme.txt": NOTES}
    return archive


def _pairs(archive: OfflineArchive, role: str) -> dict[str, tuple[str, KeyPair]]:
    """The archive's private keys of `role` (both halves of root keys) by key id, with
    their file names under keys/."""
    return {
        pair.keyid: (stem, pair) for key in archive.keys_for(role) for stem, pair in key.files()
    }


def _save(archive: OfflineArchive, path: Path) -> Path:
    archive.save(path)
    return path


def _tufa(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*(str(a) for a in args))


def _tufa_in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command, run in this process: ~1 ms instead of a 0.6 s interpreter start.

    Used for the long matrix of hostile archives only; an exception that escapes the
    command (instead of a clean `Error:`) fails the test with its traceback.
    """
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["tufa", *map(str, args)], result.exit_code, result.stdout, result.stderr
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    """A permissive umask for the commands run inside: 0600 must not depend on it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _assert_refused(
    done: subprocess.CompletedProcess[str], *fragments: str, folder: Path, before: set[str]
) -> None:
    """Exit non-zero, an `Error:` naming the problem on stderr, and no file added or left."""
    assert done.returncode != 0, done.stdout
    assert "Error:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in {done.stderr!r}"
    assert set(os.listdir(folder)) == before, "a file (or a temporary one) was left behind"


# --- copy-targets ---------------------------------------------------------------------


def test_copy_targets_keeps_targets_keys_and_roots_and_drops_every_root_key(
    tmp_path: Path,
) -> None:
    source = _archive(
        root_types=(KeyType.ED25519, KeyType.RSA, KeyType.ECDSA),
        targets_types=(KeyType.ECDSA, KeyType.ED25519, KeyType.RSA),
    )
    root_pem = source.keys_for("root")[0].ci.private_pem
    # A root key under a name tufa does not read, and one outside keys/: neither may
    # reach the copy. A harmless unknown entry must.
    source.extra["keys/root-no-pub-file.sec"] = root_pem
    source.extra["old/offline-root.sec"] = root_pem
    src = _save(source, tmp_path / "keys.tgz")
    dst = tmp_path / "targets-only.tgz"

    with _umask(0):
        done = _tufa("keys", "copy-targets", src, dst)

    assert done.returncode == 0, done.stderr
    targets = [k.keyid for k in source.keys_for("targets")]
    for keyid in targets:
        assert keyid in done.stdout
    assert _mode(dst) == 0o600
    copy = OfflineArchive.load(dst)
    assert copy.factory == FACTORY
    assert copy.keys_for("root") == []
    assert _pairs(copy, "targets") == _pairs(source, "targets")
    assert copy.roots == {Channel.CI: CI_ROOT, Channel.PROD: PROD_ROOT}
    assert copy.extra == {"notes/readme.txt": NOTES}
    contents = b""
    with tarfile.open(dst) as tar:
        for member in tar.getmembers():
            assert member.isfile()
            assert member.mode == 0o600, member.name
            extracted = tar.extractfile(member)
            assert extracted is not None
            contents += extracted.read()
    for keyid, (_, pair) in _pairs(source, "root").items():
        assert keyid not in contents.decode()
        assert pair.private_pem not in contents
    assert b"PRIVATE KEY" in contents  # the targets keys are there
    assert set(os.listdir(tmp_path)) == {"keys.tgz", "targets-only.tgz"}


def test_copy_targets_json_lists_what_was_copied_and_left_out(tmp_path: Path) -> None:
    source = _archive()
    src = _save(source, tmp_path / "keys.tgz")
    dst = tmp_path / "copy.tgz"

    done = _tufa("keys", "copy-targets", src, dst, "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["archive"] == str(dst)
    assert report["factory"] == FACTORY
    assert report["targets_keyids"] == list(_pairs(source, "targets"))
    assert report["roots"] == ["ci", "prod"]
    assert report["extra"] == ["notes/readme.txt"]
    assert report["left_out"]["root_keyids"] == list(_pairs(source, "root"))


def test_copy_targets_never_overwrites(tmp_path: Path) -> None:
    src = _save(_archive(), tmp_path / "keys.tgz")
    dst = tmp_path / "existing.tgz"
    dst.write_bytes(b"precious")
    dangling = tmp_path / "dangling.tgz"
    dangling.symlink_to(tmp_path / "nowhere.tgz")
    before = set(os.listdir(tmp_path))

    for target in (dst, dangling):
        done = _tufa("keys", "copy-targets", src, target)
        _assert_refused(done, str(target), "already exists", folder=tmp_path, before=before)
    assert dst.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere.tgz").exists()
    assert OfflineArchive.load(src).keys_for("root")


def test_copy_targets_refuses_an_archive_without_targets_keys(tmp_path: Path) -> None:
    src = _save(_archive(targets_types=()), tmp_path / "roots-only.tgz")
    before = set(os.listdir(tmp_path))
    done = _tufa_in_process("keys", "copy-targets", src, tmp_path / "copy.tgz")
    _assert_refused(done, "holds no targets keys", folder=tmp_path, before=before)


# --- hostile and broken archives ---------------------------------------------------------


def _valid_files() -> dict[str, bytes]:
    files = {"config.json": json.dumps({"format": 1, "factory": FACTORY}).encode()}
    for role, name, pair in (
        ("root", FIRST_ROOT_KEY_NAME, _pair(KeyType.ED25519)),
        ("targets", f"targets-{_pair(KeyType.ECDSA, 10).keyid}", _pair(KeyType.ECDSA, 10)),
    ):
        assert role in name
        files[f"keys/{name}.pub"] = key_to_json(pair.public)
        files[f"keys/{name}.sec"] = pair.private_pem
    return files


def _tar(files: dict[str, bytes], odd: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    """An uncompressed tar of `files`, then whatever `odd` adds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if odd is not None:
            odd(tar)
    return buf.getvalue()


def _with_member(
    name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"x"
) -> bytes:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return gzip.compress(_tar(_valid_files(), add))


def _duplicate() -> bytes:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("./config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))

    return gzip.compress(_tar(_valid_files(), add))


def _gzip_bomb() -> bytes:
    """A few KiB that unpack to a 17 MiB tar (one member of zeros)."""
    files = _valid_files()
    files["zeros.bin"] = bytes(17 * 1024 * 1024)
    return gzip.compress(_tar(files), compresslevel=9)


def _sparse_bomb() -> bytes:
    """A member of a few bytes that declares itself a 17 MiB sparse file (PAX sparse 1.0)."""

    def add(tar: tarfile.TarFile) -> None:
        payload = b"1\n0\n1\n".ljust(512, b"\0") + b"x"
        info = tarfile.TarInfo("zeros.bin")
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "zeros.bin",
            "GNU.sparse.realsize": str(17 * 1024 * 1024),
        }
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    return gzip.compress(_tar(_valid_files(), add))


def _without_config() -> bytes:
    files = _valid_files()
    del files["config.json"]
    return gzip.compress(_tar(files))


def _pub_of_another_key() -> bytes:
    files = _valid_files()
    files[f"keys/{FIRST_ROOT_KEY_NAME}.pub"] = key_to_json(_pair(KeyType.ED25519, 1).public)
    return gzip.compress(_tar(files))


def _lying_keyid() -> bytes:
    files = _valid_files()
    pub = json.loads(files[f"keys/{FIRST_ROOT_KEY_NAME}.pub"])
    pub["keyid"] = _pair(KeyType.ED25519, 1).keyid
    files[f"keys/{FIRST_ROOT_KEY_NAME}.pub"] = json.dumps(pub).encode()
    return gzip.compress(_tar(files))


def _with_key_files(stem: str, pair: KeyPair) -> dict[str, bytes]:
    files = _valid_files()
    files[f"keys/{stem}.pub"] = key_to_json(pair.public)
    files[f"keys/{stem}.sec"] = pair.private_pem
    return files


def _lone_root_half() -> bytes:
    """The CI half of a root key without its production half."""
    ci = _pair(KeyType.ED25519, 3)
    return _format(2, _with_key_files(f"root-{ci.keyid}.ci", ci))


def _targets_key_for_one_channel() -> bytes:
    pair = _pair(KeyType.ED25519, 4)
    return gzip.compress(_tar(_with_key_files(f"targets-{pair.keyid}.prod", pair)))


def _halves_that_are_one_key() -> bytes:
    pair = _pair(KeyType.ED25519, 5)
    files = _with_key_files(f"root-{pair.keyid}.ci", pair)
    files[f"keys/root-{pair.keyid}.prod.pub"] = key_to_json(pair.public)
    files[f"keys/root-{pair.keyid}.prod.sec"] = pair.private_pem
    return _format(2, files)


def _format(value: object, files: dict[str, bytes] | None = None) -> bytes:
    files = dict(_valid_files() if files is None else files)
    files["config.json"] = json.dumps({"format": value, "factory": FACTORY}).encode()
    return gzip.compress(_tar(files))


def _retired_keys_not_a_list() -> bytes:
    files = dict(_valid_files())
    config = {"format": 2, "factory": FACTORY, "retired_keys": "targets-abc"}
    files["config.json"] = json.dumps(config).encode()
    return gzip.compress(_tar(files))


def _halves_in_format_1() -> bytes:
    """A root key pair in an archive that says it was made before pairs existed."""
    ci, prod = _pair(KeyType.ED25519, 6), _pair(KeyType.ED25519, 7)
    files = _with_key_files(f"root-{ci.keyid}.ci", ci)
    files[f"keys/root-{ci.keyid}.prod.pub"] = key_to_json(prod.public)
    files[f"keys/root-{ci.keyid}.prod.sec"] = prod.private_pem
    return _format(1, files)


def _damaged_deflate() -> bytes:
    """A gzip header, then a deflate stream zlib rejects (fixed bytes: always the same error)."""
    data = bytearray(gzip.compress(b"tufa archive " * 200, mtime=0))
    for i in range(12, 40):
        data[i] ^= 0xFF
    return bytes(data)


# (id, archive bytes, what the error must say)
HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("dotdot", lambda: _with_member("keys/../../escaped.sec"), "unsafe path"),
    ("absolute", lambda: _with_member("/tmp/escaped.sec"), "unsafe path"),
    (
        "symlink",
        lambda: _with_member("keys/evil.sec", tarfile.SYMTYPE, "/etc/passwd"),
        "special file",
    ),
    (
        "hardlink",
        lambda: _with_member("keys/evil.sec", tarfile.LNKTYPE, "config.json"),
        "special file",
    ),
    ("device", lambda: _with_member("keys/null", tarfile.CHRTYPE), "special file"),
    ("fifo", lambda: _with_member("keys/pipe", tarfile.FIFOTYPE), "special file"),
    ("duplicate", _duplicate, "appears twice"),
    ("not-gzip", lambda: b"this is not an archive\n" * 10, "not a gzip'd tar archive"),
    ("gzip-not-tar", lambda: gzip.compress(b"hello, not a tar\n" * 100), "not a valid tar"),
    ("gzip-bomb", _gzip_bomb, "unpacks to more than 16777216 bytes"),
    ("no-config", _without_config, "missing config.json"),
    ("pub-of-another-key", _pub_of_another_key, "does not match public key"),
    ("lying-keyid", _lying_keyid, "does not match public key"),
    ("lone-root-half", _lone_root_half, "has no prod half"),
    ("targets-key-for-one-channel", _targets_key_for_one_channel, "only root keys have"),
    ("halves-that-are-one-key", _halves_that_are_one_key, "is stored twice"),
    ("newer-format", lambda: _format(3), "archive format 3; this tufa reads formats 1, 2"),
    ("format-not-a-number", lambda: _format(True), "archive format True;"),
    ("format-a-fraction", lambda: _format(1.0), "archive format 1.0;"),
    ("halves-in-format-1", _halves_in_format_1, "archives of format 1 (made before"),
    ("retired-keys-not-a-list", _retired_keys_not_a_list, "retired_keys is not a list"),
]
# Found while writing these tests; OfflineArchive.load (core/archive.py) still lets
# them through. The copy-targets command refuses both already.
DAMAGED: list[tuple[str, Callable[[], bytes], str]] = [
    ("damaged-deflate", _damaged_deflate, "not a gzip'd tar archive"),
    ("sparse-bomb", _sparse_bomb, "a sparse or a special file"),
]


@functools.cache
def _hostile_bytes(case: str) -> bytes:
    (make,) = [m for name, m, _ in HOSTILE + DAMAGED if name == case]
    return make()


def _load_refused(case: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.tgz"
    path.write_bytes(_hostile_bytes(case))
    with pytest.raises(ArchiveError, match=re.escape(message)) as caught:
        OfflineArchive.load(path)
    assert str(path) in str(caught.value)
    assert set(os.listdir(tmp_path)) == {path.name}


@pytest.mark.parametrize(("case", "message"), [(c, m) for c, _, m in HOSTILE + DAMAGED])
def test_load_refuses_hostile_and_broken_archives(case: str, message: str, tmp_path: Path) -> None:
    _load_refused(case, message, tmp_path)


@pytest.mark.parametrize(("case", "message"), [(c, m) for c, _, m in HOSTILE + DAMAGED])
def test_copy_targets_refuses_hostile_archives_and_writes_nothing(
    case: str, message: str, tmp_path: Path
) -> None:
    src = tmp_path / "src" / f"{case}.tgz"
    src.parent.mkdir()
    src.write_bytes(_hostile_bytes(case))
    out = tmp_path / "out"
    out.mkdir()

    done = _tufa_in_process("keys", "copy-targets", src, out / "copy.tgz")

    _assert_refused(done, message, str(src), folder=out, before=set())
    assert not (tmp_path / "escaped.sec").exists()
    assert os.listdir(src.parent) == [src.name]
    assert src.read_bytes() == _hostile_bytes(case)


def test_copy_targets_process_refuses_a_hostile_archive(tmp_path: Path) -> None:
    """The matrix above runs in-process for speed; one case through the installed command."""
    src = tmp_path / "src.tgz"
    src.write_bytes(_hostile_bytes("symlink"))
    done = _tufa("keys", "copy-targets", src, tmp_path / "copy.tgz")
    _assert_refused(done, "special file", folder=tmp_path, before={"src.tgz"})


def _root_listing(root_keyids: list[str], targets_keyids: list[str]) -> bytes:
    roles = {ROOT: {"keyids": root_keyids}, "targets": {"keyids": targets_keyids}}
    return json.dumps({"signed": {"_type": "root", "roles": roles}}).encode()


def test_new_roots_retire_the_keys_they_stop_listing_and_only_those(tmp_path: Path) -> None:
    archive = _archive(root_types=(KeyType.ED25519, KeyType.ECDSA))
    first, second = archive.keys_for(ROOT)
    (targets,) = archive.keys_for("targets")
    both = {c: _root_listing([first.half(c).keyid], [targets.keyid]) for c in Channel}
    archive.replace_roots(both)
    assert archive.retired == set()
    # `second` was never listed (a key for an update not applied yet): never retired.
    archive.replace_roots({c: _root_listing([], [targets.keyid]) for c in Channel})
    assert archive.retired == {first.keyid}
    loaded = OfflineArchive.load(_save(archive, tmp_path / "keys.tgz"))
    assert loaded.retired == {first.keyid}
    assert [k.keyid for k in loaded.keys_for(ROOT, include_retired=False)] == [second.keyid]
    assert [k.keyid for k in loaded.retired_keys(ROOT)] == [first.keyid]
    loaded.replace_roots(both)
    assert loaded.retired == set(), "a key listed again is no longer retired"


def test_an_archive_of_a_factory_created_before_the_channels_were_separated_still_works(
    tmp_path: Path,
) -> None:
    """Format 1: root keys both channels share, without a `.ci`/`.prod` half suffix."""
    src = tmp_path / "old.tgz"
    src.write_bytes(gzip.compress(_tar(_valid_files())))

    old = OfflineArchive.load(src)

    (root,) = old.keys_for("root")
    assert root.is_shared
    assert root.half(Channel.CI) == root.half(Channel.PROD) == _pair(KeyType.ED25519)
    rewritten = tmp_path / "rewritten.tgz"
    old.save(rewritten)
    with tarfile.open(rewritten) as tar:
        names = set(tar.getnames())
        config = tar.extractfile("config.json")
        assert config is not None
        assert json.loads(config.read())["format"] == 2
    # A shared key keeps its old file names: nothing in the archive is renamed.
    assert {f"keys/{FIRST_ROOT_KEY_NAME}.sec", f"keys/{FIRST_ROOT_KEY_NAME}.pub"} <= names
    assert OfflineArchive.load(rewritten).keys == old.keys
    # Its paper backup restores the same shared key.
    text = render_backup(old)
    assert " for both as offline-root " in text
    assert parse_backup(text).keys == old.keys_for("root")


def test_a_format_1_backup_restores_a_key_both_channels_share() -> None:
    pair = _pair(KeyType.ED25519)
    pem = pair.private_pem.decode().splitlines()
    texts = [
        "tufa root keys backup, format 1",
        f"factory: {FACTORY}",
        "created: 2026-11-23T15:34:37Z",
        "root keys: 1",
        "type back every line: number, text, check; see tufa keys restore",
        f"key root {pair.keyid} ed25519 ed25519 as {FIRST_ROOT_KEY_NAME}",
        *pem,
        "end",
    ]
    text = "".join(f"{n:02d}  {t}  {line_check(n, t)}\n" for n, t in enumerate(texts, 1))

    (key,) = parse_backup(text).keys

    assert key == ArchiveKey.shared(ROOT, FIRST_ROOT_KEY_NAME, pair)


def test_a_backup_missing_one_half_of_a_root_key_is_refused() -> None:
    text = render_backup(_archive())
    lines = text.splitlines()
    prod_block = next(i for i, line in enumerate(lines) if " for prod " in line)
    end = next(i for i in range(prod_block, len(lines)) if lines[i].split()[1] == "end")
    kept = lines[:prod_block] + lines[end + 1 :]
    renumbered = []
    for number, line in enumerate(kept, start=1):
        body = " ".join(line.split()[1:-1]).replace("key blocks: 2", "key blocks: 1")
        renumbered.append(f"{number:02d}  {body}  {line_check(number, body)}")
    with pytest.raises(BackupError, match="root key 'offline-root' has no prod half"):
        parse_backup("\n".join(renumbered))


def test_missing_archive_is_a_clear_error(tmp_path: Path) -> None:
    done = _tufa_in_process("keys", "copy-targets", tmp_path / "absent.tgz", tmp_path / "x.tgz")
    _assert_refused(done, "cannot read archive", "absent.tgz", folder=tmp_path, before=set())


# --- backup and restore ------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_backup_and_restore_round_trip(key_type: KeyType, tmp_path: Path) -> None:
    source = _archive(root_types=(key_type, key_type), targets_types=(KeyType.ED25519,))
    src = _save(source, tmp_path / "keys.tgz")
    text_file = tmp_path / "root-backup.txt"
    restored_file = tmp_path / "restored.tgz"

    with _umask(0):
        backed_up = _tufa("keys", "backup", src, "--out", text_file)
        restored = _tufa("keys", "restore", text_file, "--out", restored_file)

    assert backed_up.returncode == 0, backed_up.stderr
    assert restored.returncode == 0, restored.stderr
    assert "print" in backed_up.stdout.lower()
    assert "safes at different places" in backed_up.stdout
    assert "delete" in backed_up.stdout
    assert _mode(text_file) == 0o600
    assert _mode(restored_file) == 0o600
    text = text_file.read_text()
    assert re.match(rf"0*1  {FORMAT_TITLE}", text), text[:80]
    for key in source.keys_for("targets"):
        assert key.keyid not in text  # only root keys are backed up

    archive = OfflineArchive.load(restored_file)
    assert archive.factory == FACTORY
    assert archive.roots == {}
    assert archive.keys_for("targets") == []
    originals = _pairs(source, "root")
    assert _pairs(archive, "root") == originals
    assert {f"{FIRST_ROOT_KEY_NAME}.ci", f"{FIRST_ROOT_KEY_NAME}.prod"} <= {
        name for name, _ in originals.values()
    }
    for keyid, (_, pair) in _pairs(archive, "root").items():
        # Byte for byte: the .sec file is the same as the one that was backed up.
        assert pair.private_pem == originals[keyid][1].private_pem
        assert pair.public == originals[keyid][1].public
    for keyid in originals:
        assert keyid in backed_up.stdout
        assert keyid in restored.stdout
    assert set(os.listdir(tmp_path)) == {"keys.tgz", "root-backup.txt", "restored.tgz"}


def test_backup_of_mixed_key_types_restores_every_root_key() -> None:
    source = _archive(root_types=(KeyType.ED25519, KeyType.ECDSA, KeyType.RSA))
    text = render_backup(source)
    restored = parse_backup(text)
    assert restored.keys == source.keys_for("root")
    assert "key blocks: 6" in text


def test_backup_lines_are_numbered_and_checked(tmp_path: Path) -> None:
    text = render_backup(_archive(root_types=(KeyType.RSA,)))
    lines = text.splitlines()
    assert len(lines) > 40
    for number, line in enumerate(lines, start=1):
        match = re.fullmatch(r"(\d{2,})  (.+?)\s+([0-9a-f]{6})", line)
        assert match, line
        assert int(match[1]) == number
        assert match[3] == line_check(number, " ".join(match[2].split()))
    assert lines[1].split()[1:3] == ["factory:", FACTORY]
    assert lines[5].split()[1:3] == ["key", "root"]
    assert "-----BEGIN PRIVATE KEY-----" in lines[6]


def test_backup_tolerates_retyping_differences() -> None:
    source = _archive(root_types=(KeyType.ECDSA,))
    text = render_backup(source)
    retyped = "\n\n".join(
        "   ".join(line.split()[:-1]) + "\t" + line.split()[-1].upper() + "  "
        for line in text.splitlines()
    )
    assert parse_backup(retyped.replace("\n", "\r\n")).keys == source.keys_for("root")


def test_restore_reads_a_file_typed_on_windows(tmp_path: Path) -> None:
    source = _archive(root_types=(KeyType.ED25519,))
    typed = tmp_path / "typed.txt"
    typed.write_bytes(b"\xef\xbb\xbf" + render_backup(source).replace("\n", "\r\n").encode())
    out = tmp_path / "restored.tgz"
    with _umask(0):
        done = _tufa_in_process("keys", "restore", typed, "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (key,) = source.keys_for("root")
    assert report["root_keys"] == [
        {"ci": key.ci.keyid, "prod": key.prod.keyid, "name": FIRST_ROOT_KEY_NAME}
    ]
    assert _mode(out) == 0o600
    assert _pairs(OfflineArchive.load(out), "root") == _pairs(source, "root")


def _pem_lines(text: str) -> list[tuple[int, str]]:
    """(line index, line) of the base64 lines of the backup."""
    return [(i, line) for i, line in enumerate(text.splitlines()) if PEM_LINE.match(line)]


def _restore_refused(tmp_path: Path, text: str, *fragments: str) -> str:
    """Run `tufa keys restore` on `text`: it must fail, name the problem, write nothing."""
    typed = tmp_path / "typed.txt"
    typed.write_text(text)
    before = set(os.listdir(tmp_path))
    done = _tufa("keys", "restore", typed, "--out", tmp_path / "restored.tgz")
    _assert_refused(done, *fragments, "Nothing was written", folder=tmp_path, before=before)
    return done.stderr


def test_a_mistyped_character_is_pinpointed_and_nothing_is_written(tmp_path: Path) -> None:
    source = _archive(root_types=(KeyType.ED25519, KeyType.RSA))
    rsa_keyid = source.keys_for("root")[1].ci.keyid
    text = render_backup(source)
    lines = text.splitlines()
    # The third base64 line of the RSA key's CI half (each half of the ed25519 key has one).
    index, line = _pem_lines(text)[4]
    number = int(line[:2])
    column = line.index("  ") + 2 + 10
    wrong = "A" if line[column] != "A" else "B"
    lines[index] = line[:column] + wrong + line[column + 1 :]

    stderr = _restore_refused(
        tmp_path,
        "\n".join(lines),
        f"line {number} (key {rsa_keyid[:8]}…, PEM line 4): checksum does not match: "
        "check for a typo",
    )
    assert stderr.count("checksum does not match") == 1, stderr


def test_a_look_alike_character_gets_a_suggestion() -> None:
    text = render_backup(_archive(root_types=(KeyType.RSA,)))
    lines = text.splitlines()
    for index, line in _pem_lines(text):  # noqa: B007 (used after the loop)
        content = line.split()[1]
        column = next((i for i, c in enumerate(content) if c in "0O"), None)
        if column is not None:
            break
    else:  # pragma: no cover - a 3072-bit key always has a 0 or an O
        pytest.fail("no 0 or O in the key")
    wrong = "O" if content[column] == "0" else "0"
    lines[index] = line.replace(content, content[:column] + wrong + content[column + 1 :])
    with pytest.raises(BackupError) as caught:
        parse_backup("\n".join(lines))
    assert f"character {column + 1} is {wrong!r}: should it be {content[column]!r}?" in str(
        caught.value
    )


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    text = render_backup(_archive(root_types=(KeyType.ECDSA,)))
    lines = text.splitlines()
    (a, line_a), (b, line_b) = _pem_lines(text)[:2]
    swapped = list(lines)
    swapped[a], swapped[b] = line_b, line_a
    _restore_refused(tmp_path, "\n".join(swapped), f"line {a + 1} comes after line {b + 1}")

    # Texts swapped under the right numbers: both checks fail.
    crossed = list(lines)
    crossed[a] = line_a[:4] + line_b[4:]
    crossed[b] = line_b[:4] + line_a[4:]
    with pytest.raises(BackupError) as caught:
        parse_backup("\n".join(crossed))
    assert caught.value.problems == [
        f"line {a + 1} (key {_pair(KeyType.ECDSA).keyid[:8]}…, PEM line 2): checksum does "
        "not match: check for a typo",
        f"line {b + 1} (key {_pair(KeyType.ECDSA).keyid[:8]}…, PEM line 3): checksum does "
        "not match: check for a typo",
    ]


def test_missing_lines_are_detected(tmp_path: Path) -> None:
    source = _archive(root_types=(KeyType.ED25519, KeyType.ECDSA))
    text = render_backup(source)
    lines = text.splitlines()
    index, _ = _pem_lines(text)[1]
    _restore_refused(
        tmp_path, "\n".join(lines[:index] + lines[index + 1 :]), f"line {index + 1} is missing"
    )

    # The whole last key left out: the header says how many keys there are.
    second_key_line = [i for i, line in enumerate(lines) if line.split()[1] == "key"][1]
    with pytest.raises(BackupError, match="holds 4 key block"):
        parse_backup("\n".join(lines[:second_key_line]))
    # The end of a key left out.
    with pytest.raises(BackupError, match="has no 'end' line"):
        parse_backup("\n".join(lines[: second_key_line + 3]))


def test_a_mistyped_line_number_is_named() -> None:
    text = render_backup(_archive())
    lines = text.splitlines()
    lines[6] = "70" + lines[6][2:]
    with pytest.raises(BackupError) as caught:
        parse_backup("\n".join(lines))
    assert caught.value.problems == [
        f"line 7 (key {_pair(KeyType.ED25519).keyid[:8]}…, PEM line 1): the line number is "
        "typed as 70; it should be 7"
    ]


def test_a_consistently_altered_key_id_is_refused() -> None:
    """Even with every check recomputed, the PEM lines must rebuild the recorded key."""
    text = render_backup(_archive())
    lines = text.splitlines()
    other = _pair(KeyType.ED25519, 1).keyid
    number, *words, _ = lines[5].split()
    words[2] = other
    body = " ".join(words)
    lines[5] = f"{number}  {body}  {line_check(int(number), body)}"
    with pytest.raises(BackupError, match=f"not the recorded {other}"):
        parse_backup("\n".join(lines))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("hello\n", "expected 'NUMBER  TEXT  CHECK'"),
        (f"01  not a backup  {line_check(1, 'not a backup')}\n", "not a tufa root keys backup"),
    ],
)
def test_text_that_is_not_a_backup_is_refused(text: str, message: str) -> None:
    with pytest.raises(BackupError, match=re.escape(message)):
        parse_backup(text)


def test_backup_of_a_targets_only_archive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no root private key"):
        render_backup(_archive(root_types=()))
    src = _save(_archive(root_types=()), tmp_path / "targets-only.tgz")
    before = set(os.listdir(tmp_path))
    done = _tufa_in_process("keys", "backup", src, "--out", tmp_path / "backup.txt")
    _assert_refused(
        done, "holds no root private key", "targets-only", folder=tmp_path, before=before
    )


def test_backup_and_restore_never_overwrite(tmp_path: Path) -> None:
    src = _save(_archive(), tmp_path / "keys.tgz")
    text_file = tmp_path / "backup.txt"
    text_file.write_text("precious")
    existing = tmp_path / "existing.tgz"
    existing.write_bytes(b"precious")
    typed = tmp_path / "typed.txt"
    typed.write_text(render_backup(_archive()))
    before = set(os.listdir(tmp_path))

    done = _tufa("keys", "backup", src, "--out", text_file)
    _assert_refused(done, "already exists", folder=tmp_path, before=before)
    done = _tufa("keys", "restore", typed, "--out", existing)
    _assert_refused(done, "already exists", folder=tmp_path, before=before)
    assert text_file.read_text() == "precious"
    assert existing.read_bytes() == b"precious"


def test_restore_refuses_a_file_that_is_not_text(tmp_path: Path) -> None:
    binary = _save(_archive(), tmp_path / "keys.tgz")
    before = set(os.listdir(tmp_path))
    done = _tufa_in_process("keys", "restore", binary, "--out", tmp_path / "restored.tgz")
    _assert_refused(done, "not a text backup", folder=tmp_path, before=before)


def test_help_shows_examples() -> None:
    done = _tufa_in_process("keys", "--help")
    assert done.returncode == 0
    for name in ("copy-targets", "backup", "restore"):
        assert name in done.stdout
    for command in (copy_targets, backup, restore):
        assert command.help is not None
        assert "\b\n    Example:\n      tufa keys " in command.help, command.name
        assert not command.get_short_help_str(limit=60).endswith("..."), command.name
