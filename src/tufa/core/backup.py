"""A printable text backup of an archive's root private keys, and reading it back.

The root private key is the one secret that nothing can replace, so the owner keeps it
on paper too: a fire that takes the disks leaves the safe. Paper only helps if a person
can type it back in, and a person makes typos, so every line carries its own number and
a short checksum::

    01  tufa root keys backup, format 2                                   3f1c2a
    02  factory: acme                                                     9b0e44
    03  created: 2026-12-01T10:00:00Z                                     1d2e3f
    04  key blocks: 2                                                     40a1b2
    ...
    06  key root 4bfa5b...c93b1 ed25519 ed25519 for ci as offline-root    51d0e7
    07  -----BEGIN PRIVATE KEY-----                                       0a4c19
    08  MC4CAQAwBQYDK2VwBCIEIJ3v...                                       c2d8f0
    09  -----END PRIVATE KEY-----                                         6e7a12
    10  end                                                               77b301
    11  key root 9d01e2...44a0f ed25519 ed25519 for prod as offline-root  8c2d10
    ...

(Key ids and checks are made up here; a backup prints the key ids in full.) A root key
is a pair of keys, one per channel (ADR 0009): each half is a block of its own, and the
two blocks share the key's name. Backups in format 1 (before the channels were
separated) hold root keys both channels share; they are still read.

The numbered, checked lines are tufa.core.backup_lines; this module gives them their
meaning. The key id on the `key` line is checked against the key that the PEM lines
rebuild, which catches anything the per-line checks could miss.

Only root keys are written: targets keys can be replaced with the root key, and the
roles are public and fetched from the server when needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from tufa.core.api_paths import FACTORY_NAME
from tufa.core.archive import FIRST_ROOT_KEY_NAME, ArchiveKey, OfflineArchive
from tufa.core.backup_lines import BackupError, normalise, number_lines, read_lines, short_keyid
from tufa.core.keys import KeyPair
from tufa.core.metadata import ROOT, Channel

# BackupError is raised here too: callers catch it from this module.
__all__ = [
    "FORMAT_1_TITLE",
    "FORMAT_TITLE",
    "MAX_BACKUP_CHARS",
    "BackupError",
    "parse_backup",
    "render_backup",
]

FORMAT_TITLE = "tufa root keys backup, format 2"
# Format 1 backups hold keys both channels share, without a `for CHANNEL` part.
FORMAT_1_TITLE = "tufa root keys backup, format 1"
# Which channel a block's key signs for; "both" is a key both channels share.
BOTH = "both"
_FOR = (*(c.value for c in Channel), BOTH)
INSTRUCTIONS = "type back every line: number, text, check; see tufa keys restore"
# A backup of a few RSA keys is a few KiB; anything much larger is not one.
MAX_BACKUP_CHARS = 1024 * 1024
_HEADER_LINES = 5
_KEYID = re.compile(r"[0-9a-f]{64}")
# Key names end up as `keys/<name>.sec` in the archive, which reads a key back as a
# root key only under these names; anything else could be a path.
_KEY_NAME = re.compile(rf"{FIRST_ROOT_KEY_NAME}|root-[A-Za-z0-9._-]{{1,128}}")


def _default_name(keyid: str) -> str:
    return f"{ROOT}-{keyid}"


# -- writing -------------------------------------------------------------------------


def render_backup(
    archive: OfflineArchive, now: datetime | None = None, *, include_retired: bool = False
) -> str:
    """The printable backup of the root keys of `archive`, both halves of each; retired
    ones only with `include_retired`.

    Raises ValueError if the archive holds no root key (a targets-only copy): a backup
    without one would look reassuring and restore nothing useful. The text is parsed
    back before it is returned, so a backup that could not be restored is never handed
    out.
    """
    root_keys = archive.keys_for(ROOT, include_retired=include_retired)
    if not root_keys:
        raise ValueError(
            f"the archive of factory {archive.factory!r} holds no root private key "
            "(is it a targets-only copy?); back up the archive that holds the root keys"
            if not archive.keys_for(ROOT)
            else f"every root key of the archive of factory {archive.factory!r} is retired; "
            "back up the archive the newest rotation wrote, or pass --include-retired"
        )
    created = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    blocks = [
        (key, BOTH if channel is None else channel.value, pair)
        for key in root_keys
        for channel, pair in key.halves()
    ]
    texts = [
        FORMAT_TITLE,
        f"factory: {archive.factory}",
        f"created: {created}",
        f"key blocks: {len(blocks)}",
        INSTRUCTIONS,
    ]
    for key, half, pair in blocks:
        public = pair.public
        # Odd names (from archives written by other tools) cannot be carried safely;
        # the key itself is what matters, so fall back to the standard name.
        name = key.name if _KEY_NAME.fullmatch(key.name) else _default_name(key.keyid)
        texts.append(
            f"key {ROOT} {public.keyid} {public.keytype} {public.scheme} for {half} as {name}"
        )
        try:
            pem = pair.private_pem.decode("ascii")
        except UnicodeDecodeError as e:
            raise ValueError(f"root key {public.keyid} is not an ASCII PEM file") from e
        texts.extend(normalise(t) for t in pem.splitlines() if t.strip())
        texts.append("end")
    text = number_lines(texts)
    restored = parse_backup(text)
    if restored.keyids() != sorted(k for key in root_keys for k in key.keyids):
        raise ValueError("the backup does not restore the archive's root keys")  # pragma: no cover
    return text


# -- reading -------------------------------------------------------------------------


@dataclass
class _Block:
    first_line: int
    keyid: str
    keytype: str
    scheme: str
    name: str
    half: str
    pem: list[str] = field(default_factory=list)
    last_line: int = 0


def parse_backup(text: str) -> OfflineArchive:
    """Rebuild an archive holding the root keys of a text backup.

    The archive has the factory name and the root keys (under the names they had, each
    with both halves), and no roles: those are public and fetched from the server when
    needed. Raises BackupError naming every mistyped, missing or misplaced line, so the
    owner can fix them all in one pass, and nothing is returned unless each key rebuilds
    to exactly the key id that was recorded.
    """
    if len(text) > MAX_BACKUP_CHARS:
        raise BackupError([f"the file is larger than {MAX_BACKUP_CHARS} characters: not a backup"])
    lines = read_lines(text)
    if lines.problems:
        raise BackupError(lines.problems)
    if not lines.texts:
        raise BackupError(["the file is empty: not a tufa root keys backup"])
    numbered = list(zip(lines.numbers, lines.texts, strict=True))
    factory, count = _parse_header(numbered)
    blocks = _parse_blocks(numbered[_HEADER_LINES:], count)
    archive = OfflineArchive(factory=factory)
    problems: list[str] = []
    halves: dict[str, dict[str, tuple[_Block, KeyPair]]] = {}
    seen: set[str] = set()
    for block in blocks:
        try:
            pair = _rebuild_key(block)
        except BackupError as e:
            problems.extend(e.problems)
            continue
        found = halves.setdefault(block.name, {})
        if pair.keyid in seen:
            problems.append(f"line {block.first_line}: key {short_keyid(pair.keyid)} appears twice")
        elif block.half in found or (found and BOTH in (block.half, *found)):
            problems.append(
                f"line {block.first_line}: key name {block.name!r} appears twice"
                + ("" if block.half == BOTH else f" for {block.half}")
            )
        else:
            found[block.half] = (block, pair)
        seen.add(pair.keyid)
    for name, found in halves.items():
        if BOTH in found:
            archive.add(ArchiveKey.shared(ROOT, name, found[BOTH][1]))
            continue
        missing = [c.value for c in Channel if c.value not in found]
        if missing and found:
            first = min(block.first_line for block, _ in found.values())
            problems.append(
                f"line {first}: root key {name!r} has no {missing[0]} half: type in both "
                "blocks of the key"
            )
        elif found:
            archive.add(
                ArchiveKey(ROOT, name, found[Channel.CI.value][1], found[Channel.PROD.value][1])
            )
    if problems:
        raise BackupError(problems)
    return archive


def _parse_header(numbered: list[tuple[int, str]]) -> tuple[str, int]:
    """The factory name and the number of key blocks the backup says it holds."""
    title = numbered[0][1]
    if title not in (FORMAT_TITLE, FORMAT_1_TITLE):
        if title.startswith("tufa root keys backup"):
            raise BackupError([f"line 1: {title!r}: this tufa reads {FORMAT_TITLE!r}"])
        raise BackupError([f"line 1: not a tufa root keys backup (expected {FORMAT_TITLE!r})"])
    if len(numbered) < _HEADER_LINES:
        raise BackupError(["the header is incomplete: lines 1 to 5 must all be there"])
    factory_line, created_line, count_line = numbered[1][1], numbered[2][1], numbered[3][1]
    factory = factory_line.removeprefix("factory: ")
    if factory == factory_line or not FACTORY_NAME.fullmatch(factory):
        raise BackupError([f"line 2: expected 'factory: NAME', found {factory_line!r}"])
    if not created_line.startswith("created: "):
        raise BackupError([f"line 3: expected 'created: DATE', found {created_line!r}"])
    # Format 1 counted keys, format 2 counts blocks (two per root key): one per block.
    label = "root keys: " if title == FORMAT_1_TITLE else "key blocks: "
    count_text = count_line.removeprefix(label)
    if count_text == count_line or not count_text.isdigit() or int(count_text) < 1:
        raise BackupError([f"line 4: expected '{label}NUMBER', found {count_line!r}"])
    return factory, int(count_text)


def _parse_blocks(numbered: list[tuple[int, str]], count: int) -> list[_Block]:
    """The key blocks: a `key` line, the PEM lines, `end`; exactly `count` of them."""
    blocks: list[_Block] = []
    current: _Block | None = None
    for number, text in numbered:
        if current is None:
            if len(blocks) == count:
                raise BackupError(
                    [f"line {number}: text after the last of the {count} key block(s): {text!r}"]
                )
            current = _parse_key_line(number, text)
        elif text.startswith("key "):
            raise BackupError(
                [
                    f"line {number}: a new key starts, but key {short_keyid(current.keyid)} "
                    f"(line {current.first_line}) has no 'end' line"
                ]
            )
        elif text == "end":
            current.last_line = number
            blocks.append(current)
            current = None
        else:
            current.pem.append(text)
    if current is not None:
        raise BackupError(
            [
                f"key {short_keyid(current.keyid)} (line {current.first_line}) has no 'end' line: "
                "the end of the backup is missing"
            ]
        )
    if len(blocks) < count:
        raise BackupError(
            [
                f"line 4 says the backup holds {count} key block(s), but only {len(blocks)} "
                "are there: the end of the backup is missing"
            ]
        )
    return blocks


def _parse_key_line(number: int, text: str) -> _Block:
    """`key root <keyid> <keytype> <scheme> [for ci|prod|both] [as <name>]`."""
    parts = text.split()
    usage = "expected 'key root KEYID KEYTYPE SCHEME for CHANNEL as NAME'"
    if len(parts) < 5 or parts[0] != "key":
        raise BackupError([f"line {number}: {usage}, found {text!r}"])
    _, role, keyid, keytype, scheme = parts[:5]
    options = dict(zip(parts[5::2], parts[6::2], strict=False))
    if len(parts) % 2 == 0 or set(options) - {"for", "as"} or len(options) * 2 != len(parts) - 5:
        raise BackupError([f"line {number}: {usage}, found {text!r}"])
    if role != ROOT:
        raise BackupError([f"line {number}: only root keys are backed up, not {role!r} keys"])
    if not _KEYID.fullmatch(keyid):
        raise BackupError([f"line {number}: {keyid!r} is not a key id (64 characters 0-9/a-f)"])
    half = options.get("for", BOTH)
    if half not in _FOR:
        raise BackupError([f"line {number}: 'for {half}': the channel is ci, prod or both"])
    name = options.get("as", _default_name(keyid))
    if not _KEY_NAME.fullmatch(name):
        raise BackupError(
            [f"line {number}: {name!r} is not a root key name ({FIRST_ROOT_KEY_NAME} or root-...)"]
        )
    return _Block(number, keyid, keytype, scheme, name, half)


def _rebuild_key(block: _Block) -> KeyPair:
    """The key pair from the PEM lines, refused unless it is exactly the recorded key."""
    where = f"key {short_keyid(block.keyid)} (lines {block.first_line}-{block.last_line})"
    pem = ("\n".join(block.pem) + "\n").encode("ascii", errors="replace")
    try:
        private_key = load_pem_private_key(pem, password=None)
        public = SSlibKey.from_crypto(private_key.public_key(), scheme=block.scheme)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BackupError([f"{where}: the PEM lines do not make a private key: {e}"]) from e
    if public.keytype != block.keytype:
        raise BackupError(
            [f"{where}: the PEM lines hold a {public.keytype} key, not {block.keytype}"]
        )
    if public.keyid != block.keyid:
        raise BackupError(
            [
                f"{where}: the PEM lines rebuild key {public.keyid}, not the recorded "
                f"{block.keyid}: this backup was altered or mixes keys"
            ]
        )
    # A key that signs is the proof that the scheme fits the key, which the key id alone
    # does not give. The loaded key is reused: loading an RSA key costs ~0.2 s (cryptography
    # validates it), so `KeyPair.from_pem`, which would load it again, is not called here.
    try:
        signature = CryptoSigner(private_key, public).sign(b"tufa backup self-test")
        public.verify_signature(signature, b"tufa backup self-test")
    except Exception as e:  # any failure here means the key cannot sign: say so
        raise BackupError([f"{where}: the key cannot sign with scheme {block.scheme}: {e}"]) from e
    return KeyPair(public=public, private_pem=pem)
