"""Fuzzing every route: no input reaches a 5xx, and a refused request changes nothing.

The routes are the server's own table (`tufa.server.app.ROUTES`), so a route added
later is fuzzed as soon as it has a spec here; until then
`test_every_route_has_a_fuzz_spec` fails. A spec is a valid request of the route (its
body, who calls it, its query parameters); hypothesis turns it hostile part by part:
path and query parameters, any value or key of the JSON body, or the body's raw bytes,
become NUL characters, lone surrogates, huge integers, fractions, NaN, Infinity, deep
nesting, values of the wrong type, long strings or odd unicode. Each request goes, with
the caller's real credential (the factory's admin token, the operator token, a device
credential on device routes), to a real server process on each backend, with a world
behind it (tests/test_hostile_input.py: a released build, devices, a group, an active
wave, an open root update). Any 5xx fails, and so does a traceback in the server log,
or any change of the database after a 4xx.

Examples are derandomized and counted per route, so CI runs the same requests every
time and the module stays within about a minute on two cores.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.conftest import BACKENDS
from tests.helpers import Server, db_rows, dump_all_tables, path_params, send, served_routes
from tests.test_hostile_input import (
    BLOB,
    GROUP,
    NEXT,
    PARAM_VALUES,
    RELEASED,
    World,
    build_world,
    target,
    valid_params,
)
from tests.test_waves import image, prepared
from tufa.server.webhooks import webhook_deliveries

# One worker runs the module (`--dist loadgroup`, as `make test` does): one server pair.
pytestmark = pytest.mark.xdist_group("fuzz-routes")
EXAMPLES_PER_ROUTE = 25
F = "/api/v1/factories/{factory}"
SHA = "ab" * 32
AT = "2026-12-01T10:00:00Z"
SIGNATURE = {"keyid": SHA, "sig": "cd" * 64}
ADMIN, OPERATOR, ANONYMOUS = "admin", "operator", "anonymous"
CI_DEVICE, PROD_DEVICE = "ci-device", "prod-device"
READERS = (ADMIN, CI_DEVICE, PROD_DEVICE, ANONYMOUS)
DEVICES = (CI_DEVICE, PROD_DEVICE)


@dataclass(frozen=True)
class Spec:
    """A valid request of one route, for hypothesis to turn hostile."""

    body: Callable[[FuzzWorld], Any] | None = None  # its JSON body; None: sends none
    callers: tuple[str, ...] = (ADMIN,)
    query: tuple[str, ...] = ()  # the query parameters it reads
    raw: bool = False  # the body is bytes (a blob upload), not JSON
    # Path parameters other than PARAM_VALUES's: a device a route may destroy, say.
    params: Callable[[FuzzWorld], dict[str, str]] | None = None


class FuzzWorld:
    """The hostile-input world, with what valid requests of every route need.

    Not a dataclass: hypothesis prints a failing example's arguments, and a dataclass
    field by field (its roots run to pages)."""

    def __init__(self, world: World) -> None:
        self.world = world
        # The channels' current roots, as a root update stages them.
        self.roots: dict[str, Any] = {}
        for channel in ("ci", "prod"):
            root = json.loads(world.factory.root_v1(channel))
            root["signed"]["version"] += 1
            self.roots[channel] = root
        # A wave's production targets for build NEXT, unsigned.
        self.wave_targets = prepared(world.factory, NEXT).to_dict()
        self.credentials = {
            ADMIN: world.factory.admin_token,
            OPERATOR: world.server.operator_token,
            CI_DEVICE: world.ci_device["credential"],
            PROD_DEVICE: world.prod_devices[0]["credential"],
            ANONYMOUS: None,
        }
        # For the routes that revoke or delete a device: the others keep theirs.
        self.doomed_device = world.factory.register_device("ci")["id"]
        # For the route that deletes a webhook: the world's own hook stays.
        hook = {"url": HOOK_URL, "events": ["keys.expiring"]}
        self.doomed_hook = world.factory.request("POST", "/webhooks", json=hook).json()["id"]
        # For the route that deletes a group: the world's own group stays.
        self.doomed_group = "doomed"
        created = world.factory.request("POST", "/device-groups", json={"name": self.doomed_group})
        assert created.status_code == 201, created.text
        # The database as the last example left it: one dump per example, not two.
        self.last_dump: dict[str, list[tuple[Any, ...]]] | None = None
        settle_the_outbox(world.server)

    def __repr__(self) -> str:
        return f"<world of factory {self.world.factory.name} on {self.world.server.backend}>"


# Where the webhooks the fuzzed requests add point: to no receiver, and for an event that
# no fuzzed request makes due, so that nothing is ever delivered to them.
HOOK_URL = "http://127.0.0.1:9/fuzzed"


def settle_the_outbox(server: Server) -> None:
    """Wait until the deliverer has sent what is due (to the world's receiver, which
    takes everything): its writes after a request would look like the request's."""
    deadline = time.monotonic() + 20
    due = select(func.count()).where(webhook_deliveries.c.next_attempt_at.is_not(None))
    while db_rows(server, due)[0][0]:
        assert time.monotonic() < deadline, "webhook deliveries stayed queued"
        time.sleep(0.05)


