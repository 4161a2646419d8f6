"""The CLI's side of a root update: open, fetch, edit, sign, apply; and its status.

The same class reads an update from the server or from an exported file, so an
air-gapped machine signs with exactly the code an online one uses. Every edit is checked
locally with the rules the server enforces before anything is uploaded. The commands
that drive it are `updates` (step by step), `rotate` (start to finish) and
`offline` (`sign-file`); this module is the only one that knows the API's paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import click
from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata, Root, Targets

from tufa.cli.client import Api
from tufa.cli.output import console
from tufa.core import api_paths
from tufa.core.archive import ArchiveKey, OfflineArchive
from tufa.core.clock import iso
from tufa.core.files import write_private_file
from tufa.core.metadata import ROOT, TARGETS, Channel
from tufa.core.root_update import (
    RootSigningCount,
    RootUpdateError,
    SigningCount,
    StagedRoots,
    pairs_from_json,
    pairs_to_json,
    prod_targets_signing_status,
    root_signing_status,
)

EXPORT_FORMAT = "tufa-root-update/1"


class SignaturePayload(TypedDict):
    """The body `POST .../signatures` takes: signatures (as JSON) of each channel's staged
    root and of each re-signed production targets view."""

    roots: dict[Channel, list[dict[str, Any]]]
    prod_targets: dict[str, list[dict[str, Any]]]


class RootStatus(RootSigningCount):
    complete: bool


class TargetsStatus(SigningCount):
    """Re-signed production targets, counting the online signature apply adds."""

    complete: bool


class UpdateStatus(TypedDict):
    roots: dict[Channel, RootStatus]
    prod_targets: dict[str, TargetsStatus]


@dataclass
class RootUpdate:
    """An open root update as the server (or an export file) describes it."""

    data: dict[str, Any]

    # -- loading and saving ----------------------------------------------------------

    @classmethod
    def fetch(cls, api: Api) -> RootUpdate:
        return cls(api.get_json(api.path(api_paths.ROOT_UPDATE)))

    @classmethod
    def fetch_open(cls, api: Api) -> RootUpdate | None:
        response = api.request("GET", api.path(api_paths.ROOT_UPDATE), ok=(200, 404))
        return cls(response.json()) if response.status_code == 200 else None

    @classmethod
    def open(cls, api: Api, message: str) -> RootUpdate:
        """Open a new update (the server refuses a second one)."""
        path = api.path(api_paths.ROOT_UPDATE)
        return cls(api.request("POST", path, json_body={"message": message}).json())

    @classmethod
    def upload_signatures(cls, api: Api, payload: SignaturePayload) -> RootUpdate:
        """Add signatures on the server; the update as it stands after them."""
        path = api.path(api_paths.ROOT_UPDATE_SIGNATURES)
        return cls(api.request("POST", path, json_body=payload).json())

    @classmethod
    def from_file(cls, path: Path) -> RootUpdate:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise click.ClickException(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise click.ClickException(f"{path} is not a root update exported by tufa")
        return cls(data)

    def save(self, path: Path, factory: str) -> None:
        data = {**self.data, "format": EXPORT_FORMAT, "factory": factory}
        write_private_file(path, (json.dumps(data, indent=2) + "\n").encode())

    @property
    def factory(self) -> str | None:
        value = self.data.get("factory")
        return value if isinstance(value, str) else None

    # -- views -----------------------------------------------------------------------

    def current(self, channel: Channel) -> Metadata[Root]:
        return Metadata[Root].from_dict(json.loads(json.dumps(self.data["current"][channel])))

    def staged(self, channel: Channel) -> Metadata[Root]:
        return Metadata[Root].from_dict(json.loads(json.dumps(self.data["staged"][channel])))

    def staged_targets(self) -> dict[str, Metadata[Targets]]:
        return {
            view: Metadata[Targets].from_dict(json.loads(json.dumps(md)))
            for view, md in self.data["prod_targets"].items()
        }

    def online_keyids_after(self) -> dict[Channel, dict[str, str]]:
        return {
            channel: {
                **self.data["online_keys"][channel],
                **self.data["pending_online_keys"][channel],
            }
            for channel in Channel
        }

    def staged_roots(self) -> StagedRoots:
        """Both staged roots and the staged root key pairs, to edit as one."""
        return StagedRoots(
            {channel: self.staged(channel).signed for channel in Channel},
            pairs_from_json(self.data["root_key_pairs"]["staged"]),
        )

    # -- editing ---------------------------------------------------------------------

    def _check(self, staged: StagedRoots, refusal: str) -> None:
        """The server's rules, checked here: neither an upload nor a signature of ours
        goes to roots that break them (whoever staged them: a server, an export file)."""
        try:
            staged.check(
                {c: self.current(c).signed for c in Channel},
                self.online_keyids_after(),
                datetime.now(UTC),
            )
        except RootUpdateError as e:
            raise click.ClickException(f"{refusal}: {e}") from e

    def edit(
        self,
        api: Api,
        change: Callable[[StagedRoots], None],
        *,
        resign_prod_targets: bool = False,
    ) -> RootUpdate:
        """Apply `change` to the staged roots, check them, upload; return the new state."""
        staged = self.staged_roots()
        change(staged)
        self._check(staged, "refused before upload")
        prod_targets = {view: md.signed.to_dict() for view, md in self.staged_targets().items()}
        if resign_prod_targets:
            prod_targets = self._resigned_prod_targets()
        body = {
            "roots": {c: root.to_dict() for c, root in staged.roots.items()},
            "root_key_pairs": pairs_to_json(staged.pairs),
            "prod_targets": prod_targets,
        }
        return RootUpdate(
            api.request("PUT", api.path(api_paths.ROOT_UPDATE_STAGED), json_body=body).json()
        )

    def _resigned_prod_targets(self) -> dict[str, Any]:
        """Every current production targets view, unchanged but for the next version:
        the offline targets keys of the new root must sign them again."""
        resigned = {}
        for view, data in self.data["current_prod_targets"].items():
            signed = dict(data["signed"])
            signed["version"] = self.data["next_prod_targets_versions"][view]
            resigned[view] = signed
        return resigned

    # -- signing and review ----------------------------------------------------------

    def sign_with(self, archive: OfflineArchive) -> SignaturePayload:
        """Signatures by every key of `archive` that may sign a staged root or the
        re-signed production targets; the payload `POST .../signatures` takes.

        Refuses to sign staged roots that break a rule, or that pair the archive's own
        root keys' halves otherwise than the archive does."""
        staged_roots = self.staged_roots()
        self._check(staged_roots, "refusing to sign")
        for key in archive.keys_for(ROOT):
            paired = staged_roots.pairs.get(key.ci.keyid)
            if paired is not None and paired != key.prod.keyid:
                raise click.ClickException(
                    f"refusing to sign: the staged roots pair root key {key.ci.keyid} with "
                    f"{paired}, but its production half is {key.prod.keyid}"
                )
        roots: dict[Channel, list[dict[str, Any]]] = {}
        for channel in Channel:
            staged = self.staged(channel)
            allowed = set(self.current(channel).signed.roles[ROOT].keyids) | set(
                staged.signed.roles[ROOT].keyids
            )
            roots[channel] = [
                pair.signer().sign(staged.signed_bytes).to_dict()
                for pair in archive.signers_for(channel, ROOT, allowed)
            ]
        prod_targets_keys = set(self.staged(Channel.PROD).signed.roles[TARGETS].keyids)
        targets: dict[str, list[dict[str, Any]]] = {}
        for view, md in self.staged_targets().items():
            targets[view] = [
                pair.signer().sign(md.signed_bytes).to_dict()
                for pair in archive.signers_for(Channel.PROD, TARGETS, prod_targets_keys)
            ]
        return {"roots": roots, "prod_targets": targets}

    def add_signatures(self, payload: SignaturePayload) -> None:
        """Put signatures into this (exported) update, for `sign-file`."""
        for channel, signatures in payload["roots"].items():
            for sig in signatures:
                self.data["staged"][channel]["signatures"].append(sig)
        for view, signatures in payload["prod_targets"].items():
            self.data["prod_targets"][view]["signatures"].extend(signatures)
        for channel in Channel:
            self.data["staged"][channel]["signatures"] = _unique(
                self.data["staged"][channel]["signatures"]
            )
        for view in payload["prod_targets"]:
            md = self.data["prod_targets"][view]
            md["signatures"] = _unique(md["signatures"])

    def all_signatures(self) -> SignaturePayload:
        return {
            "roots": {c: self.data["staged"][c]["signatures"] for c in Channel},
            "prod_targets": {v: md["signatures"] for v, md in self.data["prod_targets"].items()},
        }

    def status(self) -> UpdateStatus:
        """Who has signed and who must still sign, computed here with python-tuf."""
        roots: dict[Channel, RootStatus] = {}
        for channel in Channel:
            verified, detail = root_signing_status(
                self.current(channel).signed, self.staged(channel)
            )
            roots[channel] = {
                "complete": verified,
                "old_root": detail["old_root"],
                "new_root": detail["new_root"],
            }
        online_targets = self.online_keyids_after()[Channel.PROD][TARGETS]
        prod_root = self.staged(Channel.PROD).signed
        prod_targets: dict[str, TargetsStatus] = {}
        for view, md in self.staged_targets().items():
            complete, count = prod_targets_signing_status(prod_root, md, online_targets)
            prod_targets[view] = {
                "complete": complete,
                "threshold": count["threshold"],
                "signed": count["signed"],
                "missing": count["missing"],
                "can_sign": count["can_sign"],
            }
        return {"roots": roots, "prod_targets": prod_targets}

    def ready(self) -> bool:
        """Signed enough to apply: both roots and every re-signed production targets."""
        status = self.status()
        return all(entry["complete"] for entry in status["roots"].values()) and all(
            entry["complete"] for entry in status["prod_targets"].values()
        )


