"""Offline (USB) update bundles: `tufa targets offline-update` against a real server, and
python-tuf's ngclient verifying the bundle through `tufa.core.bundle.BundleFetcher` as a
device does (bootstrapped with its channel's version-1 root, every TUF rule applies).

Also the read path's `timestamp.json?tag=T`, which gives a token holder what a
production device of tag T is served.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    LengthOrHashMismatchError,
    RepositoryError,
)
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater, UpdaterConfig

from tests.helpers import (
    Factory,
    assert_error,
    cli_env,
    run_cli,
    send,
    served_metadata,
)
from tests.test_ci_publishing import publish, target, upload
from tests.test_waves import Device, post_wave, prepared, release, start_owner
from tufa.core.archive import OfflineArchive
from tufa.core.bundle import (
    BUNDLE_METADATA_URL,
    BUNDLE_TARGETS_URL,
    BundleError,
    BundleFetcher,
    BundleManifest,
    read_manifest,
)
from tufa.core.metadata import TARGETS, TIMESTAMP

HARDWARE_IDS = ("rpi4", "imx8")
# CI devices of each hardware id are served their own view: a CI bundle is for one.
RPI4 = ("--hardware-id", "rpi4")
TIMESTAMP_PATH = "/repo/prod/metadata/timestamp.json"


# -- builds ---------------------------------------------------------------------------------


def build_bytes(name: str) -> bytes:
    return f"build {name}\n".encode() * 300


def publish_build(
    factory: Factory, version: str, tag: str = "main", cdn: CDN | None = None
) -> dict[str, bytes]:
    """A CI job publishing build `version` of `tag`: an uploaded image per hardware id
    (one name with a '+', which URLs would quote) and, with `cdn`, an external app
    served from there. Returns the published bytes by target name."""
    files = {f"{hw}-image+{tag}-{version}": b"" for hw in HARDWARE_IDS}
    items = []
    for (name, _), hw in zip(files.items(), HARDWARE_IDS, strict=True):
        files[name] = build_bytes(name)
        upload(factory, files[name])
        items.append(target(name, files[name], version=version, hardware_ids=(hw,), tags=(tag,)))
    if cdn is not None:
        name = f"app-{tag}-{version}.tar"
        files[name] = build_bytes(name)
        (cdn.root / name).write_bytes(files[name])
        items.append(
            target(
                name,
                files[name],
                version=version,
                hardware_ids=HARDWARE_IDS,
                tags=(tag,),
                url=f"{cdn.url}/{name}",
            )
        )
    publish(factory, *items)
    return files


@dataclass
class CDN:
    """A static HTTP server on loopback serving external targets; it records the
    Authorization header of each request (the tufa token must never reach it)."""

    root: Path
    url: str = ""
    authorizations: list[str | None] = field(default_factory=list)


@contextmanager
def serve_cdn(root: Path) -> Iterator[CDN]:
    root.mkdir(parents=True)
    cdn = CDN(root)

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            cdn.authorizations.append(self.headers.get("Authorization"))
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    cdn.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield cdn
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# -- the command and a device's verification -------------------------------------------------


def offline_update(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("targets", "offline-update", *args, env=env)


def write_bundle(env: dict[str, str], *args: str) -> BundleManifest:
    """`tufa targets offline-update ARGS --json`; the manifest it prints."""
    done = offline_update(env, *args, "--json")
    assert done.returncode == 0, f"offline-update {' '.join(args)}:\n{done.stderr}"
    return BundleManifest.from_json(done.stdout)


def refused(env: dict[str, str], directory: Path, *args: str, says: str) -> str:
    """The command fails with a message saying `says`, and leaves no bundle behind."""
    done = offline_update(env, *args)
    assert done.returncode == 1, done.stdout
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not partial_of(directory).exists()
    return done.stderr


def rpi4_only(files: dict[str, bytes]) -> dict[str, bytes]:
    """What a CI bundle for hardware id rpi4 holds of a build's files."""
    return {name: data for name, data in files.items() if not name.startswith("imx8")}


