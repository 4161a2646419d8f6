"""Hostile input: what no database stores or no canonical JSON signs is refused.

Each case is an input once seen to answer 500 with a traceback in the server log (or,
on SQLite, to be stored): a NUL character in a path parameter or a JSON string, a lone
surrogate, a fraction, NaN or Infinity where metadata gets signed, an integer past
64 bits, a list where a list of strings belongs, a rollout limit in digits that are not
ASCII. Each is sent by an allowed caller to a real server on both backends, with a
world behind it for the request to get far (a published target, production devices,
a device group, an active wave signed offline, an open root update). Each must get a
400 whose message names the field, leave every table as it was, and log no traceback.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.helpers import (
    Factory,
    Server,
    assert_error,
    create_factory,
    download_archive,
    dump_all_tables,
    hostile_json,
    path_params,
    send,
    served_routes,
)
from tests.test_waves import image, post_wave, prepared, publish
from tests.webhook_receiver import Receiver
from tufa.core.archive import OfflineArchive
from tufa.core.metadata import TARGETS
from tufa.server.webhooks import EVENTS

WAVE = "w-1"
GROUP = "g-1"
RELEASED = "1"  # the CI build the active wave releases
NEXT = "2"  # a CI build no wave has released yet
BLOB = b"a build, uploaded\n"  # what a valid blob upload sends
NUL = "a\x00b"
SURROGATE = "a\ud800b"


@dataclass
class World:
    """A factory with something behind every route, and one with an open root update."""

    server: Server
    factory: Factory
    updating: Factory
    ci_device: dict[str, Any]
    prod_devices: list[dict[str, Any]]
    token_id: str
    archive: Path
    # A webhook for every event, to a receiver that takes every delivery.
    hook_id: str


def build_world(server: Server, home: Path) -> World:
    factory = create_factory(server)
    archive = home / "keys.tgz"
    download_archive(factory, archive)
    publish(factory, RELEASED, NEXT)
    ci_device = factory.register_device("ci")
    prod_devices = [factory.register_device("prod") for _ in range(3)]
    created = factory.request("POST", "/device-groups", json={"name": GROUP})
    assert created.status_code == 201, created.text
    md = prepared(factory, RELEASED)
    for key in OfflineArchive.load(archive).keys_for(TARGETS):
        md.sign(key.prod.signer(), append=True)
    wave = post_wave(factory, WAVE, RELEASED, md)
    assert wave.status_code == 201, wave.text
    factory.token("read")
    token_id = factory.request("GET", "/tokens").json()[-1]["id"]
    updating = create_factory(server)
    opened = updating.request("POST", "/keys/updates", json={"message": "rotate online keys"})
    assert opened.status_code == 201, opened.text
    hook = {"url": Receiver().start().url, "events": list(EVENTS)}
    added = factory.request("POST", "/webhooks", json=hook)
    assert added.status_code == 201, added.text
    hook_id = added.json()["id"]
    return World(server, factory, updating, ci_device, prod_devices, token_id, archive, hook_id)


@pytest.fixture(scope="module")
def world(server: Server, tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(server, tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def no_traceback(world: World) -> Iterator[None]:
    """The test logs no traceback on the server."""
    start = len(world.server.local.log())
    yield
    logged = world.server.local.log()[start:]
    assert "Traceback" not in logged, logged


def refused(world: World, response: httpx.Response, says: str, before: dict[str, Any]) -> None:
    assert_error(response, 400, "bad_request", says)
    assert dump_all_tables(world.server) == before, "a refused request changed the database"


# -- path and query parameters ----------------------------------------------------------


# How a request gets past routing and lookups: a value for each path parameter (a
# function of the world and the route's path). A route with a parameter missing here
# fails test_every_route_has_a_fuzz_spec (test_fuzz_routes.py).
PARAM_VALUES: dict[str, Callable[[World, str], str]] = {
    "factory": lambda world, _: world.factory.name,
    "channel": lambda _world, _: "ci",
    "filename": lambda _world, path: (
        "timestamp.json" if "/metadata/" in path else f"{'ab' * 32}.{image(RELEASED)}"
    ),
    "name": lambda _world, path: WAVE if "/waves/" in path else image(RELEASED),
    "group": lambda _world, _: GROUP,
    "device": lambda world, _: world.ci_device["id"],
    "token_id": lambda world, _: world.token_id,
    "hook_id": lambda world, _: world.hook_id,
    "sha256": lambda _world, _: hashlib.sha256(BLOB).hexdigest(),
}


def valid_params(world: World, path: str) -> dict[str, str]:
    return {name: PARAM_VALUES[name](world, path) for name in path_params(path)}


PARAM_CASES = [(m, path, param) for m, path in served_routes() for param in path_params(path)]


@pytest.mark.usefixtures("no_traceback")
@pytest.mark.parametrize(
    ("method", "path", "param"), PARAM_CASES, ids=[f"{m} {p} {n}" for m, p, n in PARAM_CASES]
)
def test_nul_in_any_path_parameter_is_refused(
    world: World, method: str, path: str, param: str
) -> None:
    values = {**valid_params(world, path), param: NUL}
    url = path.format(**{name: quote(value, safe="") for name, value in values.items()})
    before = dump_all_tables(world.server)

    response = send(world.server, method, url, world.factory.admin_token, content=b"{}")

    refused(world, response, f"path parameter '{param}' contains a NUL character", before)


@pytest.mark.usefixtures("no_traceback")
def test_nul_in_the_anonymous_metadata_path_is_refused(world: World) -> None:
    before = dump_all_tables(world.server)
    response = send(world.server, "GET", "/api/v1/factories/a%00b/repo/ci/metadata/timestamp.json")
    refused(world, response, "path parameter 'factory' contains a NUL character", before)


@pytest.mark.usefixtures("no_traceback")
@pytest.mark.parametrize(
    "suffix",
    [
        "/targets?tag=a%00b",
        "/targets?hardware_id=a%00b",
        "/repo/prod/metadata/timestamp.json?tag=%00",
    ],
)
def test_nul_in_a_query_parameter_is_refused(world: World, suffix: str) -> None:
    name = suffix.partition("?")[2].partition("=")[0]
    before = dump_all_tables(world.server)
    response = send(world.server, "GET", world.factory.path(suffix), world.factory.admin_token)
    refused(world, response, f"query parameter '{name}' contains a NUL character", before)


# -- JSON bodies -------------------------------------------------------------------------


def target(**changes: Any) -> dict[str, Any]:
    """A valid external CI target with `changes`."""
    return {
        "name": f"t-{secrets.token_hex(4)}",
        "version": "7",
        "hardware_ids": ["rpi4"],
        "tags": ["main"],
        "url": "https://cdn.example.com/t.img",
        "sha256": "cd" * 32,
        "length": 10,
        **changes,
    }


def nested(depth: int) -> Any:
    """`depth` levels of objects: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass(frozen=True)
