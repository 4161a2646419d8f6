"""Who may call what: every endpoint of the API against every kind of caller.

The matrix below is the whole policy. Each cell is one test (`endpoint:caller`), run on
a dedicated server per backend whose clock the tests can move forward, so an expiring
token expires without sleeping. Cells that could change shared state (PATCH of a
factory, confirming the keys archive) get a fresh factory of their own; revoking gets
a fresh victim token. A refused request that would write must leave the database as
it was.
"""

# ruff: noqa: E501 (the matrix below has a column per caller and is wider than a line)

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets

from tests.helpers import Factory, Server, assert_error, create_factory, dump_database, send
from tufa.cli.keys.root_update import RootUpdate
from tufa.core.archive import OfflineArchive
from tufa.server.api import devices as api_devices
from tufa.server.api import factories as api_factories
from tufa.server.api import keys as api_keys
from tufa.server.api import repo as api_repo
from tufa.server.api import root_updates as api_root_updates
from tufa.server.api import targets as api_targets
from tufa.server.api import tokens as api_tokens
from tufa.server.api import waves as api_waves
from tufa.server.api import webhooks as api_webhooks

# The callers, in the matrix's column order.
CALLERS = (
    "anon",  # no Authorization header
    "bogus",  # a well-formed token the server never issued
    "other",  # the admin token of another factory
    "revoked",  # an admin token of this factory, revoked
    "expired",  # an admin token of this factory, expired
    "dev-ci",  # a device credential of this factory, ci channel
    "dev-prod",  # a device credential of this factory, prod channel
    "dev-rvk",  # the credential of a device of this factory that was revoked
    "dev-old",  # a device's old credential, after a rotation took effect
    "operator",  # the server operator token
    "admin",  # factory tokens of each scope
    "ci",
    "read",
    "register",
)

# ok = 2xx; 401 = no usable credential; 403 = a valid credential, not allowed here.
MATRIX_TABLE = """
                  anon bogus other revoked expired dev-ci dev-prod dev-rvk dev-old operator admin ci  read register
factories-create  401  401   403   401     401     403    403      401     401     ok       403   403 403  403
factories-list    401  401   403   401     401     403    403      401     401     ok       403   403 403  403
operator-token    401  401   403   401     401     403    403      401     401     ok       403   403 403  403
factory-show      401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
factory-patch     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
archive-download  401  401   403   401     401     403    403      401     401     403      ok    403 403  403
archive-confirm   401  401   403   401     401     403    403      401     401     403      ok    403 403  403
tokens-create     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
tokens-list       401  401   403   401     401     403    403      401     401     403      ok    403 403  403
token-revoke      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
devices-register  401  401   403   401     401     403    403      401     401     403      ok    403 403  ok
devices-list      401  401   403   401     401     403    403      401     401     403      ok    403 ok   403
device-show       401  401   403   401     401     403    403      401     401     403      ok    403 ok   403
devices-revoke    401  401   403   401     401     403    403      401     401     403      ok    403 403  403
devices-delete    401  401   403   401     401     403    403      401     401     403      ok    403 403  403
device-report     401  401   403   401     401     ok     ok       401     401     403      403   403 403  403
credential-show   401  401   403   401     401     ok     ok       401     401     403      403   403 403  403
credential-rotate 401  401   403   401     401     ok     ok       401     401     403      403   403 403  403
metadata-ci       401  401   403   401     401     ok     403      401     401     403      ok    ok  ok   403
metadata-prod     401  401   403   401     401     403    ok       401     401     403      ok    ok  ok   403
updates-init      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-show      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-cancel    401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-stage     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-online    401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-sign      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
updates-apply     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
blob-upload       401  401   403   401     401     403    403      401     401     403      ok    ok  403  403
targets-add       401  401   403   401     401     403    403      401     401     403      ok    ok  403  403
targets-check     401  401   403   401     401     403    403      401     401     403      ok    ok  403  403
targets-prune     401  401   403   401     401     403    403      401     401     403      ok    ok  403  403
targets-delete    401  401   403   401     401     403    403      401     401     403      ok    ok  403  403
targets-list      401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
target-show       401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
target-ci         401  401   403   401     401     ok     403      401     401     403      ok    ok  ok   403
target-prod       401  401   403   401     401     403    ok       401     401     403      ok    ok  ok   403
waves-prepare     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
waves-create      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
waves-list        401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
wave-show         401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
wave-sign         401  401   403   401     401     403    403      401     401     403      ok    403 403  403
wave-rollout      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
wave-complete     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
wave-cancel       401  401   403   401     401     403    403      401     401     403      ok    403 403  403
wave-resume       401  401   403   401     401     403    403      401     401     403      ok    403 403  403
groups-create     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
groups-list       401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
group-add         401  401   403   401     401     403    403      401     401     403      ok    403 403  403
group-show        401  401   403   401     401     403    403      401     401     403      ok    ok  ok   403
group-delete      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
group-remove      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
webhooks-add      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
webhooks-list     401  401   403   401     401     403    403      401     401     403      ok    403 403  403
webhook-remove    401  401   403   401     401     403    403      401     401     403      ok    403 403  403
webhook-test      401  401   403   401     401     403    403      401     401     403      ok    403 403  403
webhook-log       401  401   403   401     401     403    403      401     401     403      ok    403 403  403
"""


