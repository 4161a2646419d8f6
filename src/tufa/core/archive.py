"""The offline keys archive: the owner's private keys and current roots in one `.tgz`.

Layout (documented for owners in the README)::

    config.json                    {"format": 1, "factory": NAME}
    keys/offline-root.pub|.sec     the first root key, generated at factory creation
    keys/root-<keyid>.pub|.sec     every root key the owner generated since
    keys/targets-<keyid>.pub|.sec  offline targets keys
    roles/ci/root.json             the current CI root
    roles/prod/root.json           the current production root

`.sec` files are PEM PKCS#8 private keys, `.pub` files the TUF public key as JSON.
Entries tufa does not know are carried over untouched on every rewrite. Reading never
trusts the archive: absolute paths, `..`, links, devices and oversized members are
refused before anything is used.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tufa.core.files import write_private_file
from tufa.core.keys import KeyPair, key_from_json, key_to_json
from tufa.core.metadata import ROOT, TARGETS, Channel

FORMAT_VERSION = 1
FIRST_ROOT_KEY_NAME = "offline-root"
MAX_ARCHIVE_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 1000


class ArchiveError(ValueError):
    """An archive that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class ArchiveKey:
    role: str
    name: str
    pair: KeyPair


@dataclass
class OfflineArchive:
    factory: str
    keys: list[ArchiveKey] = field(default_factory=list)
    roots: dict[Channel, bytes] = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)
    # Settings in config.json that this version of tufa does not know, kept as they are.
    config_extra: dict[str, Any] = field(default_factory=dict)

    def keys_for(self, role: str) -> list[ArchiveKey]:
        return [k for k in self.keys if k.role == role]

    def find(self, keyid: str) -> ArchiveKey | None:
        return next((k for k in self.keys if k.pair.keyid == keyid), None)

    def add_key(self, role: str, pair: KeyPair, name: str | None = None) -> ArchiveKey:
        if role not in (ROOT, TARGETS):
            raise ValueError(f"the archive holds root and targets keys, not {role!r}")
        if self.find(pair.keyid) is None:
            self.keys.append(ArchiveKey(role, name or f"{role}-{pair.keyid}", pair))
        return next(k for k in self.keys if k.pair.keyid == pair.keyid)

    # -- serialisation -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        files: dict[str, bytes] = dict(self.extra)
        files["config.json"] = json.dumps(
            {**self.config_extra, "format": FORMAT_VERSION, "factory": self.factory}, indent=2
        ).encode()
        for key in self.keys:
            files[f"keys/{key.name}.pub"] = key_to_json(key.pair.public)
            files[f"keys/{key.name}.sec"] = key.pair.private_pem
        for channel, root in self.roots.items():
            files[f"roles/{channel.value}/root.json"] = root
        buf = io.BytesIO()
        now = int(time.time())
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size = len(files[name])
                info.mode = 0o600
                info.mtime = now
                tar.addfile(info, io.BytesIO(files[name]))
        return buf.getvalue()

    def save(self, path: Path) -> None:
        write_private_file(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> OfflineArchive:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ArchiveError(f"cannot read archive {path}: {e.strerror}") from e
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "archive") -> OfflineArchive:
        files = _safe_members(data, source)
        try:
            config = json.loads(files.pop("config.json"))
            factory = config["factory"]
        except (KeyError, ValueError, TypeError) as e:
            raise ArchiveError(f"{source}: missing or invalid config.json") from e
        if not isinstance(factory, str):
            raise ArchiveError(f"{source}: config.json names no factory")
        archive = cls(factory=factory, config_extra=_other_settings(config))
        for channel in Channel:
            root = files.pop(f"roles/{channel.value}/root.json", None)
            if root is not None:
                archive.roots[channel] = root
        for name in sorted(files):
            path = PurePosixPath(name)
            if path.parent != PurePosixPath("keys") or path.suffix != ".sec":
                continue
            stem = path.stem
            role = _role_of_key_name(stem)
            pub = files.get(f"keys/{stem}.pub")
            if role is None or pub is None:
                continue
            try:
                pair = KeyPair.from_pem(files[name], key_from_json(pub))
            except (ValueError, KeyError, TypeError) as e:
                raise ArchiveError(f"{source}: key {name} is unreadable: {e}") from e
            named_id = stem.partition("-")[2]
            if stem != FIRST_ROOT_KEY_NAME and named_id != pair.keyid:
                raise ArchiveError(f"{source}: {name} holds key {pair.keyid}, not {named_id}")
            if archive.find(pair.keyid) is not None:
                raise ArchiveError(f"{source}: key {pair.keyid} is stored twice")
            archive.keys.append(ArchiveKey(role, stem, pair))
            del files[name], files[f"keys/{stem}.pub"]
        archive.extra = files
        return archive


def _other_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("format", "factory")}


def _role_of_key_name(stem: str) -> str | None:
    if stem == FIRST_ROOT_KEY_NAME:
        return ROOT
    role, sep, _ = stem.partition("-")
    return role if sep and role in (ROOT, TARGETS) else None


def _safe_members(data: bytes, source: str) -> dict[str, bytes]:
    """Every regular file of the tarball by name, refusing anything that could escape."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            raw = gz.read(MAX_ARCHIVE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{source} is not a gzip'd tar archive: {e}") from e
    if len(raw) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"{source} unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise ArchiveError(f"{source} has more than {MAX_MEMBERS} entries")
            for member in members:
                name = member.name
                path = PurePosixPath(name)
                if path.is_absolute() or ".." in path.parts or name.startswith("\\"):
                    raise ArchiveError(f"{source}: unsafe path {name!r} in archive")
                if member.isdir():
                    continue
                if not member.isfile() or member.issparse():
                    raise ArchiveError(
                        f"{source}: {name!r} is a link, a sparse or a special file; archives hold "
                        "plain files only"
                    )
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise ArchiveError(f"{source} unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
                clean = str(path)
                if clean in files:
                    raise ArchiveError(f"{source}: {name!r} appears twice")
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[clean] = extracted.read()
    except tarfile.TarError as e:
        raise ArchiveError(f"{source} is not a valid tar archive: {e}") from e
    if "config.json" not in files:
        raise ArchiveError(f"{source}: missing config.json; is this a tufa offline keys archive?")
    return files
