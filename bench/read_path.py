"""Benchmark: the device-facing read path against baselines measured in the same run.

Every device polls `timestamp.json` every few minutes, so this is where a fleet's load
lands. The benchmark measures, with wrk on loopback:

* tufa-server serving `timestamp.json` to a device credential, plain and revalidated
  (`If-None-Match` -> 304), and `1.snapshot.json` (immutable); the same application
  under uvicorn (httptools, uvloop) on the same database, for the choice of server;
  tufa runs with `--no-access-log` (no log line per poll; refusals are logged), and
  another process on the same database with its access log on shows what that costs;
  on PostgreSQL also a process started with `--poll-invalidation notify`;
* baseline 1: nginx (one worker) serving the same bytes as a static file, plain and 304;
* baseline 2: the same bytes from a bare ASGI callable under uvicorn (httptools, uvloop)
  and, if installed, granian: the floor of a Python stack.

Before anything is timed, every case is fetched once with httpx and must answer the
expected status with the exact expected bytes (an error page is not a baseline); wrk's
own count of non-2xx/3xx answers must be zero too. Either failing aborts the run.

Usage: .venv/bin/python bench/read_path.py [--seconds 5] [--rounds 5] [--connections 16]
       [--db URL]
Needs `wrk` and `nginx` on PATH (Debian: apt-get install wrk nginx-light).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tufa.demo.local_server import LocalServer, free_port

NGINX_CONF = """
daemon off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}; etag on; default_type application/json; }}
    }}
}}
"""

ASGI_APP = """
from pathlib import Path
BODY = Path({path!r}).read_bytes()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": BODY}})
"""


# The same tufa application as `tufa-server run` serves, under uvicorn instead of granian,
# on the same database: what the choice of HTTP server is worth on the poll path.
TUFA_ON_UVICORN = """
from pathlib import Path
from tufa.server.app import create_app
from tufa.server.main import open_state
from tufa.server.settings import Settings
app = create_app(open_state(Settings(data_dir=Path({data!r}), db_url={db!r},
                                     resign_enabled=False, access_log=False)))