class BodyCase:
    id: str
    suffix: str  # the path under the factory's; every case is a POST
    body: Any  # the JSON body, or a function of the world that gives it
    says: str  # what the message must say
    factory: str = "world"  # or "updating": the factory with an open root update


def _publish(case_id: str, says: str, **changes: Any) -> BodyCase:
    return BodyCase(case_id, "/targets", {"targets": [target(**changes)]}, says)


def _custom(case_id: str, custom: dict[str, Any], says: str) -> BodyCase:
    return _publish(f"custom-{case_id}", f"field 'targets[0].custom{says}", custom=custom)


def _wave(case_id: str, says: str, **changes: Any) -> BodyCase:
    """What `tufa waves init` posts for the next build, with `changes`."""

    def body(world: World) -> dict[str, Any]:
        md = prepared(world.factory, NEXT)
        valid = {
            "name": "w-2",
            "tag": "main",
            "version": NEXT,
            "prune": [],
            "targets": md.to_dict(),
        }
        return {**valid, **changes}

    return BodyCase(f"wave-create-{case_id}", "/waves", body, says)


def _prepare(case_id: str, body: dict[str, Any], says: str) -> BodyCase:
    return BodyCase(f"wave-prepare-{case_id}", "/waves/prepare", body, says)


def _limit(case_id: str, limit: str) -> BodyCase:
    says = "'limit' must be a count such as 10 or a share such as 25%"
    return BodyCase(f"rollout-limit-{case_id}", f"/waves/{WAVE}/rollout", {"limit": limit}, says)


MEMBERS = f"/device-groups/{GROUP}/devices"
ONLINE_KEYS = "/keys/updates/online-keys"
NOT_STRINGS = "field 'roles' must be a list of strings"