SPECS: dict[tuple[str, str], Spec] = {
    ("GET", "/healthz"): Spec(callers=(ANONYMOUS,)),
    ("GET", "/readyz"): Spec(callers=(ANONYMOUS,)),
    ("GET", "/metrics"): Spec(callers=(OPERATOR,)),
    ("GET", "/openapi.json"): Spec(callers=(ANONYMOUS,)),
    ("POST", "/api/v1/factories"): Spec(lambda _: {"name": "fuzzed"}, (OPERATOR,)),
    ("GET", "/api/v1/factories"): Spec(callers=(OPERATOR,)),
    ("GET", F): Spec(),
    ("PATCH", F): Spec(lambda _: {"anonymous_read": True}),
    ("GET", f"{F}/keys/archive"): Spec(),
    ("POST", f"{F}/keys/archive/confirm"): Spec(lambda _: {"sha256": SHA}),
    ("POST", f"{F}/tokens"): Spec(
        lambda _: {"scopes": ["read"], "description": "fuzz", "expires_in_seconds": 60}
    ),
    ("GET", f"{F}/tokens"): Spec(),
    ("DELETE", f"{F}/tokens/{{token_id}}"): Spec(),
    ("POST", f"{F}/devices"): Spec(
        lambda _: {"name": "fuzzed", "hardware_id": "rpi4", "tag": "main", "channel": "prod"}
    ),
    ("GET", f"{F}/devices"): Spec(query=("stale",)),
    ("GET", f"{F}/devices/{{device}}"): Spec(),
    ("POST", f"{F}/devices/{{device}}/revoke"): Spec(params=lambda w: {"device": w.doomed_device}),
    ("DELETE", f"{F}/devices/{{device}}"): Spec(params=lambda w: {"device": w.doomed_device}),
    ("GET", f"{F}/device-credential"): Spec(callers=DEVICES),
    # A rotated credential becomes the only one at its first use, which never comes here.
    ("POST", f"{F}/device-credential"): Spec(callers=DEVICES),
    # The operator's only token would die at the first valid request: its input rules are
    # what can be fuzzed, so an admin token asks (and is refused after them).
    ("POST", "/api/v1/operator-token"): Spec(callers=(ADMIN,)),
    ("POST", f"{F}/device-reports"): Spec(
        lambda _: {
            "installed": {"version": RELEASED, "target": image(RELEASED), "sha256": SHA},
            "events": [
                {
                    "id": "e-1",
                    "at": AT,
                    "kind": "installed",
                    "version": RELEASED,
                    "target": image(RELEASED),
                    "detail": "ok",
                },
            ],
            "timestamp": {"version": 3, "expires": AT},
            "poll_interval": 300,
        },
        DEVICES,
    ),
    ("GET", f"{F}/repo/{{channel}}/metadata/{{filename}}"): Spec(callers=READERS, query=("tag",)),
    ("GET", f"{F}/repo/{{channel}}/targets/{{filename}}"): Spec(callers=READERS),
    ("POST", f"{F}/keys/updates"): Spec(lambda _: {"message": "rotate"}),
    ("GET", f"{F}/keys/updates"): Spec(),
    ("DELETE", f"{F}/keys/updates"): Spec(),
    ("PUT", f"{F}/keys/updates/staged"): Spec(lambda w: {"roots": w.roots, "prod_targets": {}}),
    ("POST", f"{F}/keys/updates/online-keys"): Spec(lambda _: {"roles": ["timestamp"]}),
    ("POST", f"{F}/keys/updates/signatures"): Spec(
        lambda _: {"roots": {"ci": [SIGNATURE]}, "prod_targets": {"main": [SIGNATURE]}}
    ),
    ("POST", f"{F}/keys/updates/apply"): Spec(),
    ("PUT", f"{F}/blobs/{{sha256}}"): Spec(raw=True),
    ("POST", f"{F}/targets"): Spec(
        lambda _: {"targets": [target(name="fuzzed", custom={"build": 7})]}
    ),
    ("GET", f"{F}/targets"): Spec(query=("channel", "tag", "hardware_id")),
    ("POST", f"{F}/targets/check"): Spec(lambda _: {"targets": [target(name="checked")]}),
    ("POST", f"{F}/targets/prune"): Spec(lambda _: {"keep": 5}),
    ("POST", f"{F}/targets/delete"): Spec(lambda _: {"names": ["never-published"]}),
    ("GET", f"{F}/targets/{{name}}"): Spec(),
    ("POST", f"{F}/waves/prepare"): Spec(
        lambda _: {"tag": "main", "version": NEXT, "prune": [], "expires_days": 30}
    ),
    ("POST", f"{F}/waves"): Spec(
        lambda w: {
            "name": "w-2",
            "tag": "main",
            "version": NEXT,
            "prune": [],
            "targets": w.wave_targets,
        }
    ),
    ("GET", f"{F}/waves"): Spec(),
    ("GET", f"{F}/waves/{{name}}"): Spec(),
    ("POST", f"{F}/waves/{{name}}/signatures"): Spec(lambda _: {"signatures": [SIGNATURE]}),
    ("POST", f"{F}/waves/{{name}}/rollout"): Spec(
        lambda _: {"group": GROUP, "limit": "1", "dry_run": True}
    ),
    ("POST", f"{F}/waves/{{name}}/complete"): Spec(),
    ("POST", f"{F}/waves/{{name}}/cancel"): Spec(),
    ("POST", f"{F}/waves/{{name}}/resume"): Spec(),
    ("POST", f"{F}/device-groups"): Spec(lambda _: {"name": "g-2"}),
    ("GET", f"{F}/device-groups"): Spec(),
    ("POST", f"{F}/device-groups/{{group}}/devices"): Spec(
        lambda w: {"devices": [w.world.prod_devices[0]["name"]]}
    ),
    ("GET", f"{F}/device-groups/{{group}}"): Spec(),
    ("DELETE", f"{F}/device-groups/{{group}}"): Spec(params=lambda w: {"group": w.doomed_group}),
    # Whatever a valid removal takes out of the group, the adding spec puts back.
    ("POST", f"{F}/webhooks"): Spec(lambda _: {"url": HOOK_URL, "events": ["keys.expiring"]}),
    ("GET", f"{F}/webhooks"): Spec(),
    ("DELETE", f"{F}/webhooks/{{hook_id}}"): Spec(params=lambda w: {"hook_id": w.doomed_hook}),
    ("POST", f"{F}/webhooks/{{hook_id}}/test"): Spec(),
    ("GET", f"{F}/webhooks/{{hook_id}}/deliveries"): Spec(),
    ("DELETE", f"{F}/device-groups/{{group}}/devices"): Spec(
        lambda w: {"devices": [w.world.prod_devices[0]["name"]]}
    ),
}

