"""The offline keys archive: the owner's private keys and current roots in one `.tgz`.

Layout (documented for owners in the README)::

    config.json                         {"format": 2, "factory": NAME, "retired_keys": [ID]}
    keys/offline-root.ci.pub|.sec       the first root key's CI half, made at factory creation
    keys/offline-root.prod.pub|.sec     its production half
    keys/root-<id>.ci.pub|.sec          the CI half of a root key the owner generated since
    keys/root-<id>.prod.pub|.sec        its production half (<id> is the CI half's key id)
    keys/targets-<keyid>.pub|.sec       offline targets keys (both channels' roots list them)
    roles/ci/root.json                  the current CI root
    roles/prod/root.json                the current production root

Each root key is a pair of halves, one per channel, so that the two channels' roots
share no root key and cannot stand in for each other (ADR 0009). Archives of factories
created before that hold root keys both channels share, without a `.ci`/`.prod` suffix
(`keys/offline-root.sec`, `keys/root-<keyid>.sec`); they are read as such.

`retired_keys` (optional) names the keys the roots stopped listing: each was listed by the
roots stored in the archive and is not by the served roots that replaced them. A key
the stored roots never listed (generated for an update not applied yet) is never marked.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tufa.core.files import write_private_file
from tufa.core.keys import KeyPair, KeyType, key_from_json, key_to_json
from tufa.core.metadata import ROOT, TARGETS, Channel

FORMAT_VERSION = 2
# Format 1: every key is shared by both channels (archives of tufa before ADR 0009).
READABLE_FORMATS = (1, 2)
FIRST_ROOT_KEY_NAME = "offline-root"
RETIRED_KEYS = "retired_keys"
MAX_ARCHIVE_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 1000


class ArchiveError(ValueError):
    """An archive that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class ArchiveKey:
    """A key the owner holds, with the private half that signs for each channel.

    An offline targets key is one key for both channels. A root key is a pair of
    separate keys, one per channel, which the owner handles as one; only root keys of
    factories created before the channels were separated are one key for both.
    """

    role: str
    name: str
    ci: KeyPair
    prod: KeyPair

    @classmethod
    def shared(cls, role: str, name: str, pair: KeyPair) -> ArchiveKey:
        return cls(role, name, pair, pair)

    def half(self, channel: Channel) -> KeyPair:
        """The key that signs `channel`'s metadata."""
        return self.ci if channel is Channel.CI else self.prod

    @property
    def is_shared(self) -> bool:
        return self.ci.keyid == self.prod.keyid

    @property
    def keyid(self) -> str:
        """The id the key is known by: its CI half's (the one its files are named after,
        but for the first root key, `offline-root`)."""
        return self.ci.keyid

    @property
    def keyids(self) -> list[str]:
        return [self.ci.keyid] if self.is_shared else [self.ci.keyid, self.prod.keyid]

    def label(self) -> str:
        """How the CLI names the key: its id, or both halves' ids."""
        if self.is_shared:
            return self.keyid
        return f"{self.ci.keyid} (ci) / {self.prod.keyid} (prod)"

    def halves(self) -> list[tuple[Channel | None, KeyPair]]:
        """Each private key held, with the channel it signs for (None: both)."""
        if self.is_shared:
            return [(None, self.ci)]
        return [(channel, self.half(channel)) for channel in Channel]

    def files(self) -> Iterator[tuple[str, KeyPair]]:
        """Archive entry stems (under keys/) and the key each holds."""
        for channel, pair in self.halves():
            yield (self.name if channel is None else f"{self.name}.{channel}"), pair


def generate_root_key(key_type: KeyType = KeyType.ED25519, name: str | None = None) -> ArchiveKey:
    """A new root key: one key per channel, generated together, stored together."""
    ci, prod = KeyPair.generate(key_type), KeyPair.generate(key_type)
    return ArchiveKey(ROOT, name or f"{ROOT}-{ci.keyid}", ci, prod)


