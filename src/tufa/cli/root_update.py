"""The CLI's side of a root update: fetch it, edit the staged roots, sign locally.

The same class reads an update from the server or from an exported file, so an
air-gapped machine signs with exactly the code an online one uses. Every edit is checked
locally with the rules the server enforces before anything is uploaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata, Root, Targets

from tufa.cli.client import Api
from tufa.core.archive import ArchiveError, OfflineArchive
from tufa.core.files import write_private_file
from tufa.core.metadata import ROOT, TARGETS, Channel
from tufa.core.root_update import (
    RootUpdateError,
    StagedRoots,
    pairs_from_json,
    pairs_to_json,
    prod_targets_signing_status,
    root_signing_status,
)

EXPORT_FORMAT = "tufa-root-update/1"
UPDATES_PATH = "/keys/updates"


def archive_option(
    *, required: bool = True, exists: bool = True, help: str = "Offline keys archive."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-k/--keys ARCHIVE, the same flag on every command that uses an archive."""
    return click.option(
        "-k",
        "--keys",
        "archive",
        required=required,
        type=click.Path(exists=exists, dir_okay=False, path_type=Path),
        help=help,
    )


def load_archive(path: Path, factory: str | None) -> OfflineArchive:
    try:
        archive = OfflineArchive.load(path)
    except ArchiveError as e:
        raise click.ClickException(str(e)) from e
    if factory is not None and archive.factory != factory:
        raise click.ClickException(
            f"{path} is the archive of factory {archive.factory!r}, not {factory!r}"
        )
    return archive


@dataclass
class RootUpdate:
    """An open root update as the server (or an export file) describes it."""

    data: dict[str, Any]

    # -- loading and saving ----------------------------------------------------------

    @classmethod
    def fetch(cls, api: Api) -> RootUpdate:
        return cls(api.get_json(api.factory_path(UPDATES_PATH)))

    @classmethod
    def fetch_open(cls, api: Api) -> RootUpdate | None:
        response = api.request("GET", api.factory_path(UPDATES_PATH), ok=(200, 404))
        return cls(response.json()) if response.status_code == 200 else None

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
                **self.data["online_keys"][channel.value],
                **self.data["pending_online_keys"][channel.value],
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
            "roots": {c.value: root.to_dict() for c, root in staged.roots.items()},
            "root_key_pairs": pairs_to_json(staged.pairs),
            "prod_targets": prod_targets,
        }
        return RootUpdate(
            api.request("PUT", api.factory_path(f"{UPDATES_PATH}/staged"), json_body=body).json()
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

    def sign_with(self, archive: OfflineArchive) -> dict[str, Any]:
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
        roots: dict[str, list[dict[str, Any]]] = {}
        for channel in Channel:
            staged = self.staged(channel)
            allowed = set(self.current(channel).signed.roles[ROOT].keyids) | set(
                staged.signed.roles[ROOT].keyids
            )
            roots[channel.value] = [
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

    def add_signatures(self, payload: dict[str, Any]) -> None:
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

    def all_signatures(self) -> dict[str, Any]:
        return {
            "roots": {c.value: self.data["staged"][c]["signatures"] for c in Channel},
            "prod_targets": {v: md["signatures"] for v, md in self.data["prod_targets"].items()},
        }

    def status(self) -> dict[str, Any]:
        """Who has signed and who must still sign, computed here with python-tuf."""
        result: dict[str, Any] = {}
        for channel in Channel:
            verified, detail = root_signing_status(
                self.current(channel).signed, self.staged(channel)
            )
            result[channel.value] = {"complete": verified, **detail}
        online_targets = self.online_keyids_after()[Channel.PROD][TARGETS]
        prod_root = self.staged(Channel.PROD).signed
        result["prod_targets"] = {}
        for view, md in self.staged_targets().items():
            complete, detail = prod_targets_signing_status(prod_root, md, online_targets)
            result["prod_targets"][view] = {"complete": complete, **detail}
        return result


def _unique(signatures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {Signature.from_dict(dict(s)).keyid: s for s in signatures}
    return list(by_key.values())