def partial_of(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.partial")


def bundle_updater(bundle: Path, where: Path, bootstrap: bytes | None) -> Updater:
    """ngclient over a bundle as a device runs it: its own trusted-metadata directory
    (`where / "trust"`, bootstrapped with `bootstrap` when given), no network."""
    (where / "trust").mkdir(parents=True, exist_ok=True)
    (where / "targets").mkdir(parents=True, exist_ok=True)
    return Updater(
        str(where / "trust"),
        BUNDLE_METADATA_URL,
        str(where / "targets"),
        BUNDLE_TARGETS_URL,
        fetcher=BundleFetcher(bundle),
        config=UpdaterConfig(prefix_targets_with_hash=False),
        bootstrap=bootstrap,
    )


def install(bundle: Path, where: Path, bootstrap: bytes | None) -> dict[str, bytes]:
    """Refresh from the bundle, then fetch every target its manifest lists: the bytes
    ngclient accepted, by name."""
    manifest = read_manifest(bundle)
    updater = bundle_updater(bundle, where, bootstrap)
    updater.refresh()
    found = {}
    for name in manifest.targets:
        info = updater.get_targetinfo(name)
        assert info is not None, f"the bundle's targets metadata lacks {name}"
        found[name] = Path(updater.download_target(info)).read_bytes()
    return found


def metadata_files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (bundle / "metadata").iterdir()}


def assert_bundle_of(bundle: Path, served: dict[str, bytes], roots: list[bytes]) -> None:
    """The bundle's metadata is exactly the served bytes: roots 1..N, the timestamp and
    the consistent-snapshot files it names."""
    snapshot = json.loads(served["snapshot"])["signed"]
    targets = json.loads(served["targets"])["signed"]
    assert metadata_files(bundle) == {
        **{f"{v}.root.json": data for v, data in enumerate(roots, start=1)},
        "timestamp.json": served["timestamp"],
        f"{snapshot['version']}.snapshot.json": served["snapshot"],
        f"{targets['version']}.targets.json": served["targets"],
    }


def get_metadata(factory: Factory, path: str, token: str | None) -> bytes:
    response = send(factory.server, "GET", factory.path(path), token)
    assert response.status_code == 200, f"{path}: {response.text}"
    return response.content


def read_env(factory: Factory, tmp_path: Path) -> dict[str, str]:
    """`tufa` with a token of scope `read`: enough to write a bundle."""
    return cli_env(factory, tmp_path / "read-config.json") | {"TUFA_TOKEN": factory.token("read")}


# -- CI bundles ----------------------------------------------------------------------------


def test_ci_bundle_is_what_ci_devices_are_served_and_verifies_from_the_ci_root(
    factory: Factory, tmp_path: Path
) -> None:
    with serve_cdn(tmp_path / "cdn") as cdn:
        files = publish_build(factory, "7", cdn=cdn)
        publish_build(factory, "8")  # a newer build of the tag: not in the bundle
        publish_build(factory, "7", tag="beta")  # the same build number of another tag
        bundle = tmp_path / "usb" / "update-7"
        bundle.mkdir(parents=True)  # an empty directory will do
        manifest = write_bundle(read_env(factory, tmp_path), "main", "7", str(bundle), *RPI4)
        # Without --hardware-id, a build for two hardware ids is refused, naming them.
        both = offline_update(read_env(factory, tmp_path), "main", "7", str(tmp_path / "x"))
        assert both.returncode == 2
        assert "hardware ids imx8, rpi4" in both.stderr
        assert "--hardware-id" in both.stderr
    # The external target came from its URL, and the token stayed with the tufa server.
    assert cdn.authorizations == [None]

    assert manifest == read_manifest(bundle)
    assert (manifest.format, manifest.factory, manifest.channel) == (1, factory.name, "ci")
    files = rpi4_only(files)
    assert (manifest.tag, manifest.version, manifest.targets) == ("main", "7", tuple(sorted(files)))
    raw = json.loads((bundle / "bundle.json").read_text())
    assert set(raw) == {"format", "factory", "channel", "tag", "version", "created_at", "targets"}
    assert raw["created_at"].endswith("Z")
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "metadata", "targets"]
    assert {p.name: p.read_bytes() for p in (bundle / "targets").iterdir()} == files
    assert_bundle_of(bundle, served_metadata(factory, "ci"), [factory.root_v1("ci")])
    assert list(bundle.parent.iterdir()) == [bundle], "DIR.partial was left behind"

    # A CI device verifies and installs it with no network, from the CI root v1.
    assert install(bundle, tmp_path / "device", factory.root_v1("ci")) == files
    # The bundle is only for its own channel: the production root does not lead to it.
    with pytest.raises(RepositoryError):
        install(bundle, tmp_path / "prod-device", factory.root_v1("prod"))


# -- production bundles --------------------------------------------------------------------