@dataclass
class OfflineArchive:
    factory: str
    keys: list[ArchiveKey] = field(default_factory=list)
    roots: dict[Channel, bytes] = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)
    # Settings in config.json that this version of tufa does not know, kept as they are.
    config_extra: dict[str, Any] = field(default_factory=dict)
    # The ids (`ArchiveKey.keyid`) of keys the factory's roots no longer list.
    retired: set[str] = field(default_factory=set)

    def keys_for(self, role: str, *, include_retired: bool = True) -> list[ArchiveKey]:
        return [
            k
            for k in self.keys
            if k.role == role and (include_retired or k.keyid not in self.retired)
        ]

    def retired_keys(self, role: str) -> list[ArchiveKey]:
        return [k for k in self.keys_for(role) if k.keyid in self.retired]

    def replace_roots(self, roots: dict[Channel, bytes]) -> None:
        """Store `roots` (newer ones, from the server), marking retired each key the
        stored roots listed and these do not, and no longer retired each they list."""
        before, after = self._listed(self.roots), self._listed(roots)
        self.roots = dict(roots)
        self.retired = (self.retired | (before - after)) - after

    def _listed(self, roots: dict[Channel, bytes]) -> set[str]:
        """The ids of the held keys that `roots` list for their role (a root key: either
        half, in its channel's root). Roots that do not parse list nothing."""
        listed = set()
        for channel, data in roots.items():
            try:
                roles = json.loads(data)["signed"]["roles"]
                keyids = {role: set(roles[role]["keyids"]) for role in (ROOT, TARGETS)}
            except (ValueError, KeyError, TypeError):
                continue
            listed |= {k.keyid for k in self.keys if k.half(channel).keyid in keyids[k.role]}
        return listed

    def find(self, keyid: str) -> ArchiveKey | None:
        """The key of which `keyid` is one half."""
        return next((k for k in self.keys if keyid in k.keyids), None)

    def keyids(self) -> list[str]:
        """Every key id the archive holds a private key of, sorted."""
        return sorted(keyid for key in self.keys for keyid in key.keyids)

    def signers_for(self, channel: Channel, role: str, allowed: set[str]) -> list[KeyPair]:
        """The archive's keys of `role` that sign `channel`'s metadata and are in `allowed`."""
        return [k.half(channel) for k in self.keys_for(role) if k.half(channel).keyid in allowed]

    def add(self, key: ArchiveKey) -> ArchiveKey:
        """Add `key` unless the archive holds it already; return the archive's entry."""
        if key.role not in (ROOT, TARGETS):
            raise ValueError(f"the archive holds root and targets keys, not {key.role!r}")
        held = self.find(key.keyid)
        if held is None:
            self.keys.append(key)
            return key
        return held

    def add_key(self, role: str, pair: KeyPair, name: str | None = None) -> ArchiveKey:
        """Add a key both channels use (an offline targets key)."""
        return self.add(ArchiveKey.shared(role, name or f"{role}-{pair.keyid}", pair))

    # -- serialisation -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        files: dict[str, bytes] = dict(self.extra)
        config = {**self.config_extra, "format": FORMAT_VERSION, "factory": self.factory}
        retired = sorted(self.retired & {k.keyid for k in self.keys})
        if retired:
            config[RETIRED_KEYS] = retired
        files["config.json"] = json.dumps(config, indent=2).encode()
        for key in self.keys:
            for stem, pair in key.files():
                files[f"keys/{stem}.pub"] = key_to_json(pair.public)
                files[f"keys/{stem}.sec"] = pair.private_pem
        for channel, root in self.roots.items():
            files[f"roles/{channel}/root.json"] = root
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
        archive_format = config.get("format", 1)
        if type(archive_format) is not int or archive_format not in READABLE_FORMATS:
            raise ArchiveError(
                f"{source} has archive format {archive_format!r}; this tufa reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}: upgrade tufa"
            )
        retired = config.get(RETIRED_KEYS, [])
        if not isinstance(retired, list) or not all(isinstance(k, str) for k in retired):
            raise ArchiveError(f"{source}: config.json's {RETIRED_KEYS} is not a list of key ids")
        archive = cls(factory=factory, config_extra=_other_settings(config), retired=set(retired))
        for channel in Channel:
            root = files.pop(f"roles/{channel}/root.json", None)
            if root is not None:
                archive.roots[channel] = root
        halves: dict[str, dict[Channel, KeyPair]] = {}
        for name in sorted(files):
            path = PurePosixPath(name)
            if path.parent != PurePosixPath("keys") or path.suffix != ".sec":
                continue
            stem = path.stem
            base, half = _split_half(stem)
            role = _role_of_key_name(base)
            pub = files.get(f"keys/{stem}.pub")
            if role is None or pub is None:
                continue
            try:
                pair = KeyPair.from_pem(files[name], key_from_json(pub))
            except (ValueError, KeyError, TypeError) as e:
                raise ArchiveError(f"{source}: key {name} is unreadable: {e}") from e
            del files[name], files[f"keys/{stem}.pub"]
            if archive.find(pair.keyid) is not None or any(
                pair.keyid == p.keyid for found in halves.values() for p in found.values()
            ):
                raise ArchiveError(f"{source}: key {pair.keyid} is stored twice")
            if half is None:
                _check_named_id(source, name, base, pair.keyid)
                archive.keys.append(ArchiveKey.shared(role, base, pair))
            elif role != ROOT:
                raise ArchiveError(
                    f"{source}: {name} is a {role} key for one channel; only root keys have "
                    "a CI and a production half"
                )
            elif archive_format == 1:
                raise ArchiveError(
                    f"{source}: {name} is a root key half, which archives of format 1 (made "
                    "before the channels were separated) never hold"
                )
            else:
                halves.setdefault(base, {})[half] = pair
        for base, found in halves.items():
            missing = [c.value for c in Channel if c not in found]
            if missing:
                raise ArchiveError(
                    f"{source}: root key {base} has no {missing[0]} half (keys/{base}.{missing[0]}"
                    ".sec); both halves of a root key are needed, restore it from a backup"
                )
            _check_named_id(source, f"keys/{base}.ci.sec", base, found[Channel.CI].keyid)
            archive.keys.append(ArchiveKey(ROOT, base, found[Channel.CI], found[Channel.PROD]))
        archive.extra = files
        return archive


def _split_half(stem: str) -> tuple[str, Channel | None]:
    """`root-<id>.ci` -> (`root-<id>`, CI); a stem without a channel suffix is shared."""
    base, dot, suffix = stem.rpartition(".")
    if dot and suffix in {c.value for c in Channel}:
        return base, Channel(suffix)
    return stem, None


def _check_named_id(source: str, name: str, base: str, keyid: str) -> None:
    named_id = base.partition("-")[2]
    if base != FIRST_ROOT_KEY_NAME and named_id != keyid:
        raise ArchiveError(f"{source}: {name} holds key {keyid}, not {named_id}")


def _other_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("format", "factory", RETIRED_KEYS)}


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