def _parse(table: str) -> dict[tuple[str, str], str]:
    header, *rows = (line.split() for line in table.strip().splitlines())
    assert tuple(header) == CALLERS
    cells = {}
    for endpoint, *expected in rows:
        assert len(expected) == len(CALLERS), endpoint
        cells.update({(endpoint, c): e for c, e in zip(CALLERS, expected, strict=True)})
    return cells


MATRIX = _parse(MATRIX_TABLE)
# The route each matrix row calls.
ROUTES = {
    "factories-create": ("POST", "/api/v1/factories"),
    "factories-list": ("GET", "/api/v1/factories"),
    "operator-token": ("POST", "/api/v1/operator-token"),
    "factory-show": ("GET", "/api/v1/factories/{factory}"),
    "factory-patch": ("PATCH", "/api/v1/factories/{factory}"),
    "archive-download": ("GET", "/api/v1/factories/{factory}/keys/archive"),
    "archive-confirm": ("POST", "/api/v1/factories/{factory}/keys/archive/confirm"),
    "tokens-create": ("POST", "/api/v1/factories/{factory}/tokens"),
    "tokens-list": ("GET", "/api/v1/factories/{factory}/tokens"),
    "token-revoke": ("DELETE", "/api/v1/factories/{factory}/tokens/{token_id}"),
    "devices-register": ("POST", "/api/v1/factories/{factory}/devices"),
    "devices-list": ("GET", "/api/v1/factories/{factory}/devices"),
    "device-show": ("GET", "/api/v1/factories/{factory}/devices/{device}"),
    "devices-revoke": ("POST", "/api/v1/factories/{factory}/devices/{device}/revoke"),
    "devices-delete": ("DELETE", "/api/v1/factories/{factory}/devices/{device}"),
    "device-report": ("POST", "/api/v1/factories/{factory}/device-reports"),
    "credential-show": ("GET", "/api/v1/factories/{factory}/device-credential"),
    "credential-rotate": ("POST", "/api/v1/factories/{factory}/device-credential"),
    "metadata-ci": ("GET", "/api/v1/factories/{factory}/repo/{channel}/metadata/{filename}"),
    "metadata-prod": ("GET", "/api/v1/factories/{factory}/repo/{channel}/metadata/{filename}"),
    "updates-init": ("POST", "/api/v1/factories/{factory}/keys/updates"),
    "updates-show": ("GET", "/api/v1/factories/{factory}/keys/updates"),
    "updates-cancel": ("DELETE", "/api/v1/factories/{factory}/keys/updates"),
    "updates-stage": ("PUT", "/api/v1/factories/{factory}/keys/updates/staged"),
    "updates-online": ("POST", "/api/v1/factories/{factory}/keys/updates/online-keys"),
    "updates-sign": ("POST", "/api/v1/factories/{factory}/keys/updates/signatures"),
    "updates-apply": ("POST", "/api/v1/factories/{factory}/keys/updates/apply"),
    "blob-upload": ("PUT", "/api/v1/factories/{factory}/blobs/{sha256}"),
    "targets-add": ("POST", "/api/v1/factories/{factory}/targets"),
    "targets-check": ("POST", "/api/v1/factories/{factory}/targets/check"),
    "targets-prune": ("POST", "/api/v1/factories/{factory}/targets/prune"),
    "targets-delete": ("POST", "/api/v1/factories/{factory}/targets/delete"),
    "targets-list": ("GET", "/api/v1/factories/{factory}/targets"),
    "target-show": ("GET", "/api/v1/factories/{factory}/targets/{name}"),
    "target-ci": ("GET", "/api/v1/factories/{factory}/repo/{channel}/targets/{filename}"),
    "target-prod": ("GET", "/api/v1/factories/{factory}/repo/{channel}/targets/{filename}"),
    "waves-prepare": ("POST", "/api/v1/factories/{factory}/waves/prepare"),
    "waves-create": ("POST", "/api/v1/factories/{factory}/waves"),
    "waves-list": ("GET", "/api/v1/factories/{factory}/waves"),
    "wave-show": ("GET", "/api/v1/factories/{factory}/waves/{name}"),
    "wave-sign": ("POST", "/api/v1/factories/{factory}/waves/{name}/signatures"),
    "wave-rollout": ("POST", "/api/v1/factories/{factory}/waves/{name}/rollout"),
    "wave-complete": ("POST", "/api/v1/factories/{factory}/waves/{name}/complete"),
    "wave-cancel": ("POST", "/api/v1/factories/{factory}/waves/{name}/cancel"),
    "wave-resume": ("POST", "/api/v1/factories/{factory}/waves/{name}/resume"),
    "groups-create": ("POST", "/api/v1/factories/{factory}/device-groups"),
    "groups-list": ("GET", "/api/v1/factories/{factory}/device-groups"),
    "group-add": ("POST", "/api/v1/factories/{factory}/device-groups/{group}/devices"),
    "group-show": ("GET", "/api/v1/factories/{factory}/device-groups/{group}"),
    "group-delete": ("DELETE", "/api/v1/factories/{factory}/device-groups/{group}"),
    "group-remove": ("DELETE", "/api/v1/factories/{factory}/device-groups/{group}/devices"),
    "webhooks-add": ("POST", "/api/v1/factories/{factory}/webhooks"),
    "webhooks-list": ("GET", "/api/v1/factories/{factory}/webhooks"),
    "webhook-remove": ("DELETE", "/api/v1/factories/{factory}/webhooks/{hook_id}"),
    "webhook-test": ("POST", "/api/v1/factories/{factory}/webhooks/{hook_id}/test"),
    "webhook-log": ("GET", "/api/v1/factories/{factory}/webhooks/{hook_id}/deliveries"),
}
# Blob and target used by the targets rows: published once per tenant, on first use.
BLOB = b"firmware image for the authorization matrix"
BLOB_SHA256 = hashlib.sha256(BLOB).hexdigest()
TARGET = {
    "name": "matrix-fw-1",
    "version": "1",
    "hardware_ids": ["rpi4"],
    "tags": ["main"],
    "length": len(BLOB),
    "sha256": BLOB_SHA256,
}