ROUTES = served_routes()


def test_every_route_has_a_fuzz_spec() -> None:
    """A new route needs a spec here (and its path parameters a value in PARAM_VALUES)."""
    assert set(SPECS) == set(ROUTES), "routes without a spec, or specs without a route"
    unknown = {p for _, path in ROUTES for p in path_params(path)} - set(PARAM_VALUES)
    assert not unknown, f"path parameters without a value in PARAM_VALUES: {unknown}"


# -- hostile values -------------------------------------------------------------------------

# Long enough to hurt, short enough that three of them, percent-encoded, stay within
# the 64 KiB of URL that httpx sends.
ODD_DIGITS_AND_LONG = [
    "\uff19", "1_000", " 5", "5 ", "\u0663", "\u00b2", "1e999", "-1", "0", "NaN",
    "a" * 300, "\u00e9" * 2000, "9" * 5000, "x" * 15_000,
]  # fmt: skip
ODD_UNICODE_AND_INJECTIONS = [
    "\ufeff", "\u202e", "\ufffd", "\uffff", "\U0010ffff", "\U0001f680", "e\u0301", "\u2028",
    "\r\n", "\x1b[31m", "\x7f", "\x01", " ", "", "../../etc/passwd", "a/b", "%00", "%2e%2e",
    ".", "..", "'; DROP TABLE factories; --", "${jndi:ldap://x}", "<script>", "null", "[]",
    "main", "prod", "ci", "timestamp", "w-1", "g-1", "image-1", SHA,
]  # fmt: skip
EDGE_NUMBERS = [
    math.nan, math.inf, -math.inf, 0.5, 1.0, -0.0, 1e308, 5e-324,
    2**63, -(2**63) - 1, 10**40, 2**63 - 1, -(2**63), 2**31, 2**53 + 1, -1, 0,
]  # fmt: skip
WRONG_TYPES = [None, True, False, 0, 1, "", [], {}, [[1, "a"]], {"a": 1}]