def test_prod_bundle_after_a_wave_completes_is_what_devices_of_the_tag_are_served(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    main = Device.register(factory, tmp_path, "main-1")
    files = publish_build(factory, "5")
    publish_build(factory, "5", tag="beta")
    release(owner, "rel-5", "5")
    publish_build(factory, "6")  # a CI build of the tag, never released
    main.poll()  # an online device of the tag, before the stick arrives

    bundle = tmp_path / "usb" / "prod-5"
    done = offline_update(owner.env, "main", "5", str(bundle), "--prod")
    assert done.returncode == 0, done.stderr
    assert f"Wrote {bundle}: version 5 of tag main, prod channel" in done.stdout
    assert f"tufa-agent install-bundle {bundle}" in done.stdout
    assert "Devices accept it until" in done.stdout
    for name in files:
        assert name in done.stdout
        assert name in done.stderr  # progress, one file at a time

    manifest = read_manifest(bundle)
    assert (manifest.channel, manifest.tag, manifest.version) == ("prod", "main", "5")
    assert manifest.targets == tuple(sorted(files))
    # Exactly what a device of tag main is served, not the channel's default view.
    served = main.served()
    default = get_metadata(factory, TIMESTAMP_PATH, factory.admin_token)
    assert (bundle / "metadata" / "timestamp.json").read_bytes() == served[TIMESTAMP] != default
    snapshot = json.loads(served["snapshot"])["signed"]["version"]
    targets = json.loads(served["targets"])["signed"]["version"]
    assert (bundle / "metadata" / f"{snapshot}.snapshot.json").read_bytes() == served["snapshot"]
    assert (bundle / "metadata" / f"{targets}.targets.json").read_bytes() == served["targets"]

    # A new device verifies it from the production root v1 (offline-signed targets) ...
    assert install(bundle, tmp_path / "new-device", factory.root_v1("prod")) == files
    # ... and so does the device that was online, over what it already trusts.
    shutil.copytree(main.trust_dir, tmp_path / "main-1" / "trust")
    assert install(bundle, tmp_path / "main-1", None) == files


def test_prod_bundle_of_a_version_not_released_to_the_tag_is_refused(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    main = Device.register(factory, tmp_path, "main-1")
    publish_build(factory, "5")
    release(owner, "rel-5", "5")
    publish_build(factory, "6")
    # Wave 6 is signed and served to one device of the tag, but not complete.
    md = prepared(factory, "6")
    for key in OfflineArchive.load(owner.archive).keys_for(TARGETS):
        md.sign(key.prod.signer(), append=True)
    assert post_wave(factory, "rel-6", "6", md).status_code == 201
    rollout = factory.request("POST", "/waves/rel-6/rollout", json={"devices": [main.id]})
    assert rollout.status_code == 200, rollout.text
    assert "rpi4-image+main-6" in main.sees()

    bundle = tmp_path / "usb" / "prod-6"
    message = refused(owner.env, bundle, "main", "6", str(bundle), "--prod", says="version 6")
    assert "is not released to production devices of tag main (released: 5)" in message
    assert "tufa waves complete" in message
    assert not bundle.exists()
    # Not a production build at all, and not a build of the CI channel either.
    refused(owner.env, bundle, "main", "4", str(bundle), "--prod", says="(released: 5)")
    message = refused(owner.env, bundle, "main", "9", str(bundle), *RPI4, says="version 9")
    assert "the CI channel has no target of tag main" in message
    assert "(it has versions 5, 6)" in message
    assert not bundle.exists()
    # The released version still bundles.
    assert write_bundle(owner.env, "main", "5", str(bundle), "--prod").version == "5"


# -- where it is written -------------------------------------------------------------------


def test_a_bundle_is_only_written_to_a_new_or_empty_directory(
    factory: Factory, tmp_path: Path
) -> None:
    files = publish_build(factory, "3")
    env = cli_env(factory, tmp_path / "config.json")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    refused(env, busy, "main", "3", str(busy), *RPI4, says="exists and is not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert (busy / "notes.txt").read_text() == "mine\n"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused(env, a_file, "main", "3", str(a_file), *RPI4, says="is not a directory")

    # What a cut run left is never part of the next bundle.
    bundle = tmp_path / "bundle"
    partial_of(bundle).mkdir()
    (partial_of(bundle) / "stale").write_text("from a cut run\n")
    write_bundle(env, "main", "3", str(bundle), "--quiet", *RPI4)
    assert not partial_of(bundle).exists()
    assert {p.name: p.read_bytes() for p in (bundle / "targets").iterdir()} == rpi4_only(files)
    assert not (bundle / "stale").exists()


def test_a_file_that_is_not_the_published_one_is_never_written(
    factory: Factory, tmp_path: Path
) -> None:
    with serve_cdn(tmp_path / "cdn") as cdn:
        publish_build(factory, "3", cdn=cdn)
        app = cdn.root / "app-main-3.tar"
        data = bytearray(app.read_bytes())
        data[0] ^= 1  # same length, other bytes
        app.write_bytes(bytes(data))
        bundle = tmp_path / "bundle"
        env = cli_env(factory, tmp_path / "config.json")
        refused(
            env, bundle, "main", "3", str(bundle), *RPI4, says="does not match its signed length"
        )
        app.write_bytes(bytes(data) + b"more")
        refused(env, bundle, "main", "3", str(bundle), *RPI4, says="sends more than the")
    assert not bundle.exists()


# -- what devices refuse -------------------------------------------------------------------


def test_a_tampered_bundle_is_refused_by_ngclient(factory: Factory, tmp_path: Path) -> None:
    publish_build(factory, "3")
    bundle = tmp_path / "bundle"
    manifest = write_bundle(
        cli_env(factory, tmp_path / "config.json"), "main", "3", str(bundle), *RPI4
    )
    root_v1 = factory.root_v1("ci")
    name = manifest.targets[0]

    # One byte of a target file flipped: the metadata verifies, the file does not.
    flipped = tmp_path / "flipped"
    shutil.copytree(bundle, flipped)
    data = bytearray((flipped / "targets" / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "targets" / name).write_bytes(bytes(data))
    updater = bundle_updater(flipped, tmp_path / "device-1", root_v1)
    updater.refresh()
    info = updater.get_targetinfo(name)
    assert info is not None
    with pytest.raises(LengthOrHashMismatchError):
        updater.download_target(info)
    assert not (tmp_path / "device-1" / "targets" / name).exists()

    # The targets metadata edited to vouch for the flipped file: its signature breaks.
    edited = tmp_path / "edited"
    shutil.copytree(flipped, edited)
    (targets_file,) = (edited / "metadata").glob("*.targets.json")
    md = Metadata[Targets].from_bytes(targets_file.read_bytes())
    md.signed.targets[name].hashes = {"sha256": hashlib.sha256(data).hexdigest()}
    targets_file.write_bytes(md.to_bytes())
    with pytest.raises(RepositoryError):
        install(edited, tmp_path / "device-2", root_v1)

    # The manifest is not trusted: naming a file the signed targets lack installs nothing.
    renamed = tmp_path / "renamed"
    shutil.copytree(bundle, renamed)
    (renamed / "targets" / name).rename(renamed / "targets" / "evil.bin")
    raw = json.loads((renamed / "bundle.json").read_text())
    raw["targets"] = ["evil.bin"]
    (renamed / "bundle.json").write_text(json.dumps(raw))
    assert read_manifest(renamed).targets == ("evil.bin",)
    updater = bundle_updater(renamed, tmp_path / "device-3", root_v1)
    updater.refresh()
    assert updater.get_targetinfo("evil.bin") is None


def test_read_manifest_names_the_problem_and_the_fix(factory: Factory, tmp_path: Path) -> None:
    publish_build(factory, "3")
    bundle = tmp_path / "bundle"
    manifest = write_bundle(
        cli_env(factory, tmp_path / "config.json"), "main", "3", str(bundle), *RPI4
    )
    assert BundleManifest.from_json(manifest.to_json()) == manifest

    with pytest.raises(BundleError, match="not a directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(BundleError, match=r"holds no bundle\.json"):
        read_manifest(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "targets" / manifest.targets[0]).unlink()
    with pytest.raises(
        BundleError, match=re.escape(f"incomplete (missing targets/{manifest.targets[0]})")
    ):
        read_manifest(broken)
    for change, says in (
        ({"format": 2}, "format 2"),
        ({"channel": "beta"}, "neither 'ci' nor 'prod'"),
        ({"created_at": "yesterday"}, "not a UTC time"),
        ({"targets": ["../etc/passwd"]}, "'targets' must be a non-empty list"),
        ({"version": None}, "'version' must be a non-empty string"),
    ):
        raw = manifest.to_dict() | change
        (broken / "bundle.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=says) as error:  # a BundleError is a ValueError
            read_manifest(broken)
        assert isinstance(error.value, BundleError)
        assert "offline-update" in str(error.value) or "update tufa" in str(error.value)
    (broken / "bundle.json").write_text("{")
    with pytest.raises(BundleError, match="not JSON"):
        read_manifest(broken)


def test_bundle_fetcher_serves_only_files_of_the_bundle(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "1.root.json").write_bytes(b"root")
    (tmp_path / "secret").write_bytes(b"not in the bundle")
    fetcher = BundleFetcher(tmp_path)
    assert fetcher.download_bytes(f"{BUNDLE_METADATA_URL}1.root.json", 10) == b"root"
    # What ngclient's root-chain walk takes for "no newer root".
    with pytest.raises(DownloadHTTPError) as missing:
        fetcher.download_bytes(f"{BUNDLE_METADATA_URL}2.root.json", 10)
    assert missing.value.status_code == 404
    for url in (
        f"{BUNDLE_METADATA_URL}../secret",
        f"{BUNDLE_METADATA_URL}..",
        f"{BUNDLE_TARGETS_URL}sub/file",
        "https://example.com/1.root.json",
    ):
        with pytest.raises(DownloadError, match="bundle") as refused_url:
            fetcher.download_bytes(url, 100)
        assert not isinstance(refused_url.value, DownloadHTTPError), url


# -- root rotations ------------------------------------------------------------------------


def test_a_bundle_carries_the_root_chain_and_verifies_from_root_1(
    factory: Factory, tmp_path: Path
) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    root_v1 = factory.root_v1("ci")
    owner.tufa("keys", "rotate-root", str(owner.archive))
    files = publish_build(factory, "3")
    bundle = tmp_path / "bundle"
    write_bundle(owner.env, "main", "3", str(bundle), *RPI4)

    root_v2 = get_metadata(factory, "/repo/ci/metadata/2.root.json", factory.admin_token)
    assert_bundle_of(bundle, served_metadata(factory, "ci"), [root_v1, root_v2])
    updater = bundle_updater(bundle, tmp_path / "device", root_v1)
    updater.refresh()
    assert updater._trusted_set.root == Metadata[Root].from_bytes(root_v2).signed
    assert install(bundle, tmp_path / "device-2", root_v1) == rpi4_only(files)


# -- the read path's ?tag= -----------------------------------------------------------------


def test_timestamp_of_a_tag_for_token_holders_only(factory: Factory, tmp_path: Path) -> None:
    owner = start_owner(factory, tmp_path / "owner")
    main = Device.register(factory, tmp_path, "main-1")
    beta = Device.register(factory, tmp_path, "beta-1", tag="beta")
    publish_build(factory, "5")
    release(owner, "rel-5", "5")
    admin = factory.admin_token

    default = get_metadata(factory, TIMESTAMP_PATH, admin)
    tagged = get_metadata(factory, f"{TIMESTAMP_PATH}?tag=main", admin)
    assert tagged == main.served()[TIMESTAMP] != default
    for scope in ("read", "ci"):
        assert get_metadata(factory, f"{TIMESTAMP_PATH}?tag=main", factory.token(scope)) == tagged
    # A tag with no release yet is served the default view, as its devices are.
    assert get_metadata(factory, f"{TIMESTAMP_PATH}?tag=beta", admin) == default
    assert beta.served()[TIMESTAMP] == default

    # Devices keep their own view whatever they ask for.
    assert get_metadata(factory, f"{TIMESTAMP_PATH}?tag=main", beta.credential) == default
    assert get_metadata(factory, f"{TIMESTAMP_PATH}?tag=beta", main.credential) == tagged
    main.poll()
    beta.poll()

    # CI views are per hardware id and tag: a tag alone names none. Versioned files name
    # one file in every view.
    ci = factory.path("/repo/ci/metadata/timestamp.json?tag=main")
    assert_error(send(factory.server, "GET", ci, admin), 400, "bad_request", "?hardware_id=")
    root = "/repo/prod/metadata/1.root.json"
    assert get_metadata(factory, f"{root}?tag=main", admin) == factory.root_v1("prod")

    response = send(factory.server, "GET", factory.path(f"{TIMESTAMP_PATH}?tag=main"), admin)
    assert response.headers["cache-control"].startswith("private")
    bad = send(factory.server, "GET", factory.path(f"{TIMESTAMP_PATH}?tag=no%20such"), admin)
    assert_error(bad, 400, "bad_request", "is not a label")

    # Anonymous readers get the default view and no tag's.
    assert factory.request("PATCH", json={"anonymous_read": True}).status_code == 200
    assert get_metadata(factory, TIMESTAMP_PATH, None) == default
    anonymous = send(factory.server, "GET", factory.path(f"{TIMESTAMP_PATH}?tag=main"))
    assert_error(anonymous, 401, "unauthorized", "needs a token")