def _unique(signatures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {Signature.from_dict(dict(s)).keyid: s for s in signatures}
    return list(by_key.values())


def apply_update(api: Api) -> dict[str, Any]:
    """Have the server check every rule and switch both channels' roots at once."""
    result: dict[str, Any] = api.request("POST", api.path(api_paths.ROOT_UPDATE_APPLY)).json()
    return result


def cancel_update(api: Api) -> dict[str, Any]:
    """Drop the open update; the server's answer."""
    result: dict[str, Any] = api.request("DELETE", api.path(api_paths.ROOT_UPDATE)).json()
    return result


def stage_new_online_keys(api: Api, roles: list[str], channels: list[Channel]) -> None:
    """Have the server generate new online keys of `roles` and stage them."""
    api.request(
        "POST",
        api.path(api_paths.ROOT_UPDATE_ONLINE_KEYS),
        json_body={"roles": roles, "channels": channels},
    )


# -- staged key changes, shared by `updates` and `rotate` -----------------------------------


def add_offline_key_to(staged: StagedRoots, key: ArchiveKey) -> None:
    if key.role == ROOT:
        staged.add_root_key(key.ci.public, key.prod.public)
    else:
        staged.add_targets_key(key.prod.public)


def remove_offline_key_from(staged: StagedRoots, role: str, keyid: str) -> None:
    if role == ROOT:
        staged.remove_root_key(keyid)
    else:
        staged.remove_targets_key(keyid)


def replace_offline_keys(staged: StagedRoots, role: str, old: list[str], new: ArchiveKey) -> None:
    add_offline_key_to(staged, new)
    for keyid in old:
        remove_offline_key_from(staged, role, keyid)


def signature_count(payload: SignaturePayload) -> int:
    return sum(len(s) for s in payload["roots"].values()) + sum(
        len(s) for s in payload["prod_targets"].values()
    )


def staged_changes(update: RootUpdate, channel: Channel) -> list[str]:
    """What the staged root of `channel` changes against the current one, a line each."""
    old, new = update.current(channel).signed, update.staged(channel).signed
    lines = [f"version {old.version} -> {new.version}"]
    if old.expires != new.expires:
        lines.append(f"expires {iso(old.expires)} -> {iso(new.expires)}")
    for role in new.roles:
        before, after = set(old.roles[role].keyids), set(new.roles[role].keyids)
        lines += [f"{role}: + key {k} ({new.keys[k].keytype})" for k in sorted(after - before)]
        lines += [f"{role}: - key {k}" for k in sorted(before - after)]
        if old.roles[role].threshold != new.roles[role].threshold:
            lines.append(
                f"{role}: threshold {old.roles[role].threshold} -> {new.roles[role].threshold}"
            )
    return lines


def update_json(update: RootUpdate, channels: list[Channel] | None = None) -> dict[str, Any]:
    """The update as every `--json` of a root update command prints it (`review`'s shape):
    its message, each channel's staged changes and signing status, the re-signed
    production targets' status, and whether it is signed enough to apply."""
    status = update.status()
    return {
        "message": update.data["message"],
        "channels": {
            c: {"status": status["roots"][c], "changes": staged_changes(update, c)}
            for c in channels or list(Channel)
        },
        "prod_targets": status["prod_targets"],
        "ready": update.ready(),
    }


def print_status(update: RootUpdate, *, prod_only: bool = False, stderr: bool = False) -> None:
    """Who has signed what, and who still can, for people (`review --json` for scripts)."""
    out = console(stderr=stderr)
    status = update.status()
    for channel in Channel:
        if prod_only and channel is not Channel.PROD:
            continue
        entry = status["roots"][channel]
        version = update.staged(channel).signed.version
        out.print(f"[bold]{channel} root v{version}[/bold]: {_mark(entry['complete'])}")
        for part, label in (
            (entry["old_root"], "current root keys"),
            (entry["new_root"], "new root keys"),
        ):
            signed = ", ".join(k[:12] for k in part["signed"]) or "none"
            out.print(
                f"  {label}: signed by {signed}; {part['missing']} more needed "
                f"(threshold {part['threshold']})"
            )
            if part["missing"]:
                waiting = ", ".join(k[:12] for k in part["can_sign"])
                out.print(f"    can still sign: {waiting}")
    for view, targets in status["prod_targets"].items():
        label = view or "default"
        signed = ", ".join(k[:12] for k in targets["signed"]) or "none"
        out.print(
            f"[bold]re-signed production targets ({label})[/bold]: "
            f"{_mark(targets['complete'])}; offline signatures by {signed}, "
            f"{targets['missing']} more needed (online signature added on apply)"
        )


def _mark(complete: bool) -> str:
    return "[green]ready[/green]" if complete else "[yellow]needs signatures[/yellow]"