# Each hostile value is drawn class first, so that every class turns up within a few
# examples; the most hostile class comes first, as hypothesis starts from the first.
texts = st.one_of(
    st.sampled_from(["a\x00b", "\x00", "main\x00"]),
    st.sampled_from(["a\ud800b", "\udfff", "\ud83d"])
    | st.text(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(ODD_DIGITS_AND_LONG),
    st.sampled_from(ODD_UNICODE_AND_INJECTIONS),
    st.text(st.characters(exclude_categories=()), max_size=20),  # surrogates too
)


@dataclass(frozen=True)
class Deep:
    """Arrays nested `depth` levels, spliced into the body as text (json.dumps would
    recurse too deep to write them)."""

    depth: int


hostile_values = st.one_of(
    texts,
    st.sampled_from(EDGE_NUMBERS) | st.floats(),
    st.sampled_from(WRONG_TYPES),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | texts,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3)
        ),
        max_leaves=8,
    ),
    # Bodies also carry values longer than any URL may be (httpx sends at most 64 KiB).
    st.sampled_from([Deep(65), Deep(2000), Deep(200_000), "x" * 100_000, ["x" * 1000] * 2000]),
)
RAW_BODIES = [
    b'{"a": "\\u0000"}', b'{"a": "\\ud800"}', b'{"a": NaN}', b'{"a": 1e400}',
    b'{"a": 1' + b"0" * 5000 + b"}", b"", b"{", b"[", b"null", b"[]", b'"x"', b"\xff\xfe",
    b"\x00", b'{"a": -0}', b'{"a": 1, "a": 2}', b'{"__proto__": {}}', b"\xef\xbb\xbf{}",
]  # fmt: skip
raw_bodies = st.sampled_from(RAW_BODIES) | st.binary(max_size=64)


def encode(value: Any) -> bytes:
    """JSON as any client can send it: NaN and Infinity as words, lone surrogates as
    escapes, and Deep values spliced in as text."""
    deep: list[Deep] = []

    def default(item: Any) -> str:
        assert isinstance(item, Deep)
        deep.append(item)
        return f"@@deep-{len(deep) - 1}@@"

    text = json.dumps(value, default=default)
    for index, item in enumerate(deep):
        text = text.replace(f'"@@deep-{index}@@"', "[" * item.depth + "]" * item.depth)
    return text.encode()


