"""Benchmark: the device-facing read path against baselines measured in the same run.

Every device polls `timestamp.json` every few minutes, so this is where a fleet's load
lands. The benchmark measures, with wrk on loopback:

* tufa-server serving `timestamp.json` (newest version: one indexed lookup per request),
  `N.snapshot.json` (immutable: served from the in-process cache) and a 304 revalidation,
  each authenticated with a device credential;
* baseline 1: nginx serving the same bytes as a static file;
* baseline 2: uvicorn serving the same bytes from a bare ASGI callable (the floor of
  the Python stack tufa runs on).

Usage: .venv/bin/python bench/read_path.py [--seconds 5] [--connections 16] [--db URL]
Needs `wrk` and `nginx` on PATH (Debian: apt-get install wrk nginx-light).
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tufa.demo.local_server import LocalServer, free_port

NGINX_CONF = """
daemon off;
worker_processes 1;
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
        location / {{ root {root}; etag on; }}
    }}
}}
"""

ASGI_APP = """
from pathlib import Path
BODY = Path({path!r}).read_bytes()
async def app(scope, receive, send):
    await send({{"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": BODY}})
"""


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> tuple[float, str]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return rps, p99


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--db", help="database URL (default: SQLite in a temp dir)")
    opts = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install wrk nginx-light")

    with tempfile.TemporaryDirectory(prefix="tufa-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalServer(
            tmp / "data", operator_token=f"tufa_{secrets.token_urlsafe(32)}", db_url=opts.db
        )
        server.start()
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
            (tmp / "www").mkdir()
            (tmp / "www" / "timestamp.json").write_bytes(timestamp.content)

            nginx_port, asgi_port = free_port(), free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port, root=tmp / "www"))
            processes.append(
                subprocess.Popen(
                    ["nginx", "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL
                )
            )
            (tmp / "floor_app.py").write_text(ASGI_APP.format(path=str(tmp / "www/timestamp.json")))
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "floor_app:app", "--port", str(asgi_port),
                     "--log-level", "warning", "--no-access-log"],
                    cwd=tmp,
                )
            )  # fmt: skip
            nginx_url = f"http://127.0.0.1:{nginx_port}/timestamp.json"
            asgi_url = f"http://127.0.0.1:{asgi_port}/timestamp.json"
            wait_for(nginx_url)
            wait_for(asgi_url)

            cases = [
                ("nginx static file (baseline)", nginx_url, {}),
                ("bare uvicorn ASGI (baseline)", asgi_url, {}),
                ("tufa timestamp.json", f"{metadata}/timestamp.json", auth),
                ("tufa 1.snapshot.json (cached)", f"{metadata}/1.snapshot.json", auth),
                (
                    "tufa timestamp.json, 304",
                    f"{metadata}/timestamp.json",
                    {**auth, "If-None-Match": timestamp.headers["etag"]},
                ),
            ]
            results = {}
            print(f"wrk: 1 thread, {opts.connections} connections, {opts.seconds}s per case, "
                  f"{len(timestamp.content)}-byte timestamp.json, "
                  f"db={'SQLite' if not opts.db else opts.db.split('@')[-1]}")  # fmt: skip
            print(f"{'case':38} {'req/s':>10} {'p99':>10} {'vs nginx':>9} {'vs uvicorn':>10}")
            for name, url, headers in cases:
                rps, p99 = wrk(url, opts.seconds, opts.connections, headers)
                results[name] = rps
                nginx_rps = results.get("nginx static file (baseline)", rps)
                floor_rps = results.get("bare uvicorn ASGI (baseline)", rps)
                print(f"{name:38} {rps:10.0f} {p99:>10} {rps / nginx_rps:9.2f} "
                      f"{rps / floor_rps:10.2f}")  # fmt: skip
        finally:
            for process in processes:
                process.terminate()
                process.wait()
            server.stop()


if __name__ == "__main__":
    main()