# Where the matrix's webhooks point: nothing listens there, so a test delivery stays
# queued (its attempts write to the delivery log, which `dump_database` leaves out).
HOOK_URL = "http://127.0.0.1:9/matrix-hook"


def device_report() -> dict[str, Any]:
    """A device report: build 1 installed, and one event that no report sent before."""
    installed = {"version": "1", "target": TARGET["name"], "sha256": BLOB_SHA256}
    event = {
        "id": f"e-{secrets.token_hex(4)}",
        "at": "2026-12-01T10:00:00Z",
        "kind": "installed",
        "version": "1",
        "target": TARGET["name"],
        "detail": "",
    }
    return {"installed": installed, "events": [event]}


# Endpoints whose success changes the factory for everyone after: one factory per cell.
FRESH_FACTORY = {
    "factory-patch",
    "archive-confirm",
    "waves-prepare",
    "waves-create",
    "wave-complete",
    "wave-cancel",
    "wave-resume",
    *(e for e in ROUTES if e.startswith("updates-")),
}
ERROR_CODES = {"401": "unauthorized", "403": "forbidden"}
# Device credentials that worked once are refused with a code of their own.
DEAD_DEVICE_CREDENTIALS = {"dev-rvk", "dev-old"}
# What a 401 must say, so that e.g. the expired token is refused for expiring, not by chance.
WHY_UNAUTHORIZED = {
    "anon": "needs",
    "bogus": "unknown token",
    "revoked": "revoked",
    "expired": "expired",
    "dev-rvk": "was revoked on",
    "dev-old": "it was replaced on",
}