BODY_CASES = [
    _publish("url-nul", "field 'targets[0].url' contains a NUL", url=f"https://x/{NUL}"),
    _publish("url-surrogate", "field 'targets[0].url' contains a lone surrogate", url=SURROGATE),
    _custom("surrogate", {"x": SURROGATE}, ".x' contains a lone surrogate"),
    _custom("nul", {"x": [NUL]}, ".x[0]' contains a NUL"),
    _publish("custom-key-nul", "a key of field 'targets[0].custom'", custom={NUL: 1}),
    _custom("float", {"x": 1.5}, ".x' is the number 1.5"),
    _custom("whole-float", {"x": 2.0}, ".x' is the number 2.0"),
    _custom("nan", {"x": float("nan")}, ".x' is the number nan"),
    _custom("infinity", {"x": float("inf")}, ".x' is the number inf"),
    _custom("minus-infinity", {"odd key": float("-inf")}, '["odd key"]\' is the number -inf'),
    _custom("int-below-64-bits", {"x": -(2**63) - 1}, ".x' is out of range"),
    _publish("custom-too-deep", "nests deeper than 8 levels", custom=nested(9)),
    _publish("body-too-deep", "nests deeper than 64 levels", custom=nested(70)),
    _publish("length-2-63", "field 'targets[0].length' is out of range", length=2**63),
    _publish("length-huge", "field 'targets[0].length' is out of range", length=10**30),
    BodyCase("prune-keep-2-63", "/targets/prune", {"keep": 2**63}, "field 'keep' is out of range"),
    BodyCase(
        "root-update-message-nul",
        "/keys/updates",
        {"message": f"rotate {NUL}"},
        "field 'message' contains a NUL",
    ),
    BodyCase("online-keys-list", ONLINE_KEYS, {"roles": [[1, "a"]]}, NOT_STRINGS, "updating"),
    BodyCase("online-keys-object", ONLINE_KEYS, {"roles": [{"a": 1}]}, NOT_STRINGS, "updating"),
    _prepare("tag-nul", {"tag": f"main{NUL}", "version": NEXT}, "field 'tag' contains a NUL"),
    _prepare(
        "version-surrogate",
        {"tag": "main", "version": SURROGATE},
        "field 'version' contains a lone surrogate",
    ),
    _prepare("version-huge", {"tag": "main", "version": "9" * 5000}, "field 'version'"),
    _prepare("tag-long", {"tag": "t" * 300, "version": NEXT}, "field 'tag'"),
    _wave("tag-nul", "field 'tag' contains a NUL", tag=f"main{NUL}"),
    _wave("version-surrogate", "field 'version' contains a lone surrogate", version=SURROGATE),
    BodyCase("group-member-nul", MEMBERS, {"devices": [NUL]}, "field 'devices[0]' contains a NUL"),
    BodyCase(
        "group-member-surrogate",
        MEMBERS,
        {"devices": ["ok", SURROGATE]},
        "field 'devices[1]' contains a lone surrogate",
    ),
    BodyCase(
        "rollout-devices-nul",
        f"/waves/{WAVE}/rollout",
        {"devices": [NUL]},
        "field 'devices[0]' contains a NUL",
    ),
    BodyCase(
        "wave-signature-keyid-list",
        f"/waves/{WAVE}/signatures",
        {"signatures": [{"keyid": [], "sig": "cd" * 64}]},
        "field 'signatures' must be a list of {keyid, sig} objects of strings",
    ),
    BodyCase(
        "root-update-signature-sig-object",
        "/keys/updates/signatures",
        {"roots": {"ci": [{"keyid": "ab" * 32, "sig": {"a": 1}}]}},
        "field 'roots.ci' must be a list of {keyid, sig} objects of strings",
        "updating",
    ),
    _limit("full-width-digit", "\uff19"),
    _limit("underscore", "1_000"),
    _limit("leading-space", " 5"),
    _limit("trailing-space", "5 "),
    _limit("full-width-share", "\uff15%"),
    _limit("arabic-indic-digit", "\u0663"),
    _limit("share-underscore", "1_0%"),
    _limit("share-exponent", "1e1%"),
    _limit("share-nan", "nan%"),
    _limit("huge-count", "9" * 5000),
    _limit("zero", "0"),
    _limit("zero-share", "0%"),
    _limit("over-100-percent", "101%"),
]


@pytest.mark.usefixtures("no_traceback")
@pytest.mark.parametrize("case", BODY_CASES, ids=[c.id for c in BODY_CASES])
def test_unsignable_or_unstorable_json_is_refused(world: World, case: BodyCase) -> None:
    factory = world.factory if case.factory == "world" else world.updating
    content = hostile_json(case.body(world) if callable(case.body) else case.body)
    before = dump_all_tables(world.server)

    response = send(
        world.server,
        "POST",
        factory.path(case.suffix),
        factory.admin_token,
        content=content,
        headers={"Content-Type": "application/json"},
    )

    refused(world, response, case.says, before)


def test_body_cases_have_unique_ids() -> None:
    assert len({c.id for c in BODY_CASES}) == len(BODY_CASES)


@pytest.mark.usefixtures("no_traceback")
def test_plain_input_still_works(world: World) -> None:
    """The rules refuse only what cannot be stored or signed: a target with odd but
    storable unicode, custom metadata 8 levels deep and the extreme 64-bit integers
    publishes; ASCII rollout limits work."""
    custom = {
        "note": "naïve ☃ \U0001f680 \u202e \ufffd",
        "max": 2**63 - 1,
        "min": -(2**63),
        "deep": nested(7),  # 8 levels with custom itself
    }
    published = world.factory.request(
        "POST", "/targets", json={"targets": [target(custom=custom, length=2**63 - 1)]}
    )
    assert published.status_code == 201, published.text
    name = published.json()["added"][0]
    shown = world.factory.request("GET", f"/targets/{name}").json()
    assert shown["custom"]["note"] == custom["note"]
    assert shown["length"] == 2**63 - 1
    for limit, taken in (("1", 1), ("50%", 2), ("2.5%", 1)):
        response = world.factory.request(
            "POST", f"/waves/{WAVE}/rollout", json={"limit": limit, "dry_run": True}
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["devices"]) == taken, (limit, response.json())
    assert world.factory.request("GET", f"/waves/{WAVE}").json()["devices_served"] == 0
