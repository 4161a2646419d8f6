"""Benchmark: a fleet polling two server processes on one PostgreSQL while CI publishes.

* two `tufa-server run` processes (`--processes`) on one PostgreSQL database (replicas,
  as behind a load balancer), each polled by its own wrk (one thread), whose Lua script
  rotates through its share of the fleet's device credentials, one a request;
* 2,000 real CI devices registered through the API, spread over four hardware ids, so
  four CI views (ADR 0016);
* meanwhile CI publishes a new build (one target per hardware id) once a second,
  through each process in turn, for the whole run;
* afterwards every device refreshes with python-tuf's ngclient (default settings, the
  device's own credential, through the process that polled it) and must find the last
  build for its hardware id: every device ends on the newest build.

Prints requests/s, p50/p99/max latency and every error wrk counted (connect, read,
write, timeout, non-2xx/3xx), each publish's duration, and the final check. Exits 1 if
any request failed, any publish failed, or any device is not on the newest build.

Needs `wrk` (Debian: apt-get install wrk) and PostgreSQL; the database is created and
dropped by the benchmark.

Usage: .venv/bin/python bench/fleet.py [--devices 2000] [--seconds 60] [--processes 2]
           [--connections 50] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
from tuf.ngclient import Updater

from tufa.core.fetcher import BearerFetcher
from tufa.demo.local_server import LocalServer

HARDWARE_IDS = ("board-a", "board-b", "board-c", "board-d")
FACTORY = "fleet"
TIMESTAMP = f"/api/v1/factories/{FACTORY}/repo/ci/metadata/timestamp.json"

# One request a device credential, round robin; the summary as one JSON line.
WRK_SCRIPT = """
local credentials = {}
for line in io.lines(os.getenv("FLEET_CREDENTIALS")) do
  credentials[#credentials + 1] = "Bearer " .. line
end
local path = os.getenv("FLEET_PATH")
local n = 0
request = function()
  n = n % #credentials + 1
  return wrk.format("GET", path, {["Authorization"] = credentials[n]})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
ERRORS = ("connect", "read", "write", "status", "timeout")


def build(number: int, hardware_id: str) -> dict[str, Any]:
    """CI build `number` for `hardware_id`: an external image."""
    return {
        "name": f"{hardware_id}-build-{number}",
        "version": str(number),
        "hardware_ids": [hardware_id],
        "tags": ["main"],
        "url": f"https://cdn.example.com/{hardware_id}/{number}.img",
        "sha256": hashlib.sha256(f"{hardware_id}/{number}".encode()).hexdigest(),
        "length": 50_000_000 + number,
    }


class Factory:
    """The fleet's factory, as its admin reaches it through one server process."""

    def __init__(self, server: LocalServer, admin_token: str) -> None:
        self.server = server
        self.client = httpx.Client(
            base_url=f"{server.url}/api/v1/factories/{FACTORY}",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=60,
        )

    def register(self, index: int) -> tuple[str, str]:
        """Device `index`, registered and polled once, as a fleet that has been running
        is known to its servers: (its hardware id, its credential)."""
        hardware_id = HARDWARE_IDS[index % len(HARDWARE_IDS)]
        device = {
            "name": f"device-{index}",
            "hardware_id": hardware_id,
            "tag": "main",
            "channel": "ci",
        }
        response = self.client.post("/devices", json=device)
        if response.status_code != 201:
            sys.exit(f"registering device-{index}: {response.status_code} {response.text}")
        credential: str = response.json()["credential"]
        first = httpx.get(
            self.server.url + TIMESTAMP, headers={"Authorization": f"Bearer {credential}"}
        )
        if first.status_code != 200:
            sys.exit(f"device-{index}'s first poll: {first.status_code} {first.text}")
        return hardware_id, credential

    def publish(self, number: int) -> float:
        """Publish build `number` for every hardware id; its duration in seconds."""
        started = time.perf_counter()
        items = [build(number, hardware_id) for hardware_id in HARDWARE_IDS]
        response = self.client.post("/targets", json={"targets": items})
        seconds = time.perf_counter() - started
        if response.status_code != 201:
            raise RuntimeError(f"publish {number}: {response.status_code} {response.text}")
        return seconds


def wrk(
    server: LocalServer, credentials: list[str], args: argparse.Namespace, tmp: Path, name: str
) -> subprocess.Popen[str]:
    listed = tmp / f"{name}.credentials"
    listed.write_text("\n".join(credentials) + "\n")
    # One script a process: a wrk already started reads its own while the next is written.
    script = tmp / f"{name}.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        "wrk",
        "-t1",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        server.url,
    ]
    env = {"FLEET_CREDENTIALS": str(listed), "FLEET_PATH": TIMESTAMP, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def wrk_summary(
    process: subprocess.Popen[str], server: LocalServer, credential: str, name: str
) -> dict[str, int]:
    out, _ = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        sample = httpx.get(
            server.url + TIMESTAMP, headers={"Authorization": f"Bearer {credential}"}
        )
        sys.exit(
            f"wrk against {name} failed ({process.returncode}):\n{out}\n"
            f"one poll now: {sample.status_code} {sample.text[:300]}"
        )
    summary: dict[str, int] = json.loads(lines[-1])
    return summary


def on_newest_build(
    server: LocalServer, root: bytes, tmp: Path, device: tuple[str, str], index: int, newest: int
) -> bool:
    """Whether the device, refreshing with ngclient's defaults, finds the newest build."""
    hardware_id, credential = device
    trust = tmp / "devices" / str(index)
    trust.mkdir(parents=True)
    base = f"{server.url}/api/v1/factories/{FACTORY}/repo/ci/metadata/"
    fetcher = BearerFetcher(credential)
    updater = Updater(str(trust), base, fetcher=fetcher, bootstrap=root)
    updater.refresh()
    return updater.get_targetinfo(f"{hardware_id}-build-{newest}") is not None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2, help="server processes (replicas)")
    parser.add_argument("--connections", type=int, default=50, help="per wrk (per process)")
    parser.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a PostgreSQL database to create the benchmark's database from",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    database = f"tufa_bench_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        with tempfile.TemporaryDirectory(prefix="tufa-bench-fleet-") as tmp_name:
            run(args, Path(tmp_name), _sqlalchemy_url(args.pg, database))
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _sqlalchemy_url(admin_url: str, database: str) -> str:
    """`admin_url` (a libpq URL) pointing at `database`, for SQLAlchemy with psycopg."""
    base, _, _ = admin_url.rpartition("/")
    return base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{database}"