class ClockFile:
    """The --clock-offset-file of a server: seconds added to its clock, only ever forward."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        path.write_text("0")

    def advance(self, seconds: int) -> None:
        self.offset += seconds
        self.path.write_text(str(self.offset))


class Tenant:
    """A factory on the matrix server, with credentials of each kind made on first use."""

    def __init__(self, env: MatrixServer, factory: Factory) -> None:
        self.env = env
        self.factory = factory
        self._credentials: dict[str, str | None] = {}
        self._device_id: str | None = None
        self._published = False
        self._waved = False

    def admin(self, method: str, suffix: str, **kwargs: Any) -> Any:
        response = send(self.env.server, method, self.factory.path(suffix), **kwargs)
        assert response.is_success, response.text
        return response.json()

    def new_token(self, scope: str, **extra: Any) -> dict[str, Any]:
        body = {"scopes": [scope], **extra}
        token: dict[str, Any] = self.admin(
            "POST", "/tokens", token=self.factory.admin_token, json=body
        )
        return token

    def forget(self, caller: str) -> None:
        self._credentials.pop(caller, None)

    def credential(self, caller: str) -> str | None:
        if caller not in self._credentials:
            self._credentials[caller] = self._make(caller)
        return self._credentials[caller]

    def _make(self, caller: str) -> str | None:
        secret: str
        match caller:
            case "anon":
                return None
            case "bogus":
                return f"tufa_{secrets.token_urlsafe(32)}"
            case "other":
                return self.env.other.admin_token
            case "operator":
                return self.env.server.operator_token
            case "admin":
                return self.factory.admin_token
            case "revoked":
                token = self.new_token("admin")
                self.admin("DELETE", f"/tokens/{token['id']}", token=self.factory.admin_token)
                secret = token["token"]
            case "expired":
                # Alive for a minute (the server clock has 1 s steps), then moved past it.
                secret = self.new_token("admin", expires_in_seconds=60)["token"]
                alive = send(self.env.server, "GET", self.factory.path(), secret)
                assert alive.status_code == 200, alive.text
                self.env.clock.advance(61)
            case "dev-ci" | "dev-prod":
                secret = self.device(caller.removeprefix("dev-"))["credential"]
            case "dev-rvk":
                device = self.device("ci")
                self.admin(
                    "POST", f"/devices/{device['id']}/revoke", token=self.factory.admin_token
                )
                secret = device["credential"]
            case "dev-old":
                secret = self.device("prod")["credential"]
                new = self.admin("POST", "/device-credential", token=secret)["credential"]
                self.admin("GET", "/device-credential", token=new)  # its first use
            case _:
                secret = self.new_token(caller)["token"]
        return secret

    def device(self, channel: str) -> dict[str, Any]:
        body = {"name": f"d-{secrets.token_hex(4)}", "hardware_id": "rpi4", "tag": "main"}
        device: dict[str, Any] = self.admin(
            "POST", "/devices", token=self.factory.admin_token, json={**body, "channel": channel}
        )
        return device

    def request_for(self, endpoint: str) -> tuple[str, str, dict[str, Any] | None]:
        """Method, path and JSON body of a valid request to `endpoint` in this factory."""
        path = self.factory.path
        match endpoint:
            case "factories-create":
                return "POST", "/api/v1/factories", {"name": f"n-{secrets.token_hex(5)}"}
            case "factories-list":
                return "GET", "/api/v1/factories", None
            case "factory-show":
                return "GET", path(), None
            case "factory-patch":
                return "PATCH", path(), {"anonymous_read": True}
            case "archive-download":
                return "GET", path("/keys/archive"), None
            case "archive-confirm":
                download = send(
                    self.env.server, "GET", path("/keys/archive"), self.factory.admin_token
                )
                assert download.status_code == 200, download.text
                digest = download.headers["X-Tufa-Archive-Sha256"]
                return "POST", path("/keys/archive/confirm"), {"sha256": digest}
            case "tokens-create":
                return "POST", path("/tokens"), {"scopes": ["read"]}
            case "tokens-list":
                return "GET", path("/tokens"), None
            case "token-revoke":
                victim = self.new_token("read")
                return "DELETE", path(f"/tokens/{victim['id']}"), None
            case "devices-register":
                body = {"name": f"r-{secrets.token_hex(4)}", "hardware_id": "x", "tag": "main"}
                return "POST", path("/devices"), {**body, "channel": "ci"}
            case "devices-list":
                return "GET", path("/devices"), None
            case "device-show":
                if self._device_id is None:
                    self._device_id = self.device("ci")["id"]
                return "GET", path(f"/devices/{self._device_id}"), None
            case "devices-revoke":
                return "POST", path(f"/devices/{self.device('prod')['id']}/revoke"), None
            case "devices-delete":
                return "DELETE", path(f"/devices/{self.device('prod')['name']}"), None
            case "device-report":
                return "POST", path("/device-reports"), device_report()
            case "credential-show":
                return "GET", path("/device-credential"), None
            case "credential-rotate":
                return "POST", path("/device-credential"), None
            case "operator-token":
                return "POST", "/api/v1/operator-token", None
            case "metadata-ci" | "metadata-prod":
                channel = endpoint.removeprefix("metadata-")
                return "GET", path(f"/repo/{channel}/metadata/timestamp.json"), None
            case "updates-init":
                return "POST", path("/keys/updates"), {"message": "matrix"}
            case "updates-show" | "updates-cancel":
                self._open_update()
                method = "GET" if endpoint == "updates-show" else "DELETE"
                return method, path("/keys/updates"), None
            case "updates-stage":
                staged = self._open_update()["staged"]
                roots = {c: staged[c]["signed"] for c in ("ci", "prod")}
                return "PUT", path("/keys/updates/staged"), {"roots": roots}
            case "updates-online":
                self._open_update()
                return "POST", path("/keys/updates/online-keys"), {"roles": ["timestamp"]}
            case "updates-sign":
                self._open_update()
                return "POST", path("/keys/updates/signatures"), {"roots": {}}
            case "updates-apply":
                self._signed_update()
                return "POST", path("/keys/updates/apply"), None
            case "blob-upload":
                return "PUT", path(f"/blobs/{BLOB_SHA256}"), None
            case "targets-add":
                self._publish()
                return "POST", path("/targets"), {"targets": [TARGET]}
            case "targets-check":
                return "POST", path("/targets/check"), {"targets": [TARGET]}
            case "targets-prune":
                return "POST", path("/targets/prune"), {"keep": 5}
            case "targets-delete":
                doomed = {
                    **TARGET,
                    "name": f"matrix-doomed-{secrets.token_hex(4)}",
                    "url": "https://cdn.example.com/doomed",
                }
                token = self.factory.admin_token
                self.admin("POST", "/targets", token=token, json={"targets": [doomed]})
                return "POST", path("/targets/delete"), {"names": [doomed["name"]]}
            case "targets-list":
                return "GET", path("/targets"), None
            case "target-show":
                self._publish()
                return "GET", path(f"/targets/{TARGET['name']}"), None
            case "waves-prepare":
                self._publish()
                return "POST", path("/waves/prepare"), {"tag": "main", "version": "1"}
            case "waves-create":
                return "POST", path("/waves"), self._signed_wave("w-create")
            case "waves-list":
                return "GET", path("/waves"), None
            case "wave-show":
                return "GET", path(f"/waves/{self._wave()}"), None
            case "wave-sign":
                return "POST", path(f"/waves/{self._wave()}/signatures"), {"signatures": []}
            case "wave-rollout":
                return "POST", path(f"/waves/{self._wave()}/rollout"), {"dry_run": True}
            case "wave-resume":
                return "POST", path(f"/waves/{self._halted_wave()}/resume"), None
            case "wave-complete" | "wave-cancel":
                action = endpoint.removeprefix("wave-")
                return "POST", path(f"/waves/{self._wave()}/{action}"), None
            case "groups-create":
                return "POST", path("/device-groups"), {"name": f"g-{secrets.token_hex(4)}"}
            case "groups-list":
                return "GET", path("/device-groups"), None
            case "group-add":
                group = self._group()
                device = self.device("prod")["id"]
                return "POST", path(f"/device-groups/{group}/devices"), {"devices": [device]}
            case "group-show":
                return "GET", path(f"/device-groups/{self._group()}"), None
            case "group-delete":
                return "DELETE", path(f"/device-groups/{self._group()}"), None
            case "group-remove":
                group = self._group()
                device = self.device("prod")["id"]
                members = f"/device-groups/{group}/devices"
                token = self.factory.admin_token
                self.admin("POST", members, token=token, json={"devices": [device]})
                return "DELETE", path(members), {"devices": [device]}
            case "webhooks-add":
                return "POST", path("/webhooks"), {"url": HOOK_URL, "events": ["keys.expiring"]}
            case "webhooks-list":
                return "GET", path("/webhooks"), None
            case "webhook-remove":
                return "DELETE", path(f"/webhooks/{self._hook()}"), None
            case "webhook-test":
                return "POST", path(f"/webhooks/{self._hook()}/test"), None
            case "webhook-log":
                return "GET", path(f"/webhooks/{self._hook()}/deliveries"), None
            case "target-ci" | "target-prod":
                self._wave()  # production devices may download only what their view lists
                if endpoint == "target-prod":
                    token = self.factory.admin_token
                    self.admin("POST", f"/waves/{self._wave()}/rollout", token=token, json={})
                channel = endpoint.removeprefix("target-")
                return "GET", path(f"/repo/{channel}/targets/{BLOB_SHA256}.{TARGET['name']}"), None
        raise AssertionError(f"no request for endpoint {endpoint!r}")

    def _open_update(self) -> dict[str, Any]:
        token = self.factory.admin_token
        opened = send(self.env.server, "GET", self.factory.path("/keys/updates"), token)
        if opened.status_code == 404:
            return dict(self.admin("POST", "/keys/updates", token=token, json={"message": "m"}))
        assert opened.status_code == 200, opened.text
        return dict(opened.json())

    def _signed_update(self) -> None:
        """An update that apply accepts: signed with the (unconfirmed) archive's root key."""
        token = self.factory.admin_token
        payload = RootUpdate(self._open_update()).sign_with(self._archive())
        self.admin("POST", "/keys/updates/signatures", token=token, json=payload)

    def _archive(self) -> OfflineArchive:
        """The factory's (unconfirmed) offline keys archive, for signing as its owner."""
        token = self.factory.admin_token
        download = send(self.env.server, "GET", self.factory.path("/keys/archive"), token)
        assert download.status_code == 200, download.text
        return OfflineArchive.from_bytes(download.content)

    def _signed_wave(self, name: str) -> dict[str, Any]:
        """The body of a valid wave creation: build 1 of tag main, offline-signed."""
        self._publish()
        token = self.factory.admin_token
        body = {"tag": "main", "version": "1"}
        prepared = self.admin("POST", "/waves/prepare", token=token, json=body)
        md = Metadata[Targets].from_dict({"signed": prepared["signed"], "signatures": []})
        for key in self._archive().keys_for("targets"):
            md.sign(key.prod.signer(), append=True)
        return {**body, "name": name, "targets": md.to_dict()}

    def _group(self) -> str:
        """A new device group, with no member."""
        group = f"g-{secrets.token_hex(4)}"
        self.admin("POST", "/device-groups", token=self.factory.admin_token, json={"name": group})
        return group

    def _hook(self) -> str:
        """A new webhook (for keys.expiring, which no cell makes due)."""
        body = {"url": HOOK_URL, "events": ["keys.expiring"]}
        hook: str = self.admin("POST", "/webhooks", token=self.factory.admin_token, json=body)["id"]
        return hook

    def _wave(self) -> str:
        if not self._waved:
            token = self.factory.admin_token
            self.admin("POST", "/waves", token=token, json=self._signed_wave("w1"))
            self._waved = True
        return "w1"

    def _halted_wave(self) -> str:
        """Wave w1 in a staged plan, halted by its one canary's failed install."""
        wave, token = self._wave(), self.factory.admin_token
        device = {"name": "a-canary", "hardware_id": "rpi4", "tag": "main", "channel": "prod"}
        canary = self.admin("POST", "/devices", token=token, json=device)
        plan = {"plan": ["1", "100%"], "min_reports": 1}
        self.admin("POST", f"/waves/{wave}/rollout", token=token, json=plan)
        failed = {"id": "1", "at": "2026-12-01T00:00:00Z", "kind": "install-failed"}
        report = {"installed": None, "events": [{**failed, "version": "1", "detail": ""}]}
        sent = send(
            self.env.server, "POST", self.factory.path("/device-reports"), canary["credential"],
            json=report,
        )  # fmt: skip
        assert sent.status_code == 200, sent.text
        deadline = time.monotonic() + 30
        while self.admin("GET", f"/waves/{wave}", token=token)["rollout"]["state"] != "halted":
            assert time.monotonic() < deadline, "the plan did not halt"
            time.sleep(0.1)
        return wave

    def _publish(self) -> None:
        if self._published:
            return
        token = self.factory.admin_token
        upload = send(
            self.env.server, "PUT", self.factory.path(f"/blobs/{BLOB_SHA256}"), token, content=BLOB
        )
        assert upload.status_code == 201, upload.text
        self.admin("POST", "/targets", token=token, json={"targets": [TARGET]})
        self._published = True