def locations(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value in `value`, itself first."""
    yield at
    if isinstance(value, dict | list):
        children = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in children:
            yield from locations(child, (*at, key))


def replaced(value: Any, at: tuple[Any, ...], new: Any) -> Any:
    if not at:
        return new
    head, *rest = at
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = replaced(value[head], tuple(rest), new)
    return copy


@st.composite
def hostile_body(draw: st.DrawFn, valid: Any) -> bytes:
    """`valid` with one value replaced or one key added, or raw bytes."""
    how = draw(st.sampled_from(["replace", "add a key", "raw"]))
    if how == "raw":
        return draw(raw_bodies)
    at = draw(st.sampled_from(list(locations(valid))))
    node = valid
    for key in at:
        node = node[key]
    if how == "add a key" and isinstance(node, dict):
        return encode(replaced(valid, at, {**node, draw(texts): draw(hostile_values)}))
    return encode(replaced(valid, at, draw(hostile_values)))


class FuzzRequest:
    """One request; not a dataclass, so that hypothesis prints it short."""

    def __init__(self, method: str, url: str, caller: str, content: bytes | None) -> None:
        self.method, self.url, self.caller, self.content = method, url, caller, content

    def __repr__(self) -> str:
        body = self.content if self.content is None or len(self.content) < 500 else b"..."
        return f"<{self.method} {self.url[:500]} as {self.caller}, body {body!r}>"


def url_part(text: str) -> str:
    """`text` percent-encoded the way a client sends any string, surrogates included."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def hostile_request(draw: st.DrawFn, fuzz: FuzzWorld, method: str, path: str) -> FuzzRequest:
    """A valid request of the route with one part hostile: a path parameter, a query
    parameter, or the body (the valid body with one value or key changed, or raw bytes)."""
    spec = SPECS[method, path]
    values = valid_params(fuzz.world, path) | (spec.params(fuzz) if spec.params else {})
    body = None if spec.body is None else spec.body(fuzz)
    content = b"" if spec.raw else None if body is None else encode(body)
    query: list[tuple[str, str]] = []
    part = draw(st.sampled_from([*values, "query", "body"]))
    if part in values:
        values[part] = draw(texts)
    elif part == "query":
        names = st.sampled_from([*spec.query, "x", "\x00"])
        query = draw(st.lists(st.tuples(names, texts), min_size=1, max_size=3))
    elif spec.raw:
        content = draw(st.sampled_from([BLOB]) | raw_bodies)
    elif body is None:
        content = draw(raw_bodies | hostile_values.map(encode))
    else:
        content = draw(hostile_body(body))
    url = path.format(**{name: url_part(value) for name, value in values.items()})
    if query:
        url += "?" + "&".join(f"{url_part(name)}={url_part(value)}" for name, value in query)
    return FuzzRequest(method, url, draw(st.sampled_from(spec.callers)), content)


# -- the servers ----------------------------------------------------------------------------


class LogWatch:
    """What the server logged since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def new(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        return data.decode(errors="replace")


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz(
    request: pytest.FixtureRequest,
    make_server: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
) -> FuzzWorld:
    """A server of its own per backend (no re-signing: its writes would look like a
    refused request's), with the hostile-input world in it."""
    server = make_server(request.param, extra_args=("--no-resign",))
    return FuzzWorld(build_world(server, tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def log(fuzz: FuzzWorld) -> LogWatch:
    return LogWatch(fuzz.world.server.local.log_path)


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_no_input_reaches_a_5xx_and_refusals_change_nothing(
    fuzz: FuzzWorld, log: LogWatch, method: str, path: str, data: st.DataObject
) -> None:
    server = fuzz.world.server
    sent = data.draw(hostile_request(fuzz, method, path))
    log.new()
    before = fuzz.last_dump if fuzz.last_dump is not None else dump_all_tables(server)
    fuzz.last_dump = None

    try:
        response = send(
            server,
            sent.method,
            sent.url,
            fuzz.credentials[sent.caller],
            content=sent.content,
            headers={"Content-Type": "application/json"},
        )
    except httpx.RemoteProtocolError as e:  # the server hung up: as bad as a 500
        pytest.fail(f"the server dropped the connection: {e}")
    if response.is_success:
        settle_the_outbox(server)  # a registration or a test delivery queued something
    after = fuzz.last_dump = dump_all_tables(server)

    assert response.status_code < 500, f"{response.status_code} {response.text[:2000]}"
    logged = log.new()
    assert "Traceback" not in logged, logged
    if response.is_client_error:
        assert after == before, f"refused ({response.text[:500]}) but changed the database"
