"""Benchmark: CI publishing into a large CI channel, against python-tuf's default path.

* bulk: N external targets published in batches (the API, as `tufa targets add --batch`
  sends them), 100 per (hardware id, tag) like a CI history of many boards, in build
  order; prints the cost per batch against the number already published, and the
  overall rate;
* one target published into the channel at each size given, timed from the request to
  the moment the new `timestamp.json` of its view is served (median of several);
* baseline, in the same run and at the same sizes: python-tuf's Metadata API default
  path for a flat repository of that many targets (load targets.json, add one target,
  sign, write; then snapshot and timestamp likewise);
* what a device downloads: python-tuf's ngclient with default settings, as a device of
  one (hardware id, tag), refreshing after a publish; the bytes it fetched.

Every answer is checked (status, and the published target in the served metadata)
before anything is timed.

Usage: .venv/bin/python bench/publish.py [--targets 100000] [--batch 1000]
           [--sizes 1000,100000] [--db URL]
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater

from tufa.core.fetcher import BearerFetcher
from tufa.demo.local_server import LocalServer

PER_VIEW = 100
FACTORY = "bench"


def item(i: int) -> dict[str, Any]:
    """Target i: the (i // PER_VIEW)-th board's build i, an external file."""
    return {
        "name": f"board{i // PER_VIEW}-image-{i}",
        "version": str(i),
        "hardware_ids": [f"board{i // PER_VIEW}"],
        "tags": ["main"],
        "url": f"https://cdn.example.com/builds/{i}.img",
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "length": 1_000_000 + i,
    }


class Api:
    def __init__(self, server: LocalServer, token: str) -> None:
        self.client = httpx.Client(
            base_url=f"{server.url}/api/v1/factories/{FACTORY}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        )

    def publish(self, items: list[dict[str, Any]]) -> int:
        response = self.client.post("/targets", json={"targets": items})
        assert response.status_code == 201, response.text
        added = response.json()["added"]
        assert sorted(added) == sorted(i["name"] for i in items), added
        version: int = response.json()["targets_version"]
        return version

    def view_timestamp(self, hardware_id: str) -> dict[str, Any]:
        response = self.client.get(
            "/repo/ci/metadata/timestamp.json", params={"hardware_id": hardware_id, "tag": "main"}
        )
        assert response.status_code == 200, response.text
        timestamp: dict[str, Any] = response.json()
        return timestamp

    def listed(self, hardware_id: str) -> set[str]:
        """The targets the view of `hardware_id` serves, followed from its timestamp."""
        timestamp = self.view_timestamp(hardware_id)["signed"]
        snapshot = self.client.get(
            f"/repo/ci/metadata/{timestamp['meta']['snapshot.json']['version']}.snapshot.json"
        ).json()["signed"]
        version = snapshot["meta"]["targets.json"]["version"]
        targets = self.client.get(f"/repo/ci/metadata/{version}.targets.json")
        assert targets.status_code == 200, targets.text
        return set(targets.json()["signed"]["targets"])


def bulk(api: Api, start: int, stop: int, batch: int, log_every: int) -> float:
    """Publish targets start..stop-1 in batches; return targets per second."""
    began = time.perf_counter()
    for first in range(start, stop, batch):
        items = [item(i) for i in range(first, min(first + batch, stop))]
        t0 = time.perf_counter()
        api.publish(items)
        cost = time.perf_counter() - t0
        if (first // batch) % log_every == 0:
            print(f"  batch at N={first:>9,}: {cost * 1000:7.1f} ms ({len(items) / cost:,.0f}/s)")
    return (stop - start) / (time.perf_counter() - began)


def one_publish(api: Api, i: int, runs: int) -> float:
    """Median ms from a one-target publish to its view's new timestamp being served."""
    times = []
    for run in range(runs):
        target = item(i + run) | {"name": f"single-{i}-{run}", "hardware_ids": ["single"]}
        before = api.view_timestamp("single")["signed"]["version"]
        t0 = time.perf_counter()
        api.publish([target])
        while api.view_timestamp("single")["signed"]["version"] <= before:
            pass
        times.append((time.perf_counter() - t0) * 1000)
        assert target["name"] in api.listed("single")
    return statistics.median(times)


def python_tuf_publish(tmp: Path, size: int, runs: int) -> float:
    """Median ms for python-tuf's default path to add one target to a flat repository of
    `size` targets and re-sign targets, snapshot and timestamp, files on disk."""
    signer = CryptoSigner.generate_ed25519()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    repo = tmp / f"python-tuf-{size}"
    repo.mkdir()
    entries = {}
    for i in range(size):
        spec = item(i)
        custom = {
            "version": spec["version"],
            "hardwareIds": spec["hardware_ids"],
            "tags": spec["tags"],
            "url": spec["url"],
        }
        entries[spec["name"]] = TargetFile(
            spec["length"], {"sha256": spec["sha256"]}, spec["name"], {"custom": custom}
        )
    targets = Metadata(Targets(expires=expires, targets=entries))
    targets.sign(signer)
    targets.to_file(str(repo / "targets.json"))
    snapshot = Metadata(Snapshot(expires=expires))
    snapshot.sign(signer)
    snapshot.to_file(str(repo / "snapshot.json"))
    timestamp = Metadata(Timestamp(expires=expires))
    timestamp.sign(signer)
    timestamp.to_file(str(repo / "timestamp.json"))
    times = []
    for run in range(runs):
        t0 = time.perf_counter()
        md = Metadata[Targets].from_file(str(repo / "targets.json"))
        spec = item(size + run)
        md.signed.targets[spec["name"]] = TargetFile(
            spec["length"], {"sha256": spec["sha256"]}, spec["name"]
        )
        md.signed.version += 1
        md.sign(signer)
        md.to_file(str(repo / "targets.json"))
        snap = Metadata[Snapshot].from_file(str(repo / "snapshot.json"))
        snap.signed.meta["targets.json"] = MetaFile(md.signed.version)
        snap.signed.version += 1
        snap.sign(signer)
        snap.to_file(str(repo / "snapshot.json"))
        stamp = Metadata[Timestamp].from_file(str(repo / "timestamp.json"))
        stamp.signed.snapshot_meta = MetaFile(snap.signed.version)
        stamp.signed.version += 1
        stamp.sign(signer)
        stamp.to_file(str(repo / "timestamp.json"))
        times.append((time.perf_counter() - t0) * 1000)
        check = Metadata[Targets].from_file(str(repo / "targets.json")).signed
        assert len(check.targets) == size + run + 1
    return statistics.median(times)


class CountingFetcher(BearerFetcher):
    """A device's fetcher that counts the bytes it downloads."""

    downloaded = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        for chunk in super()._fetch(url):
            self.downloaded += len(chunk)
            yield chunk


def device_refresh(api: Api, server: LocalServer, tmp: Path, i: int) -> tuple[int, int]:
    """Bytes and targets a default ngclient of board0/main fetches after a publish."""
    device = {"name": "bench-device", "hardware_id": "board0", "tag": "main", "channel": "ci"}
    registered = api.client.post("/devices", json=device)
    assert registered.status_code == 201, registered.text
    credential = registered.json()["credential"]
    root = api.client.get("/repo/ci/metadata/1.root.json")
    assert root.status_code == 200
    trust = tmp / "device"
    trust.mkdir()
    base = f"{server.url}/api/v1/factories/{FACTORY}/repo/ci/metadata/"
    fetcher = CountingFetcher(credential)
    Updater(str(trust), base, fetcher=fetcher, bootstrap=root.content).refresh()
    api.publish([item(i) | {"name": "board0-late", "hardware_ids": ["board0"]}])
    fetcher.downloaded = 0
    updater = Updater(str(trust), base, fetcher=fetcher, bootstrap=root.content)
    updater.refresh()
    assert updater.get_targetinfo("board0-late") is not None
    return fetcher.downloaded, len(updater._trusted_set.targets.targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--sizes", default="1000,100000", help="where to time one publish")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--db", help="database URL (default: SQLite in a temporary directory)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    assert sizes[-1] <= args.targets, "--sizes must not exceed --targets"
    with tempfile.TemporaryDirectory(prefix="tufa-bench-publish-") as tmp_name:
        tmp = Path(tmp_name)
        operator = f"tufa_{secrets.token_urlsafe(24)}"
        with LocalServer(tmp / "server", operator_token=operator, db_url=args.db) as server:
            created = httpx.post(
                f"{server.url}/api/v1/factories",
                json={"name": FACTORY},
                headers={"Authorization": f"Bearer {operator}"},
            )
            assert created.status_code == 201, created.text
            api = Api(server, created.json()["admin_token"])
            one: dict[int, float] = {}
            done, rates = 0, []
            log_every = max(1, args.targets // args.batch // 20)
            print(f"bulk: {args.targets:,} targets, batches of {args.batch:,}")
            for size in [*sizes, args.targets]:
                if size > done:
                    rates.append((size - done, bulk(api, done, size, args.batch, log_every)))
                    done = size
                if size in sizes and size not in one:
                    one[size] = one_publish(api, 10**9 + size, args.runs)
            overall = sum(n for n, _ in rates) / sum(n / rate for n, rate in rates)
            print(f"bulk overall: {overall:,.0f} targets/s")
            downloaded, listed = device_refresh(api, server, tmp, 2 * 10**9)
        print()
        print("| case | N | tufa | python-tuf default path | ratio |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for size in sizes:
            baseline = None if args.skip_baseline else python_tuf_publish(tmp, size, 3)
            ratio = f"{baseline / one[size]:.1f}x faster" if baseline else ""
            shown = f"{baseline:.1f} ms" if baseline else "skipped"
            print(f"| one-target publish until served | {size:,} | {one[size]:.1f} ms ", end="")
            print(f"| {shown} | {ratio} |")
        growth = one[sizes[-1]] / one[sizes[0]]
        print(f"| one publish at {sizes[-1]:,} vs at {sizes[0]:,} | | {growth:.2f}x | | |")
        print(
            f"| device refresh after a publish (ngclient defaults), {listed} targets in its view | "
            f"{args.targets:,} | {downloaded:,} bytes | | |"
        )


if __name__ == "__main__":
    main()