class MatrixServer:
    """A dedicated server with a movable clock, a shared tenant and another factory."""

    def __init__(self, server: Server, clock: ClockFile) -> None:
        self.server = server
        self.clock = clock
        self.other = create_factory(server)
        self.shared = Tenant(self, create_factory(server))

    def operator_token_replaced(self, new: str, old: str | None) -> None:
        """The operator token was rotated: the old one is refused at once, the new one
        is what every later cell uses."""
        assert old is not None
        refused = send(self.server, "GET", "/api/v1/factories", old)
        assert_error(refused, 401, "unauthorized", "revoked")
        self.server.local.operator_token = new
        self.shared.forget("operator")

    def tenant_for(self, endpoint: str) -> Tenant:
        if endpoint in FRESH_FACTORY:
            return Tenant(self, create_factory(self.server))
        return self.shared


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def matrix_server(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
) -> MatrixServer:
    clock = ClockFile(tmp_path_factory.mktemp("clock") / "offset")
    extra = ("--clock-offset-file", str(clock.path), "--rollout-interval", "1s")
    server = make_server(request.param, extra_args=extra)
    return MatrixServer(server, clock)


@pytest.mark.parametrize(("endpoint", "caller"), list(MATRIX), ids=[f"{e}:{c}" for e, c in MATRIX])
def test_authorization_matrix(matrix_server: MatrixServer, endpoint: str, caller: str) -> None:
    expected = MATRIX[endpoint, caller]
    tenant = matrix_server.tenant_for(endpoint)
    token = tenant.credential(caller)
    method, path, body = tenant.request_for(endpoint)
    assert method == ROUTES[endpoint][0]
    watch = expected != "ok" and method != "GET"
    before = dump_database(matrix_server.server) if watch else None

    content = BLOB if endpoint == "blob-upload" else None
    response = send(matrix_server.server, method, path, token, json=body, content=content)

    if expected == "ok":
        assert response.is_success, f"{response.status_code} {response.text}"
        if endpoint == "operator-token":
            matrix_server.operator_token_replaced(response.json()["token"], token)
        return
    why = WHY_UNAUTHORIZED.get(caller, "") if expected == "401" else ""
    code = "credential_revoked" if caller in DEAD_DEVICE_CREDENTIALS else ERROR_CODES[expected]
    assert_error(response, int(expected), code, why)
    if watch:
        assert dump_database(matrix_server.server) == before, f"refused {endpoint} wrote"


