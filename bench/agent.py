"""Benchmark: the device agent's start-up and a full update, against baselines.

* start-up: `tufa-agent status` (imports the whole agent, reads the state directory)
  against `python -c pass` and against importing python-tuf's ngclient and httpx alone
  (what any python-tuf client pays before doing anything);
* update: `tufa-agent run --once` installing a SIZE MiB build from a local tufa-server
  (refresh, resumable download with hash check, slot install, report) against
  python-tuf's default code path, ngclient's `refresh()` + `download_target()` of the
  same file from the same server, in the same run.

Usage: .venv/bin/python bench/agent.py [--size-mib 64] [--runs 15]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tuf.ngclient import Updater

from tufa.core.fetcher import BearerFetcher
from tufa.demo.local_server import LocalServer, console_script


def timed(command: list[str], runs: int) -> float:
    """Median wall time of `command` over `runs` runs, in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tufa-bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalServer(tmp / "server", operator_token=f"tufa_{secrets.token_urlsafe(24)}") as srv:
            created = httpx.post(
                f"{srv.url}/api/v1/factories",
                json={"name": "bench"},
                headers={"Authorization": f"Bearer {srv.operator_token}"},
            ).json()
            admin = {"Authorization": f"Bearer {created['admin_token']}"}
            base = f"{srv.url}/api/v1/factories/bench"
            data = os.urandom(args.size_mib * 1024 * 1024)
            digest = hashlib.sha256(data).hexdigest()
            httpx.put(f"{base}/blobs/{digest}", content=data, headers=admin, timeout=300)
            target = {"name": "image-1", "version": "1", "hardware_ids": ["hw"], "tags": ["t"],
                      "sha256": digest, "length": len(data)}  # fmt: skip
            httpx.post(f"{base}/targets", json={"targets": [target]}, headers=admin)
            register = httpx.post(
                f"{base}/tokens", json={"scopes": ["register"]}, headers=admin
            ).json()["token"]
            root = tmp / "root.json"
            root.write_bytes(
                httpx.get(f"{base}/repo/ci/metadata/1.root.json", headers=admin).content
            )

            agent = console_script("tufa-agent")

            def registered(name: str) -> Path:
                state = tmp / name
                subprocess.run(
                    [agent, "register", "--server", srv.url, "--factory", "bench", "--token",
                     register, "--hardware-id", "hw", "--tag", "t", "--root", str(root),
                     "--name", name, "--dir", str(state)],
                    check=True, capture_output=True,
                )  # fmt: skip
                return state

            print(f"start-up, median of {args.runs} runs:")
            bare = timed([sys.executable, "-c", "pass"], args.runs)
            client = timed([sys.executable, "-c", "import tuf.ngclient, httpx"], args.runs)
            status = timed([agent, "status", "--dir", str(registered("startup"))], args.runs)
            print(f"  python -c pass (baseline)            {bare:7.1f} ms")
            print(f"  import tuf.ngclient, httpx (baseline) {client:7.1f} ms")
            print(f"  tufa-agent status                     {status:7.1f} ms"
                  f"  ({status / client:.2f}x the python-tuf import)")  # fmt: skip

            print(f"\nupdate of a {args.size_mib} MiB build, median of 3 runs:")
            ngclient_times, agent_times = [], []
            for run in range(3):
                trust = tmp / f"ngclient-{run}"
                trust.mkdir()
                start = time.perf_counter()
                updater = Updater(
                    str(trust), f"{base}/repo/ci/metadata/", str(trust), f"{base}/repo/ci/targets/",
                    fetcher=BearerFetcher(created["admin_token"]), bootstrap=root.read_bytes(),
                )  # fmt: skip
                updater.refresh()
                info = updater.get_targetinfo("image-1")
                assert info is not None
                updater.download_target(info)
                ngclient_times.append(time.perf_counter() - start)
                state = registered(f"update-{run}")
                start = time.perf_counter()
                subprocess.run([agent, "run", "--once", "--dir", str(state)], check=True,
                               capture_output=True)  # fmt: skip
                agent_times.append(time.perf_counter() - start)
                shutil.rmtree(state)
            ngclient_s, agent_s = statistics.median(ngclient_times), statistics.median(agent_times)
            mib = args.size_mib
            print(f"  python-tuf refresh + download_target (baseline, in-process) "
                  f"{ngclient_s:6.2f} s  {mib / ngclient_s:7.1f} MiB/s")  # fmt: skip
            ratio = agent_s / ngclient_s
            print(f"  tufa-agent run --once (process start to installed)          "
                  f"{agent_s:6.2f} s  {mib / agent_s:7.1f} MiB/s  ({ratio:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