"""


@dataclass
class Case:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    body: bytes = b""


def wrk(case: Case, seconds: int, connections: int) -> tuple[float, float]:
    """Requests per second and the p99 latency in milliseconds."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in case.headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, case.url], capture_output=True, text=True, check=True).stdout
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad is not None:
        sys.exit(f"{case.name}: wrk saw {bad.group(1)} non-2xx/3xx answers; aborting\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rps, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def check(case: Case) -> None:
    """Abort unless the case answers its status with exactly its bytes."""
    got = httpx.get(case.url, headers=case.headers, timeout=10)
    if got.status_code != case.status or got.content != case.body:
        sys.exit(
            f"{case.name}: expected {case.status} with {len(case.body)} bytes, got "
            f"{got.status_code} with {len(got.content)} bytes ({got.content[:200]!r}); aborting"
        )


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def floor_servers(tmp: Path) -> list[tuple[str, list[str]]]:
    """The bare ASGI servers to measure: (label, command listening on {port})."""
    python = sys.executable
    servers = [
        (
            "bare ASGI, uvicorn httptools+uvloop",
            [python, "-m", "uvicorn", "floor_app:app", "--port", "{port}", "--http",
             "httptools", "--loop", "uvloop", "--log-level", "warning", "--no-access-log"],
        )
    ]  # fmt: skip
    if importlib.util.find_spec("granian") is not None:
        servers.append(
            (
                "bare ASGI, granian",
                [python, "-m", "granian", "--interface", "asgi", "--port", "{port}",
                 "--log-level", "warning", "--no-ws", "floor_app:app"],
            )
        )  # fmt: skip
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--db", help="database URL (default: SQLite in a temp dir)")
    opts = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install wrk nginx-light")

    with tempfile.TemporaryDirectory(prefix="tufa-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # nginx's workers run as an unprivileged user when started as root: they must be
        # able to read the file (a 0700 temp dir gave 403 error pages to time).
        tmp.chmod(0o755)
        # A fleet-facing process runs without a line a poll in its log (refusals are
        # still logged); the cost of the access log is measured on a second process.
        server = LocalServer(
            tmp / "data",
            operator_token=f"tufa_{secrets.token_urlsafe(32)}",
            db_url=opts.db,
            extra_args=("--no-access-log",),
        )
        server.start()
        same_database = ("--master-key-file", str(server.data_dir / "master.key"))
        logging_every_request = LocalServer(
            tmp / "data-logged" if opts.db else server.data_dir,
            operator_token=server.operator_token,
            db_url=opts.db,
            extra_args=same_database,
        )
        logging_every_request.start()
        # On PostgreSQL another process on the same database learns of changes from
        # notifications (`--poll-invalidation notify`, ADR 0014), for comparison.
        notified = None
        if opts.db:
            notified = LocalServer(
                tmp / "data-notify",
                operator_token=server.operator_token,
                db_url=opts.db,
                extra_args=(*same_database, "--no-access-log", "--poll-invalidation", "notify"),
            )
            notified.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            created = httpx.post(
                f"{server.url}/api/v1/factories",
                json={"name": f"bench-{secrets.token_hex(3)}"},
                headers={"Authorization": f"Bearer {server.operator_token}"},
            ).json()
            factory_path = f"/api/v1/factories/{created['name']}"
            device = httpx.post(
                f"{server.url}{factory_path}/devices",
                json={"name": "bench", "hardware_id": "hw", "tag": "main", "channel": "ci"},
                headers={"Authorization": f"Bearer {created['admin_token']}"},
            ).json()
            auth = {"Authorization": f"Bearer {device['credential']}"}
            metadata = f"{server.url}{factory_path}/repo/ci/metadata"
            timestamp = httpx.get(f"{metadata}/timestamp.json", headers=auth)
            snapshot = httpx.get(f"{metadata}/1.snapshot.json", headers=auth)
            if timestamp.status_code != 200 or snapshot.status_code != 200:
                sys.exit(f"tufa answered {timestamp.status_code}/{snapshot.status_code}")
            body = timestamp.content
            www = tmp / "www"
            www.mkdir(mode=0o755)
            (www / "timestamp.json").write_bytes(body)
            (www / "timestamp.json").chmod(0o644)

            nginx_port = free_port()
            conf = tmp / "nginx.conf"
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=nginx_port, root=www))
            processes.append(
                subprocess.Popen(
                    ["nginx", "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL
                )
            )
            nginx_url = f"http://127.0.0.1:{nginx_port}/timestamp.json"
            (tmp / "floor_app.py").write_text(ASGI_APP.format(path=str(www / "timestamp.json")))
            floors = []
            for label, command in floor_servers(tmp):
                port = free_port()
                argv = [part.replace("{port}", str(port)) for part in command]
                processes.append(subprocess.Popen(argv, cwd=tmp))
                floors.append(Case(label, f"http://127.0.0.1:{port}/timestamp.json", body=body))
            uvicorn_port = free_port()
            (tmp / "tufa_on_uvicorn.py").write_text(
                TUFA_ON_UVICORN.format(data=str(server.data_dir), db=server.db_url)
            )
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "tufa_on_uvicorn:app", "--port",
                     str(uvicorn_port), "--http", "httptools", "--loop", "uvloop",
                     "--log-level", "warning", "--no-access-log"],
                    cwd=tmp,
                    env={**os.environ, "TUFA_OPERATOR_TOKEN": server.operator_token},
                )
            )  # fmt: skip
            on_uvicorn = f"http://127.0.0.1:{uvicorn_port}{factory_path}/repo/ci/metadata"
            for url in [nginx_url, *(floor.url for floor in floors), on_uvicorn]:
                wait_for(url)
            nginx_etag = httpx.get(nginx_url).headers.get("etag", "")
            etag = timestamp.headers["etag"]

            cases = [
                Case("nginx static file (baseline)", nginx_url, body=body),
                Case("nginx static file, 304 (baseline)", nginx_url,
                     {"If-None-Match": nginx_etag}, 304),
                *floors,
                Case("tufa timestamp.json", f"{metadata}/timestamp.json", auth, body=body),
                Case("tufa timestamp.json, 304", f"{metadata}/timestamp.json",
                     {**auth, "If-None-Match": etag}, 304),
                Case("tufa 1.snapshot.json (immutable)", f"{metadata}/1.snapshot.json", auth,
                     body=snapshot.content),
                Case("tufa on uvicorn: timestamp.json", f"{on_uvicorn}/timestamp.json", auth,
                     body=body),
                Case("tufa on uvicorn: timestamp.json, 304", f"{on_uvicorn}/timestamp.json",
                     {**auth, "If-None-Match": etag}, 304),
            ]  # fmt: skip
            logged = f"{logging_every_request.url}{factory_path}/repo/ci/metadata/timestamp.json"
            cases.append(Case("tufa, access log on: timestamp.json", logged, auth, body=body))
            if notified is not None:
                there = f"{notified.url}{factory_path}/repo/ci/metadata/timestamp.json"
                cases += [
                    Case("tufa notify: timestamp.json", there, auth, body=body),
                    Case("tufa notify: timestamp.json, 304", there,
                         {**auth, "If-None-Match": etag}, 304),
                ]  # fmt: skip
            for case in cases:
                check(case)
            rounds = max(1, min(opts.rounds, opts.seconds))
            each = max(1, opts.seconds // rounds)
            print(f"wrk: 1 thread, {opts.connections} connections, {rounds} interleaved "
                  f"rounds of {each}s per case, {len(body)}-byte timestamp.json, "
                  f"db={'SQLite' if not opts.db else opts.db.split('@')[-1]}; "
                  f"load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
            # Every case once per round, so that load from elsewhere on the machine falls on
            # all of them alike; each ratio is to nginx answering the same status in the
            # same round; medians over the rounds.
            measured: dict[str, list[tuple[float, float, float]]] = {c.name: [] for c in cases}
            for _ in range(rounds):
                nginx_rps: dict[int, float] = {}
                for case in cases:
                    rps, p99 = wrk(case, each, opts.connections)
                    if case.name.startswith("nginx"):
                        nginx_rps[case.status] = rps
                    measured[case.name].append((rps, p99, rps / nginx_rps[case.status]))
            print(f"{'case':40} {'req/s':>9} {'p99 ms':>9} {'vs nginx':>9}")
            for case in cases:
                runs = measured[case.name]
                rps, p99, ratio = (statistics.median(run[i] for run in runs) for i in range(3))
                print(f"{case.name:40} {rps:9.0f} {p99:9.2f} {ratio:9.2f}")
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            for case in cases:
                check(case)  # still the same answers after the load
        finally:
            for process in processes:
                process.terminate()
                process.wait()
            server.stop()
            logging_every_request.stop()
            if notified is not None:
                notified.stop()


if __name__ == "__main__":
    main()