def test_matrix_covers_every_route() -> None:
    """A new route must get a row in the matrix."""
    served = {
        (method, route.path)
        for module in (
            api_factories,
            api_keys,
            api_tokens,
            api_devices,
            api_repo,
            api_root_updates,
            api_targets,
            api_waves,
            api_webhooks,
        )
        for route in module.routes
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert set(ROUTES.values()) == served
    assert set(ROUTES) == {endpoint for endpoint, _ in MATRIX}


@pytest.mark.parametrize("channel", ["ci", "prod"])
def test_anonymous_metadata_reads_follow_the_factory_setting(
    factory: Factory, channel: str
) -> None:
    server = factory.server
    closed = create_factory(server)
    files = [f"/repo/{channel}/metadata/{name}" for name in ("timestamp.json", "1.root.json")]

    def anonymous(f: Factory, suffix: str) -> int:
        return send(server, "GET", f.path(suffix)).status_code

    def configure(anonymous_read: bool) -> None:
        body = {"anonymous_read": anonymous_read}
        response = send(server, "PATCH", factory.path(), factory.admin_token, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["anonymous_read"] is anonymous_read

    for suffix in files:
        assert_error(send(server, "GET", factory.path(suffix)), 401, "unauthorized", factory.name)

    configure(True)
    for suffix in files:
        response = send(server, "GET", factory.path(suffix))
        assert response.status_code == 200, response.text
        assert response.headers["Cache-Control"].startswith("public"), response.headers
        # Only anonymous reads of metadata open up: a bad credential is still refused...
        assert send(server, "GET", factory.path(suffix), "tufa_not-a-token").status_code == 401
        # ...and other factories stay closed.
        assert anonymous(closed, suffix) == 401
    # Nothing else of the factory becomes public.
    for suffix in ("", "/devices", "/devices/any", "/tokens", "/keys/archive"):
        assert anonymous(factory, suffix) == 401, suffix

    configure(False)
    for suffix in files:
        assert_error(send(server, "GET", factory.path(suffix)), 401, "unauthorized")


def test_nothing_crosses_between_factories(server: Server) -> None:
    """Another factory's devices cannot read, and its tokens and devices are not found."""
    mine, theirs = create_factory(server), create_factory(server)
    their_read_token = theirs.token("read")
    their_token_id = next(
        t["id"] for t in theirs.request("GET", "/tokens").json() if t["scopes"] == ["read"]
    )
    their_device = theirs.register_device("ci")

    for channel in ("ci", "prod"):
        root = mine.path(f"/repo/{channel}/metadata/1.root.json")
        read = send(server, "GET", root, their_device["credential"])
        assert_error(read, 403, "forbidden", mine.name)

    revoke = send(server, "DELETE", mine.path(f"/tokens/{their_token_id}"), mine.admin_token)
    assert_error(revoke, 404, "not_found", their_token_id)
    assert send(server, "GET", theirs.path(), their_read_token).status_code == 200
    for ident in (their_device["id"], their_device["name"]):
        shown = send(server, "GET", mine.path(f"/devices/{ident}"), mine.admin_token)
        assert_error(shown, 404, "not_found", ident)
    assert send(server, "GET", mine.path("/devices"), mine.admin_token).json() == []
    listed = send(server, "GET", mine.path("/tokens"), mine.admin_token).json()
    assert [t["scopes"] for t in listed] == [["admin"]]
    assert all("token" not in t and "secret_sha256" not in t for t in listed)