def run(args: argparse.Namespace, tmp: Path, db_url: str) -> None:
    operator = f"tufa_{secrets.token_urlsafe(24)}"
    first = LocalServer(tmp / "server-0", operator_token=operator, db_url=db_url)
    servers = [first.start()]
    master_key = ("--master-key-file", str(first.data_dir / "master.key"))
    try:
        for n in range(1, args.processes):
            servers.append(
                LocalServer(
                    tmp / f"server-{n}",
                    operator_token=operator,
                    db_url=db_url,
                    extra_args=master_key,
                ).start()
            )
        created = httpx.post(
            f"{first.url}/api/v1/factories",
            json={"name": FACTORY},
            headers={"Authorization": f"Bearer {operator}"},
        )
        if created.status_code != 201:
            sys.exit(f"creating the factory: {created.status_code} {created.text}")
        admin = created.json()["admin_token"]
        through = [Factory(server, admin) for server in servers]
        through[0].publish(0)
        started = time.perf_counter()
        # Device i is polled through process i % processes, and registered there.
        with ThreadPoolExecutor(8) as pool:
            devices = list(
                pool.map(lambda i: through[i % len(servers)].register(i), range(args.devices))
            )
        print(
            f"{args.devices:,} CI devices registered over {len(HARDWARE_IDS)} hardware ids, "
            f"each polled once, in {time.perf_counter() - started:.1f}s"
        )
        print(
            f"wrk: 1 thread and {args.connections} connections against each of "
            f"{len(servers)} processes, {args.seconds}s; CI publishes once a second meanwhile"
        )
        loads = [
            wrk(server, [c for _, c in devices[n :: len(servers)]], args, tmp, f"process-{n}")
            for n, server in enumerate(servers)
        ]
        publishes, failures = publish_every_second(through, args.seconds)
        summaries = [
            wrk_summary(load, servers[n], devices[n][1], f"process {n}")
            for n, load in enumerate(loads)
        ]
        root = through[0].client.get("/repo/ci/metadata/1.root.json").content

        def refreshed(i: int) -> bool:
            server = servers[i % len(servers)]
            return on_newest_build(server, root, tmp, devices[i], i, len(publishes))

        with ThreadPoolExecutor(8) as pool:
            fresh = list(pool.map(refreshed, range(args.devices)))
        report(summaries, publishes, failures, fresh, args)
    finally:
        for server in servers:
            server.stop()


def publish_every_second(through: list[Factory], seconds: int) -> tuple[list[float], list[str]]:
    """Builds 1, 2, ... published once a second, through each process in turn."""
    durations: list[float] = []
    failures: list[str] = []
    start = time.monotonic()
    for number in range(1, seconds + 1):
        try:
            durations.append(through[number % len(through)].publish(number))
        except (RuntimeError, httpx.HTTPError) as e:
            failures.append(str(e))
            break
        time.sleep(max(0.0, start + number - time.monotonic()))
    return durations, failures


def report(
    summaries: list[dict[str, int]],
    publishes: list[float],
    failures: list[str],
    fresh: list[bool],
    args: argparse.Namespace,
) -> None:
    requests = sum(s["requests"] for s in summaries)
    seconds = max(s["duration_us"] for s in summaries) / 1e6
    errors = {kind: sum(s[kind] for s in summaries) for kind in ERRORS}
    print()
    print("| figure | value |")
    print("| --- | ---: |")
    for n, s in enumerate(summaries):
        rate = s["requests"] / (s["duration_us"] / 1e6)
        print(
            f"| process {n}: polls/s, p50, p99, max | {rate:,.0f}, {s['p50_us'] / 1000:.2f} ms, "
            f"{s['p99_us'] / 1000:.2f} ms, {s['max_us'] / 1000:.1f} ms |"
        )
    print(f"| both: polls, polls/s | {requests:,}, {requests / seconds:,.0f} |")
    print(
        f"| errors (connect, read, write, timeout, non-2xx/3xx) | "
        f"{', '.join(str(errors[k]) for k in ('connect', 'read', 'write', 'timeout', 'status'))} |"
    )
    if publishes:
        print(
            f"| CI publishes (4 targets each), p50, p99 | {len(publishes)} of {args.seconds}, "
            f"{statistics.median(publishes) * 1000:.0f} ms, "
            f"{percentile(publishes, 0.99) * 1000:.0f} ms |"
        )
    print(
        f"| devices on the newest build after the run (ngclient) | {sum(fresh):,} of "
        f"{len(fresh):,} |"
    )
    for failure in failures:
        print(f"publish failed: {failure}")
    if any(errors.values()) or failures or not all(fresh) or len(publishes) < args.seconds:
        sys.exit(1)


if __name__ == "__main__":
    main()
